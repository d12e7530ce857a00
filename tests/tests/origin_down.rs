//! A hidden origin that goes down, hangs, or comes back: its visitors get a 502 or a prompt
//! close, never a hang; other visitors are not held up; and the tunnel never notices.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use shroud_client::shared::TunnelState;
use shroud_client::transport::{BoxStream, DirectTransport, Resolve, Transport};
use shroud_tests::stack::{authorize, ClientSpec, Pki, TestClient, TestProxy};
use shroud_tests::{
    client_config, http_get, https_get, init, tls_connect, within, HttpOrigin, SilentOrigin,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

const HOST: &str = "example.test";
const PROXY: &str = "proxy.test";
/// What the client answers a plain-HTTP visitor whose origin cannot be reached.
const BAD_GATEWAY_BODY: &str = "the origin server is not reachable.\n";

/// The direct transport, counting the connections it makes to proxies: a tunnel that stays
/// up makes exactly one.
struct CountingTransport {
    inner: DirectTransport,
    connects: AtomicUsize,
}

impl Transport for CountingTransport {
    fn connect<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<BoxStream>> + Send + 'a>> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.inner.connect(host, port)
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

/// A proxy, and a client bound to it that publishes HOST with `target` for TLS visitors and
/// `http_target` for plain-HTTP ones.
struct Published {
    proxy: TestProxy,
    client: TestClient,
    transport: Arc<CountingTransport>,
}

impl Published {
    async fn start(pki: &Pki, target: SocketAddr, http_target: SocketAddr) -> Self {
        let mut spec = ClientSpec::new(HOST, target, vec![]);
        spec.http_target = Some(http_target);
        let proxy = TestProxy::start(pki, PROXY, &authorize(HOST, &spec.key))
            .await
            .unwrap();
        spec.proxies = vec![proxy.dial()];
        let mut resolve = Resolve::new();
        resolve.insert(PROXY, proxy.https.port(), proxy.https.ip());
        let transport = Arc::new(CountingTransport {
            inner: DirectTransport::new(resolve, spec.timing.connect_timeout),
            connects: AtomicUsize::new(0),
        });
        let mut client = TestClient::start_with_transport(pki, spec, transport.clone()).unwrap();
        within(20, client.wait_bound(1)).await;
        Self {
            proxy,
            client,
            transport,
        }
    }

    /// The tunnel is bound, and it is still the first one: nothing the origin did reached it.
    #[track_caller]
    fn assert_tunnel_untouched(&self) {
        let states = self.client.client.states();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].1, TunnelState::Bound);
        assert_eq!(self.transport.connects.load(Ordering::SeqCst), 1);
    }
}

/// An origin started again at `addr`, the address an earlier one had: it answers every request
/// `200` with the body `back\n`, over TLS if `tls` is given. Stops when the handle is dropped.
struct Restarted(JoinHandle<()>);

impl Restarted {
    fn start(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = shroud_proxy::server::bind_listener(addr).unwrap();
        let tls = tls.map(TlsAcceptor::from);
        Self(tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tls = tls.clone();
                tokio::spawn(async move {
                    let served = match tls {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(stream) => answer_back(stream).await,
                            Err(err) => Err(err),
                        },
                        None => answer_back(stream).await,
                    };
                    if let Err(err) = served {
                        tracing::debug!(%err, "restarted origin: connection failed");
                    }
                });
            }
        }))
    }
}

impl Drop for Restarted {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads a request head and answers it.
async fn answer_back<S>(mut stream: S) -> io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let response = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nback\n";
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_is_down_gets_visitors_a_502_or_a_close_until_it_is_back_on_its_port() {
    init();
    let pki = Pki::new().unwrap();
    let tls_origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let http_origin = HttpOrigin::plain().await.unwrap();
    let (tls_addr, http_addr) = (tls_origin.addr(), http_origin.addr());
    let published = Published::start(&pki, tls_addr, http_addr).await;
    let proxy = &published.proxy;
    let roots = || pki.ca.root_store();
    let up = within(20, https_get(proxy.https, HOST, roots(), "/")).await;
    assert_eq!(up.unwrap().status, 200);
    let up = within(20, http_get(proxy.http, HOST, "/")).await;
    assert_eq!(up.unwrap().status, 200);

    // Both origins stop: connecting to them is refused from now on.
    within(10, tls_origin.shutdown()).await;
    within(10, http_origin.shutdown()).await;
    for round in 0..3 {
        // Plain HTTP: the client answers 502 itself, at once.
        let response = within(5, http_get(proxy.http, HOST, &format!("/down/{round}")))
            .await
            .unwrap();
        assert_eq!(response.status, 502);
        assert_eq!(response.body_text(), BAD_GATEWAY_BODY);
        // TLS: the client cannot answer inside the visitor's TLS; the connection closes at
        // once, mid-handshake.
        let tls = within(5, tls_connect(proxy.https, HOST, roots())).await;
        assert!(tls.is_err(), "a TLS handshake completed with no origin");
    }
    published.assert_tunnel_untouched();

    // The origins come back on the same ports; visitors reach them again, on the same tunnel.
    let _tls_back = Restarted::start(tls_addr, Some(pki.origin_tls(&[HOST])));
    let _http_back = Restarted::start(http_addr, None);
    let response = within(20, https_get(proxy.https, HOST, roots(), "/"))
        .await
        .unwrap();
    assert_eq!((response.status, &*response.body_text()), (200, "back\n"));
    let response = within(20, http_get(proxy.http, HOST, "/")).await.unwrap();
    assert_eq!((response.status, &*response.body_text()), (200, "back\n"));
    published.assert_tunnel_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_never_answers_holds_up_only_its_own_visitors() {
    init();
    let pki = Pki::new().unwrap();
    // TLS visitors go to an origin that accepts and never answers; plain-HTTP visitors to one
    // that answers. Both share the one tunnel.
    let silent = SilentOrigin::plain().await.unwrap();
    let answering = HttpOrigin::plain().await.unwrap();
    let published = Published::start(&pki, silent.addr(), answering.addr()).await;
    let proxy = &published.proxy;

    let hello =
        shroud_tests::scale::client_hello(client_config(pki.ca.root_store(), &[]), HOST).unwrap();
    let mut held = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(proxy.https).await.unwrap();
        stream.write_all(&hello).await.unwrap();
        held.push(stream);
    }
    within(20, silent.wait_accepted(50)).await;

    for i in 0..10 {
        let response = within(5, http_get(proxy.http, HOST, &format!("/meanwhile/{i}")))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
    }
    // The silent origin's visitors are still waiting: open, and answered nothing.
    for stream in &held {
        let mut buf = [0u8; 1];
        let read = stream.try_read(&mut buf);
        assert!(
            matches!(&read, Err(err) if err.kind() == io::ErrorKind::WouldBlock),
            "{read:?}"
        );
    }

    // When that origin goes, its visitors' connections end promptly, and new ones are closed.
    within(10, silent.shutdown()).await;
    for mut stream in held {
        let mut rest = Vec::new();
        // A close or a reset: either way, no hang.
        let _ = within(5, stream.read_to_end(&mut rest)).await;
        assert!(rest.is_empty());
    }
    let tls = within(5, tls_connect(proxy.https, HOST, pki.ca.root_store())).await;
    assert!(tls.is_err(), "a TLS handshake completed with no origin");
    published.assert_tunnel_untouched();
}
