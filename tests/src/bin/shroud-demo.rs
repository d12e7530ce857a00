//! `shroud-demo`: shroud's whole path on loopback, in one command.
//!
//! Starts a sample HTTPS origin (its certificate issued by a throwaway CA), a proxy, and a
//! client that publishes the origin as `example.test` through the proxy over the direct
//! transport. Then it prints the `curl` lines that reach the origin through the tunnel and
//! serves until Ctrl-C. With `--check` it makes those requests itself and exits.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use shroud_tests::stack::{authorize, ClientSpec, Pki, TestClient, TestProxy};
use shroud_tests::{http_get, https_get, HttpOrigin};

const HOST: &str = "example.test";
const PROXY: &str = "proxy.example.test";

#[tokio::main]
async fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!("usage: shroud-demo [--check]\n\nRuns a proxy, a sample origin and a client on loopback and prints how to reach the origin through the tunnel. --check makes the requests itself and exits.");
        return ExitCode::SUCCESS;
    }
    shroud_client::init_logging();
    match demo(check).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shroud-demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(check: bool) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let origin_tls = pki.ca.issue(&[HOST]).server_config(&[b"http/1.1"]);
    let origin = HttpOrigin::tls(origin_tls)
        .await
        .context("starting the sample origin")?;
    let plain_origin = HttpOrigin::plain()
        .await
        .context("starting the sample HTTP origin")?;

    let mut spec = ClientSpec::new(HOST, origin.addr(), vec![]);
    spec.http_target = Some(plain_origin.addr());
    let proxy = TestProxy::start(&pki, PROXY, &authorize(HOST, &spec.key))
        .await
        .context("starting the proxy")?;
    spec.proxies = vec![proxy.dial()];
    let mut client = TestClient::start(&pki, spec).context("starting the client")?;
    tokio::time::timeout(Duration::from_secs(30), client.wait_bound(1))
        .await
        .context("the client did not bind its tunnel within 30 s")?;

    let ca = pki.ca_path.display();
    let (https, http) = (proxy.https.port(), proxy.http.port());
    println!();
    println!("shroud demo: {HOST} is published through a proxy on 127.0.0.1.");
    println!("  origin (hidden behind the client):  an HTTPS server for {HOST}");
    println!("  proxy: HTTPS on 127.0.0.1:{https}, HTTP on 127.0.0.1:{http}");
    println!();
    println!(
        "Reach the origin through the tunnel (the origin's certificate is verified end to end;"
    );
    println!("the proxy only ever sees ciphertext):");
    println!();
    println!("  curl --cacert {ca} --resolve {HOST}:{https}:127.0.0.1 https://{HOST}:{https}/");
    println!("  curl --resolve {HOST}:{http}:127.0.0.1 http://{HOST}:{http}/");
    println!();

    if check {
        let response = https_get(proxy.https, HOST, pki.ca.root_store(), "/")
            .await
            .context("HTTPS through the tunnel")?;
        anyhow::ensure!(response.status == 200, "HTTPS answered {}", response.status);
        println!(
            "check: HTTPS -> {} {}",
            response.status,
            response.body_text().trim()
        );
        let response = http_get(proxy.http, HOST, "/")
            .await
            .context("HTTP through the tunnel")?;
        anyhow::ensure!(response.status == 200, "HTTP answered {}", response.status);
        println!(
            "check: HTTP  -> {} {}",
            response.status,
            response.body_text().trim()
        );
        return Ok(());
    }
    println!("Serving until Ctrl-C.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    proxy.begin_shutdown();
    Ok(())
}
