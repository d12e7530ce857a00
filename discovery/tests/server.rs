//! The discovery service end to end on 127.0.0.1: lists, heartbeats and bounds, as a client or
//! a proxy sees them over HTTPS.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashSet;

use common::{entry, now_unix, within, TestService, SECRET, SERVICE_NAME};
use shroud_discovery::api;
use shroud_discovery::ratelimit::RateConfig;
use shroud_discovery::secret::FleetSecret;
use shroud_discovery::server::RequireCname;
use shroud_discovery::signed::{self, VerifyError};
use shroud_mux::auth::SecretKey;

fn four_proxies() -> Vec<signed::ProxyEntry> {
    vec![
        entry("eu1.proxy.test", 443, "eu"),
        entry("eu2.proxy.test", 443, "eu"),
        entry("us1.proxy.test", 443, "us"),
        entry("us2.proxy.test", 8443, "us"),
    ]
}

fn with_secret(config: &mut shroud_discovery::server::ServerConfig) {
    config.fleet_secret = Some(FleetSecret::new(SECRET.into()).unwrap());
}

#[tokio::test]
async fn list_verifies_with_the_pinned_key() {
    let service = TestService::start(four_proxies(), |c| c.max_proxies = 2).await;
    let pinned = service.signing_key.public();

    let response = service.get("/v1/proxies?host=Example.COM").await;
    assert_eq!(response.status, 200);
    let now = now_unix();
    let list = signed::verify(&response.body, &pinned, "example.com", now, None).unwrap();
    assert_eq!(list.host, "example.com");
    assert_eq!(list.expires_at - list.issued_at, 300);
    assert!(list.issued_at.abs_diff(now) <= 5);
    assert_eq!(list.proxies.len(), 2);
    let regions: HashSet<_> = list.proxies.iter().map(|p| p.region.as_str()).collect();
    assert_eq!(regions, HashSet::from(["eu", "us"]));

    // The same host gets the same proxies again.
    let again = service.get("/v1/proxies?host=example.com").await;
    let again = signed::verify(&again.body, &pinned, "example.com", now, None).unwrap();
    assert_eq!(again.proxies, list.proxies);

    // Another pinned key refuses it, and so does a verifier asking for another host.
    let other = SecretKey::from_seed(&[1; 32]).public();
    assert!(matches!(
        signed::verify(&response.body, &other, "example.com", now, None),
        Err(VerifyError::BadSignature)
    ));
    assert!(matches!(
        signed::verify(&response.body, &pinned, "example.org", now, None),
        Err(VerifyError::WrongHost { .. })
    ));

    // The client-side helper does the same over its own stream.
    let stream = service.connect().await;
    let fetched = within(api::fetch_list(
        stream,
        SERVICE_NAME,
        "example.com",
        &pinned,
        now_unix(),
        Some(list.issued_at),
        false,
    ))
    .await
    .unwrap();
    assert_eq!(fetched.proxies, list.proxies);

    service.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_statuses() {
    let service = TestService::start(four_proxies(), |_| {}).await;
    assert_eq!(service.get("/healthz").await.status, 200);
    assert_eq!(service.get("/v1/proxies").await.status, 400);
    assert_eq!(service.get("/v1/proxies?host=").await.status, 400);
    assert_eq!(service.get("/v1/proxies?host=bad%20name").await.status, 400);
    assert_eq!(
        service
            .get("/v1/proxies?host=a.test&host=b.test")
            .await
            .status,
        400
    );
    assert_eq!(service.get("/nowhere").await.status, 404);
    let wrong_method = service
        .request("POST", "/v1/proxies?host=a.test", &[], Some(b""))
        .await;
    assert_eq!(wrong_method.status, 405);
    assert_eq!(service.get("/v1/heartbeat").await.status, 405);

    // Heartbeats are refused outright when no fleet secret is configured.
    let response = service
        .heartbeat(SECRET, r#"{"name":"p.test","port":443,"region":"eu"}"#)
        .await;
    assert_eq!(response.status, 403);

    // Through the client helper, a list signed by another key than the pinned one is refused.
    let stream = service.connect().await;
    let err = api::fetch_list(
        stream,
        SERVICE_NAME,
        "example.com",
        &SecretKey::from_seed(&[1; 32]).public(),
        now_unix(),
        None,
        false,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, api::FetchError::Verify(VerifyError::BadSignature)),
        "{err:?}"
    );
    service.stop().await;
}

#[tokio::test]
async fn onion_endpoints_reach_only_the_clients_that_ask() {
    let onion = format!("{}:443", shroud_mux::onion::from_public_key(&[9; 32]));
    let mut listed = entry("static.proxy.test", 443, "eu");
    listed.onion = Some(onion.to_ascii_uppercase());
    // The fleet file's endpoint is normalised like names are.
    let mut file = shroud_discovery::fleet::FleetFile {
        proxy: vec![listed.into()],
    }
    .validate()
    .unwrap();
    let statics: Vec<_> = file.proxy.drain(..).map(|p| p.entry()).collect();
    assert_eq!(statics[0].onion.as_deref(), Some(onion.as_str()));
    let service = TestService::start(statics, with_secret).await;
    let pinned = service.signing_key.public();

    // A proxy announces its onion endpoint with its heartbeat; a malformed one is refused.
    let beat =
        format!(r#"{{"name":"live.proxy.test","port":443,"region":"us","onion":"{onion}"}}"#);
    assert_eq!(service.heartbeat(SECRET, &beat).await.status, 204);
    let bad = r#"{"name":"bad.proxy.test","port":443,"region":"us","onion":"bad.onion:443"}"#;
    assert_eq!(service.heartbeat(SECRET, bad).await.status, 400);

    // A client that asks gets both entries with their endpoints, signed like any list.
    let stream = service.connect().await;
    let list = within(api::fetch_list(
        stream,
        SERVICE_NAME,
        "example.com",
        &pinned,
        now_unix(),
        None,
        true,
    ))
    .await
    .unwrap();
    assert_eq!(list.proxies.len(), 2);
    for entry in &list.proxies {
        assert_eq!(entry.onion.as_deref(), Some(onion.as_str()), "{entry:?}");
    }

    // One that does not ask (every client before onion endpoints existed) gets none: its
    // parser refuses fields it does not know.
    let plain = service.get("/v1/proxies?host=example.com").await;
    assert_eq!(plain.status, 200);
    let payload = signed::verify(&plain.body, &pinned, "example.com", now_unix(), None).unwrap();
    assert!(payload.proxies.iter().all(|entry| entry.onion.is_none()));

    service.stop().await;
}

#[tokio::test]
async fn heartbeats_add_and_leaving_removes() {
    let service = TestService::start(vec![], with_secret).await;
    let pinned = service.signing_key.public();

    // No proxy yet.
    let response = service.get("/v1/proxies?host=example.com").await;
    assert_eq!(response.status, 404);
    assert!(String::from_utf8_lossy(&response.body).contains("no healthy proxy"));

    // Through the client helper, the 404 is an error carrying the service's text.
    let err = api::fetch_list(
        service.connect().await,
        SERVICE_NAME,
        "example.com",
        &pinned,
        now_unix(),
        None,
        false,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, api::FetchError::Status { status: 404, message } if message.contains("no healthy proxy")),
        "{err:?}"
    );

    // A wrong secret, a missing one, a malformed entry.
    let beat = r#"{"name":"P1.proxy.test","port":443,"region":"eu","leaving":false}"#;
    assert_eq!(
        service
            .heartbeat("wrong-secret-0123456789", beat)
            .await
            .status,
        401
    );
    let unauthenticated = service
        .request("POST", "/v1/heartbeat", &[], Some(beat.as_bytes()))
        .await;
    assert_eq!(unauthenticated.status, 401);
    assert_eq!(
        service.get("/v1/proxies?host=example.com").await.status,
        404
    );
    for bad in [
        r#"{"name":"bad name","port":443,"region":"eu"}"#,
        r#"{"name":"p.test","port":0,"region":"eu"}"#,
        r#"{"name":"p.test","port":443,"region":""}"#,
        r#"{"name":"p.test","port":443,"region":"eu","extra":1}"#,
        "not json",
    ] {
        assert_eq!(service.heartbeat(SECRET, bad).await.status, 400, "{bad}");
    }

    // The right secret: the proxy is listed, its name normalised.
    assert_eq!(service.heartbeat(SECRET, beat).await.status, 204);
    let second = r#"{"name":"p2.proxy.test","port":443,"region":"us"}"#;
    assert_eq!(service.heartbeat(SECRET, second).await.status, 204);
    let response = service.get("/v1/proxies?host=example.com").await;
    assert_eq!(response.status, 200);
    let list = signed::verify(&response.body, &pinned, "example.com", now_unix(), None).unwrap();
    let names: HashSet<_> = list.proxies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, HashSet::from(["p1.proxy.test", "p2.proxy.test"]));

    // Leaving removes it at once.
    let leave = r#"{"name":"p1.proxy.test","port":443,"region":"eu","leaving":true}"#;
    assert_eq!(service.heartbeat(SECRET, leave).await.status, 204);
    let response = service.get("/v1/proxies?host=example.com").await;
    let list = signed::verify(&response.body, &pinned, "example.com", now_unix(), None).unwrap();
    let names: Vec<_> = list.proxies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["p2.proxy.test"]);

    service.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused() {
    let service = TestService::start(vec![], with_secret).await;
    let padding = "x".repeat(api::MAX_REQUEST_BODY);
    let big = format!(r#"{{"name":"p.test","port":443,"region":"{padding}"}}"#);
    let response = service.heartbeat(SECRET, &big).await;
    assert_eq!(response.status, 413);
    assert_eq!(
        service.get("/v1/proxies?host=example.com").await.status,
        404
    );

    // An oversized head is refused by hyper without reaching the handler.
    let huge = "y".repeat(20_000);
    let stream = service.connect().await;
    let result = shroud_discovery::http::request(
        stream,
        "GET",
        SERVICE_NAME,
        "/healthz",
        &[("X-Huge", &huge)],
        None,
        1024,
    )
    .await;
    match result {
        Ok(response) => assert_eq!(response.status, 431),
        // hyper may close the connection instead of answering.
        Err(err) => eprintln!("oversized head: {err}"),
    }
    service.stop().await;
}

#[tokio::test]
async fn rate_limit_answers_429() {
    let service = TestService::start(four_proxies(), |c| {
        c.limits.rate = RateConfig {
            burst: 3,
            per_second: 0.001,
            max_addresses: 16,
        };
    })
    .await;
    for _ in 0..3 {
        assert_eq!(service.get("/healthz").await.status, 200);
    }
    let limited = service.get("/v1/proxies?host=example.com").await;
    assert_eq!(limited.status, 429);
    service.stop().await;
}

// The clock is paused so the resolver's timeouts pass at once; every socket here is loopback,
// whose data is ready before the runtime would advance the clock.
#[tokio::test(start_paused = true)]
async fn refuses_the_list_when_dns_cannot_be_asked() {
    // A port nobody answers on: the lookup times out, and the answer is 503, not a list.
    let closed = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let service = TestService::start(four_proxies(), |c| {
        c.require_cname = Some(RequireCname {
            domain: "fleet.test".into(),
            dns_servers: vec![closed],
        });
    })
    .await;
    let response = within(service.get("/v1/proxies?host=example.com")).await;
    assert_eq!(
        response.status,
        503,
        "{:?}",
        String::from_utf8_lossy(&response.body)
    );
    service.stop().await;
}

// Paused, as above: the CNAME check of the name outside the zone times out at once.
#[tokio::test(start_paused = true)]
async fn names_in_the_services_own_zone_need_no_cname() {
    let closed = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let (udp, tcp) = shroud_discovery::dns::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let service = TestService::start(four_proxies(), |c| {
        c.require_cname = Some(RequireCname {
            domain: "fleet.test".into(),
            dns_servers: vec![closed],
        });
        c.dns = Some(shroud_discovery::server::DnsService {
            zone: shroud_discovery::dns::DnsZone::new("fleet.test", &["ns.example".into()], 30, 3)
                .unwrap(),
            udp,
            tcp,
        });
    })
    .await;
    // A word name (or any name) inside the zone the service answers already resolves to the
    // fleet: listed without asking DNS.
    let inside = within(service.get("/v1/proxies?host=grove-tundra-wink-ember.fleet.test")).await;
    assert_eq!(inside.status, 200);
    // Outside it, the CNAME is still required (and here cannot be checked).
    let outside = within(service.get("/v1/proxies?host=example.com")).await;
    assert_eq!(outside.status, 503);
    let lookalike = within(service.get("/v1/proxies?host=evilfleet.test")).await;
    assert_eq!(lookalike.status, 503, "a suffix is not the zone");
    service.stop().await;
}

#[tokio::test]
async fn shutdown_stops_the_service() {
    let service = TestService::start(four_proxies(), |_| {}).await;
    assert_eq!(service.get("/healthz").await.status, 200);
    let addr = service.addr;
    service.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
