//! `shroud-demo --acme`: a certificate for the hidden origin, from a CA on loopback.
//!
//! Debian's pebble plays the CA. The client publishes a plain-HTTP origin as `example.test`
//! with ACME on: it asks pebble for a certificate, pebble's validator checks the name by
//! connecting to the proxy's HTTPS port (TLS-ALPN-01), the proxy routes that check onto the
//! client's tunnel like any visitor, and the client answers it itself. Visitors then verify
//! the certificate against pebble's root alone, and the client turns their TLS into the
//! origin's plaintext. What the real command looks like is printed alongside.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use shroud_client::acme::{Acme, AcmeConfig};
use shroud_client::shared::AcmeTls;
use shroud_client::transport::{DirectTransport, Resolve};
use shroud_tests::pebble::PebbleSetup;
use shroud_tests::stack::{authorize, ClientSpec, Pki, TestClient, TestProxy};
use shroud_tests::{https_get, HttpOrigin};
use tokio_util::sync::CancellationToken;

const HOST: &str = "example.test";
const PROXY: &str = "proxy.example.test";

/// Runs the ACME demo; with `check`, visits once and returns, else serves until Ctrl-C.
pub async fn run(check: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        which("pebble") && which("pebble-challtestsrv"),
        "--acme needs Debian's pebble, a test ACME CA: apt-get install pebble"
    );
    let pki = Pki::new()?;
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let origin = HttpOrigin::plain()
        .await
        .context("starting the sample origin")?;
    let mut spec = ClientSpec::new(HOST, origin.addr(), vec![]);
    let proxy = TestProxy::start(&pki, PROXY, &authorize(HOST, &spec.key))
        .await
        .context("starting the proxy")?;
    spec.proxies = vec![proxy.dial()];

    // pebble's validator dials the proxy's HTTPS port for every name.
    let setup = PebbleSetup::new(proxy.https.port());
    let pebble = setup.start().context("starting pebble")?;
    let mut config = AcmeConfig::new(
        HOST,
        "admin@example.org",
        &setup.directory_url(),
        pki.dir().join("state"),
    );
    config.agree_tos = true;
    config.extra_ca = Some(setup.ca_pem());
    let transport = Arc::new(DirectTransport::new(Resolve::new(), Duration::from_secs(5)));
    let acme = Acme::start(config, transport, Box::new(|| true), shutdown.clone())
        .await
        .context("starting ACME")?;
    spec.acme = Some(AcmeTls {
        acme: acme.clone(),
        terminate: true,
    });
    let mut client = TestClient::start(&pki, spec).context("starting the client")?;
    tokio::time::timeout(Duration::from_secs(60), client.wait_bound(1))
        .await
        .context("the client did not bind its tunnel within 60 s")?;
    tokio::time::timeout(Duration::from_secs(60), acme.ready())
        .await
        .context("no certificate within 60 s")??;

    let root_pem = pebble.root_pem().await.context("reading pebble's root")?;
    let root = pki.dir().join("pebble-root.pem");
    std::fs::write(&root, &root_pem).context("writing pebble's root")?;
    let https = proxy.https.port();
    println!();
    println!("shroud demo: {HOST} got its certificate from a CA (pebble) on loopback. The CA's");
    println!(
        "TLS-ALPN-01 check came through the proxy and the tunnel, and the client answered it;"
    );
    println!("the origin behind the client speaks plain HTTP. On the real internet the same is:");
    println!();
    println!("  shroud example.com 127.0.0.1:8080 --acme you@example.com --acme-agree-tos");
    println!();
    println!("Reach the origin, verifying the certificate against pebble's root alone:");
    println!();
    println!(
        "  curl --cacert {} --resolve {HOST}:{https}:127.0.0.1 https://{HOST}:{https}/",
        root.display()
    );
    println!();

    if check {
        let roots = pebble.roots().await.context("pebble's root")?;
        let response = https_get(proxy.https, HOST, roots, "/")
            .await
            .context("HTTPS with the ACME certificate")?;
        anyhow::ensure!(response.status == 200, "HTTPS answered {}", response.status);
        println!(
            "check: HTTPS -> {} {}",
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

/// Whether `program` is on the PATH.
fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
