//! The client's SRV lookup (`shroud_client::srv`) against a real DNS server, over DNS-over-TCP
//! on a stream from the direct transport; and the `shroud` binary finding its proxies, names
//! and addresses both, at the server it was given.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use hickory_proto::rr::RecordType;
use shroud_client::srv::{lookup_proxies, lookup_srv, SrvError, SrvTarget};
use shroud_client::transport::{DirectTransport, Resolve};
use shroud_tests::dns::TestDns;
use shroud_tests::process::Process;
use shroud_tests::stack::{binary, make_key, Pki, TestProxy};
use shroud_tests::{https_get, init, within, HttpOrigin};

const SRV_NAME: &str = "_shroud._tcp.example.test";
const TIMEOUT: Duration = Duration::from_secs(5);

fn transport() -> DirectTransport {
    // No overrides: the DNS server's address is an IP literal, so nothing is resolved.
    DirectTransport::new(Resolve::new(), Duration::from_secs(5))
}

fn target(name: &str, port: u16, priority: u16, weight: u16) -> SrvTarget {
    SrvTarget {
        name: name.to_owned(),
        port,
        priority,
        weight,
    }
}

#[tokio::test]
async fn finds_proxies_in_priority_order() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    dns.add_srv(SRV_NAME, 20, 0, 8443, "backup.example.net.", 600)
        .unwrap();
    dns.add_srv(SRV_NAME, 10, 50, 443, "Proxy-A.example.NET", 300)
        .unwrap();
    dns.add_srv(SRV_NAME, 10, 50, 443, "proxy-b.example.net.", 300)
        .unwrap();
    let transport = transport();

    let answer = within(
        10,
        lookup_srv(&transport, dns.addr, "Example.Test.", TIMEOUT),
    )
    .await
    .unwrap();
    assert_eq!(answer.ttl, Duration::from_secs(300));
    let mut first_two = answer.targets[..2].to_vec();
    first_two.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        first_two,
        [
            target("proxy-a.example.net", 443, 10, 50),
            target("proxy-b.example.net", 443, 10, 50),
        ]
    );
    assert_eq!(answer.targets[2], target("backup.example.net", 8443, 20, 0));
    assert_eq!(dns.queries(), 1);

    // Both orders of the two equal-weight proxies come up.
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..40 {
        let targets = within(
            10,
            lookup_proxies(&transport, dns.addr, "example.test", TIMEOUT),
        )
        .await
        .unwrap();
        assert_eq!(targets.len(), 3);
        firsts.insert(targets[0].name.clone());
    }
    assert_eq!(firsts.len(), 2, "{firsts:?}");
}

#[tokio::test]
async fn a_dot_target_says_not_available() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    dns.add_srv(SRV_NAME, 0, 0, 0, ".", 300).unwrap();

    let err = within(
        10,
        lookup_proxies(&transport(), dns.addr, "example.test", TIMEOUT),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SrvError::ServiceNotAvailable { .. }), "{err}");
}

#[tokio::test]
async fn no_records_is_not_found_and_a_removed_record_is_gone() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    let transport = transport();

    let err = within(
        10,
        lookup_proxies(&transport, dns.addr, "example.test", TIMEOUT),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SrvError::NotFound { .. }), "{err}");

    dns.add_srv(SRV_NAME, 1, 1, 443, "proxy.example.net", 300)
        .unwrap();
    let targets = within(
        10,
        lookup_proxies(&transport, dns.addr, "example.test", TIMEOUT),
    )
    .await
    .unwrap();
    assert_eq!(targets, [target("proxy.example.net", 443, 1, 1)]);

    dns.remove(SRV_NAME, RecordType::SRV);
    let err = within(
        10,
        lookup_proxies(&transport, dns.addr, "example.test", TIMEOUT),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SrvError::NotFound { .. }), "{err}");
    assert_eq!(dns.queries(), 3);
}

#[tokio::test]
async fn a_refusing_server_is_an_error() {
    init();
    let dns = TestDns::start("elsewhere.test").await.unwrap();
    let err = within(
        10,
        lookup_proxies(&transport(), dns.addr, "example.test", TIMEOUT),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SrvError::ServerError(_)), "{err}");
}

#[tokio::test]
async fn a_server_that_is_down_cannot_be_reached() {
    init();
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let err = within(
        10,
        lookup_proxies(&transport(), addr, "example.test", TIMEOUT),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SrvError::Connect { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_direct_the_srv_targets_resolve_through_the_named_server() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(
        pki.ca
            .issue(&["example.test"])
            .server_config(&[b"http/1.1"]),
    )
    .await
    .unwrap();
    let key_path = pki.dir().join("client.key");
    let key = make_key(&key_path).unwrap();
    let proxy = TestProxy::start(&pki, "srv.proxy.test", &format!("example.test {key}\n"))
        .await
        .unwrap();
    // The proxy's name exists only at this server, not in the system's resolver or /etc/hosts.
    let dns = TestDns::start("test.").await.unwrap();
    dns.add_srv(SRV_NAME, 10, 5, proxy.https.port(), "srv.proxy.test", 60)
        .unwrap();
    dns.add_a("srv.proxy.test", std::net::Ipv4Addr::LOCALHOST, 60)
        .unwrap();

    // No --proxy and no --resolve: both the SRV records and the target's address come from
    // --dns-server.
    let args: Vec<String> = [
        "example.test".to_owned(),
        origin.addr().to_string(),
        "--transport".into(),
        "direct".into(),
        "--srv".into(),
        "--dns-server".into(),
        dns.addr.to_string(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key_path.display().to_string(),
    ]
    .into();
    let mut client = Process::spawn(&binary("shroud"), &args).unwrap();
    client
        .wait_for_line("tunnel up", Duration::from_secs(30))
        .await
        .unwrap();
    let response = within(
        30,
        https_get(proxy.https, "example.test", pki.ca.root_store(), "/srv"),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
}
