//! `shroud-demo`: shroud's whole path on loopback, in one command.
//!
//! Starts a sample HTTPS origin (its certificate issued by a throwaway CA), a proxy, and a
//! client that publishes the origin as `example.test` through the proxy over the direct
//! transport. Then it prints the `curl` lines that reach the origin through the tunnel and
//! serves until Ctrl-C. With `--check` it makes those requests itself and exits.
//!
//! With `--tor-local` it first builds a private Tor network on 127.0.0.1 from Debian's `tor`
//! (three directory authorities and five relays; about half a minute) and the client reaches
//! the proxy through it with embedded Arti, as `shroud` does by default on the real Tor network.
//!
//! With `--fleet N` it runs a fleet instead: N proxies and two discovery instances answering
//! DNS for them (see the `fleet` module). With `--acme` the client gets the origin's
//! certificate from Debian's pebble, a CA on loopback (see the `acme` module).

#[path = "shroud-demo/acme.rs"]
mod acme;
#[path = "shroud-demo/fleet.rs"]
mod fleet;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use shroud_tests::stack::{authorize, ClientSpec, Pki, TestClient, TestProxy};
use shroud_tests::tornet::TorNet;
use shroud_tests::{http_get, https_get, HttpOrigin};

const HOST: &str = "example.test";
const PROXY: &str = "proxy.example.test";
const USAGE: &str = "usage: shroud-demo [--tor-local | --fleet N | --acme] [--check]

Runs a proxy, a sample origin and a client on loopback and prints how to reach the origin
through the tunnel. --tor-local carries the tunnel over a private Tor network on 127.0.0.1
(needs Debian's tor). --fleet N runs N proxies and two discovery instances answering DNS for
them instead. --acme has the client get the origin's certificate from a CA on loopback
(needs Debian's pebble). --check makes the requests itself and exits.";

#[tokio::main]
async fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let check = args.iter().any(|a| a == "--check");
    let tor = args.iter().any(|a| a == "--tor-local");
    let acme = args.iter().any(|a| a == "--acme");
    let fleet = match args.iter().position(|a| a == "--fleet") {
        Some(at) => match args.get(at + 1).and_then(|n| n.parse::<usize>().ok()) {
            Some(count) => {
                args.drain(at..at + 2);
                Some(count)
            }
            None => {
                println!("{USAGE}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    if let Some(unknown) = args
        .iter()
        .find(|a| !matches!(a.as_str(), "--check" | "--tor-local" | "--acme"))
    {
        println!("{USAGE}");
        return if unknown == "--help" || unknown == "-h" {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        };
    }
    // A private network of eight relays makes Arti warn that it is small; true, and beside the
    // point here.
    shroud_process::logging::init("info,tor_netdir=error", &Default::default());
    let result = match (fleet, acme) {
        (Some(count), _) => fleet::run(count, check).await,
        (None, true) => acme::run(check).await,
        (None, false) => demo(check, tor).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shroud-demo: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(check: bool, tor: bool) -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let network = if tor {
        println!("Starting a private Tor network on 127.0.0.1 (about half a minute)...");
        let started = std::time::Instant::now();
        let network = tokio::task::spawn_blocking(TorNet::start)
            .await
            .context("starting the private Tor network")??;
        println!("Tor network ready in {:.0?}.", started.elapsed());
        Some(network)
    } else {
        None
    };
    let origin_tls = pki.origin_tls(&[HOST]);
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
    let mut client = match &network {
        Some(network) => {
            let state = network.new_state_root()?;
            TestClient::start_tor(&pki, spec, &network.network_file, &state)
                .await
                .context("starting the client over Tor")?
        }
        None => TestClient::start(&pki, spec).context("starting the client")?,
    };
    tokio::time::timeout(Duration::from_secs(90), client.wait_bound(1))
        .await
        .context("the client did not bind its tunnel within 90 s")?;

    let ca = pki.ca_path.display();
    let (https, http) = (proxy.https.port(), proxy.http.port());
    println!();
    println!("shroud demo: {HOST} is published through a proxy on 127.0.0.1.");
    if network.is_some() {
        println!(
            "  the client's tunnel crosses the private Tor network: guard, middle, exit, proxy"
        );
    }
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
