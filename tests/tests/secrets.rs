//! No secret reaches a log, even at the most verbose level.
//!
//! Every binary runs with `RUST_LOG=trace` (its own code and every library's) through a
//! bind granted by a DNS TXT record, heartbeats carrying the fleet secret, and a client that
//! fetches its list from the discovery service. Then no line any of them wrote
//! holds a private key (the client's, the discovery service's signing key, the TLS keys), the
//! fleet secret, or the client's TARGET address.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use shroud_tests::dns::TestDns;
use shroud_tests::ports::free_ports;
use shroud_tests::process::{Output, Process};
use shroud_tests::stack::{binary, log_addr, make_key, proxy_args, Pki};
use shroud_tests::{https_get, init, within, HttpOrigin};

const HOST: &str = "example.test";
const DISCOVERY: &str = "discovery.test";
const PROXY: &str = "one.proxy.test";
const SECRET: &str = "a-fleet-secret-nobody-may-log-0123456789";

fn spawn_traced(program: &str, args: &[String]) -> Process {
    let env = [("RUST_LOG", OsStr::new("trace"))];
    Process::spawn_with(&binary(program), args, &env, Output::Echo).unwrap()
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// The lines of a PEM file's body: what would show if the key itself were logged.
fn pem_body(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !line.starts_with("-----") && line.len() >= 16)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_secret_or_target_reaches_any_log_at_trace_level() {
    init();
    let pki = Pki::new().unwrap();
    let dir = pki.dir();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let client_key = dir.join("client.key");
    let client_public = make_key(&client_key).unwrap();
    let secret_file = dir.join("fleet.secret");
    write_private(&secret_file, SECRET);

    // The name is granted by a TXT record only: the proxy looks it up.
    let dns = TestDns::start("test.").await.unwrap();
    dns.add_txt(
        "_shroud.example.test",
        &format!("shroud-key={client_public}"),
        1,
    )
    .unwrap();

    // Discovery, with a signing key file and a TLS key.
    let signing_key = dir.join("signing.key");
    shroud_mux::keyfile::load_or_create(&signing_key).unwrap();
    let signing_public = shroud_mux::keyfile::load_or_create(&signing_key)
        .unwrap()
        .0
        .public();
    let (disc_cert, disc_key) = pki.issue_files(DISCOVERY).unwrap();
    let discovery_args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &disc_cert.display().to_string(),
        "--tls-key",
        &disc_key.display().to_string(),
        "--signing-key",
        &signing_key.display().to_string(),
        "--fleet-secret-file",
        &secret_file.display().to_string(),
        "--heartbeat-timeout-secs",
        "30",
    ]
    .map(str::to_owned)
    .into();
    let mut discovery = spawn_traced("shroud-discovery", &discovery_args);
    let line = discovery
        .wait_for_line("listening", Duration::from_secs(20))
        .await
        .unwrap();
    let discovery_addr = log_addr(&line).unwrap();

    // A proxy granting by DNS, announcing itself with the fleet secret, and a fleet member
    // (its gossip keyed by the same secret).
    let [https_port, peer_port] = free_ports::<2>().unwrap();
    let mut args = proxy_args(&pki, PROXY, "").unwrap();
    args.extend(
        [
            "--listen-https",
            &format!("127.0.0.1:{https_port}"),
            "--authorize-dns",
            "--dns-server",
            &dns.addr.to_string(),
            "--discovery",
            &format!("https://{DISCOVERY}:{}", discovery_addr.port()),
            "--resolve",
            &format!("{DISCOVERY}:{}:127.0.0.1", discovery_addr.port()),
            "--discovery-ca",
            &pki.ca_path.display().to_string(),
            "--fleet-secret-file",
            &secret_file.display().to_string(),
            "--region",
            "eu",
            "--public-name",
            &format!("{PROXY}:{https_port}"),
            "--heartbeat-secs",
            "1",
            "--listen-peer",
            &format!("127.0.0.1:{peer_port}"),
        ]
        .map(str::to_owned),
    );
    let mut proxy = spawn_traced("shroud-proxy", &args);
    proxy
        .wait_for_line(
            "registered with the discovery service",
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    let proxy_key = dir.join(format!("{PROXY}.key"));

    // The client finds the proxy through discovery and binds.
    let target = origin.addr().to_string();
    let client_args: Vec<String> = [
        HOST,
        &target,
        "--transport",
        "direct",
        "--discovery",
        &format!("https://{DISCOVERY}:{}", discovery_addr.port()),
        "--discovery-key",
        &signing_public.to_string(),
        "--proxy-ca",
        &pki.ca_path.display().to_string(),
        "--key",
        &client_key.display().to_string(),
        "--resolve",
        &format!("{DISCOVERY}:{}:127.0.0.1", discovery_addr.port()),
        "--resolve",
        &format!("{PROXY}:{https_port}:127.0.0.1"),
    ]
    .map(str::to_owned)
    .into();
    let mut client = spawn_traced("shroud", &client_args);
    client
        .wait_for_line("tunnel up", Duration::from_secs(30))
        .await
        .unwrap();
    let https = format!("127.0.0.1:{https_port}").parse().unwrap();
    let response = within(20, https_get(https, HOST, pki.ca.root_store(), "/"))
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    let mut secrets: Vec<(String, String)> = vec![
        ("the fleet secret".into(), SECRET.into()),
        ("the client's TARGET".into(), target.clone()),
    ];
    for (what, path) in [
        ("the client key", client_key.as_path()),
        ("the signing key", signing_key.as_path()),
        ("the discovery TLS key", disc_key.as_path()),
        ("the proxy TLS key", proxy_key.as_path()),
    ] {
        for line in pem_body(path) {
            secrets.push((what.into(), line));
        }
    }
    let logs = [
        ("shroud", client.output_text()),
        ("shroud-proxy", proxy.output_text()),
        ("shroud-discovery", discovery.output_text()),
    ];
    for (program, log) in &logs {
        assert!(log.lines().count() > 50, "{program} logged at trace: {log}");
        for (what, secret) in &secrets {
            if let Some(line) = log.lines().find(|line| line.contains(secret.as_str())) {
                panic!("{program} logged {what}: {line}");
            }
        }
    }
    eprintln!(
        "secrets: {} trace lines from three binaries hold none of {} secret strings",
        logs.iter()
            .map(|(_, log)| log.lines().count())
            .sum::<usize>(),
        secrets.len()
    );
}
