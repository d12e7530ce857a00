//! A proxy's announcer: against a recording HTTPS server, and against the real service.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{entry, within, Pki, TestService, SECRET};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use shroud_discovery::announce::{self, AnnounceError, DiscoveryUrl, Endpoint, Presence};
use shroud_discovery::api::Heartbeat;
use shroud_discovery::secret::FleetSecret;
use shroud_discovery::server;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the recording server saw of one request.
#[derive(Debug)]
struct Seen {
    path: String,
    authorization: String,
    heartbeat: Heartbeat,
}

/// An HTTPS server that sends every request it gets down a channel and answers the statuses
/// in `answers` in turn (then 204).
async fn recording_server(pki: &Pki, answers: Vec<u16>) -> (u16, mpsc::UnboundedReceiver<Seen>) {
    let tls = server::tls_config(&pki.cert, &pki.key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    let answers = Arc::new(answers);
    let count = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(stream) = acceptor.accept(tcp).await else {
                continue;
            };
            let (tx, answers, count) = (tx.clone(), answers.clone(), count.clone());
            let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (tx, answers, count) = (tx.clone(), answers.clone(), count.clone());
                async move {
                    let path = request.uri().path().to_owned();
                    let authorization = request
                        .headers()
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_owned())
                        .unwrap_or_default();
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let heartbeat: Heartbeat = serde_json::from_slice(&body).unwrap();
                    let _ = tx.send(Seen {
                        path,
                        authorization,
                        heartbeat,
                    });
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let status = answers.get(n).copied().unwrap_or(204);
                    let mut response = Response::new(Full::new(Bytes::from_static(b"nope")));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    (port, rx)
}

/// Proxies name the service by hostname; the test certificate also names 127.0.0.1, so the
/// announcer can dial loopback without a resolver override and still check the certificate.
fn loopback_url(port: u16) -> DiscoveryUrl {
    format!("https://127.0.0.1:{port}").parse().unwrap()
}

#[tokio::test]
async fn registers_at_once_and_leaves_on_shutdown() {
    let pki = Pki::new();
    let (port, mut seen) = recording_server(&pki, vec![]).await;
    let shutdown = CancellationToken::new();
    let proxy = entry("p1.proxy.test", 443, "eu");
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        let tls = pki.client_tls();
        let proxy = proxy.clone();
        async move {
            announce::run(
                &Endpoint::new(loopback_url(port), tls),
                FleetSecret::new(SECRET.into()).unwrap(),
                &Presence::new(proxy),
                Duration::from_secs(3600),
                shutdown,
            )
            .await;
        }
    });

    let first = within(seen.recv()).await.unwrap();
    assert_eq!(first.path, "/v1/heartbeat");
    assert_eq!(first.authorization, format!("Bearer {SECRET}"));
    assert_eq!(first.heartbeat, Heartbeat::new(&proxy, false));

    shutdown.cancel();
    let last = within(seen.recv()).await.unwrap();
    assert!(last.heartbeat.leaving);
    assert_eq!(last.heartbeat.name, "p1.proxy.test");
    within(task).await.unwrap();
}

#[tokio::test]
async fn failures_are_retried_on_the_next_tick() {
    let pki = Pki::new();
    let (port, mut seen) = recording_server(&pki, vec![500, 401]).await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        let tls = pki.client_tls();
        async move {
            announce::run(
                &Endpoint::new(loopback_url(port), tls),
                FleetSecret::new(SECRET.into()).unwrap(),
                &Presence::new(entry("p1.proxy.test", 443, "eu")),
                Duration::from_millis(20),
                shutdown,
            )
            .await;
        }
    });
    for _ in 0..3 {
        let beat = within(seen.recv()).await.unwrap();
        assert!(!beat.heartbeat.leaving);
    }
    shutdown.cancel();
    within(task).await.unwrap();
}

#[tokio::test]
async fn heartbeats_reach_the_real_service() {
    let service = TestService::start(vec![], |c| {
        c.fleet_secret = Some(FleetSecret::new(SECRET.into()).unwrap());
    })
    .await;
    let url = loopback_url(service.addr.port());
    let endpoint = Endpoint::new(url.clone(), service.pki.client_tls());
    let secret = FleetSecret::new(SECRET.into()).unwrap();
    let proxy = entry("p1.proxy.test", 443, "eu");

    announce::send_heartbeat(&endpoint, &secret, &Heartbeat::new(&proxy, false))
        .await
        .unwrap();
    assert_eq!(
        service.get("/v1/proxies?host=example.com").await.status,
        200
    );

    let wrong = FleetSecret::new("not-the-fleet-secret-at-all".into()).unwrap();
    let err = announce::send_heartbeat(&endpoint, &wrong, &Heartbeat::new(&proxy, false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, AnnounceError::Status { status: 401, .. }),
        "{err:?}"
    );

    announce::send_heartbeat(&endpoint, &secret, &Heartbeat::new(&proxy, true))
        .await
        .unwrap();
    assert_eq!(
        service.get("/v1/proxies?host=example.com").await.status,
        404
    );

    // A service whose certificate the announcer does not trust is refused.
    let untrusting = Endpoint::new(url, announce::client_tls(None).unwrap());
    let err = announce::send_heartbeat(&untrusting, &secret, &Heartbeat::new(&proxy, false))
        .await
        .unwrap_err();
    assert!(matches!(err, AnnounceError::Tls(_)), "{err:?}");

    service.stop().await;
}

#[tokio::test]
async fn a_change_of_names_sends_a_heartbeat_at_once_carrying_them() {
    let pki = Pki::new();
    let (port, mut seen) = recording_server(&pki, vec![]).await;
    let shutdown = CancellationToken::new();
    let names = Arc::new(std::sync::Mutex::new(vec!["one.example".to_owned()]));
    let (changed, changes) = tokio::sync::watch::channel(0u64);
    let presence = Presence {
        entry: entry("p1.proxy.test", 443, "eu"),
        addrs: vec!["192.0.2.10".parse().unwrap()],
        names: Box::new({
            let names = names.clone();
            move || names.lock().unwrap().clone()
        }),
        changes: Some(changes),
        peer: None,
        on_peers: None,
    };
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        let tls = pki.client_tls();
        async move {
            // An interval far longer than the test: only a change can send the second beat.
            let endpoint = Endpoint::new(loopback_url(port), tls);
            let secret = FleetSecret::new(SECRET.into()).unwrap();
            announce::run(
                &endpoint,
                secret,
                &presence,
                Duration::from_secs(3600),
                shutdown,
            )
            .await;
        }
    });

    let first = within(seen.recv()).await.unwrap();
    assert_eq!(first.heartbeat.names, ["one.example"]);
    assert_eq!(
        first.heartbeat.addrs,
        ["192.0.2.10".parse::<std::net::IpAddr>().unwrap()]
    );

    names.lock().unwrap().push("two.example".into());
    changed.send_modify(|n| *n += 1);
    let started = std::time::Instant::now();
    let second = within(seen.recv()).await.unwrap();
    assert_eq!(second.heartbeat.names, ["one.example", "two.example"]);
    // At most one heartbeat a MIN_SPACING: it waited for the spacing, not the interval.
    let waited = started.elapsed();
    assert!(
        waited < announce::MIN_SPACING + Duration::from_secs(2),
        "{waited:?}"
    );

    // Leaving says nothing of names.
    shutdown.cancel();
    let last = within(seen.recv()).await.unwrap();
    assert!(last.heartbeat.leaving && last.heartbeat.names.is_empty());
    within(task).await.unwrap();
}
