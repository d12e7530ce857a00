//! Tests of the end-to-end harness itself, without shroud: visitors talk to
//! origins directly (or through a deliberately faulty relay), so a failure
//! here is the harness's fault, never the tunnel's.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use shroud_tests::bulk::{BulkError, Direction};
use shroud_tests::load::{Load, LoadSpec, Request};
use shroud_tests::{
    bulk_transfer, http_get, https_get, init, raw_http, tls_connect, within, BulkOrigin,
    EchoOrigin, HttpOrigin, SilentOrigin, TestCa,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1024 * 1024;

/// Whether `err` is, somewhere in its chain, rustls rejecting a certificate.
fn is_certificate_rejection(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let rustls_err = cause.downcast_ref::<rustls::Error>().or_else(|| {
            cause
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        matches!(rustls_err, Some(rustls::Error::InvalidCertificate(_)))
    })
}

#[tokio::test]
async fn tls_echo_verifies_certificate() -> anyhow::Result<()> {
    init();
    let ca = TestCa::new("selftest CA");
    let leaf = ca.issue(&["echo.test", "alt.echo.test"]);
    let origin = EchoOrigin::tls(leaf.server_config(&[])).await?;

    let mut stream = within(
        10,
        tls_connect(origin.addr(), "alt.echo.test", ca.root_store()),
    )
    .await?;
    let peer_certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    assert_eq!(peer_certs.first(), Some(&leaf.cert_der));

    stream.write_all(b"hello through TLS").await?;
    stream.shutdown().await?;
    let mut echoed = Vec::new();
    within(10, stream.read_to_end(&mut echoed)).await?;
    assert_eq!(echoed, b"hello through TLS");
    assert_eq!(origin.accepted(), 1);
    Ok(())
}

#[tokio::test]
async fn tls_connect_rejects_wrong_name_and_unknown_ca() -> anyhow::Result<()> {
    init();
    let ca = TestCa::new("selftest CA");
    let origin = EchoOrigin::tls(ca.issue(&["echo.test"]).server_config(&[])).await?;

    let wrong_name = within(
        10,
        tls_connect(origin.addr(), "other.test", ca.root_store()),
    )
    .await;
    match wrong_name {
        Ok(_) => anyhow::bail!("a certificate for echo.test was accepted for other.test"),
        Err(err) => assert!(is_certificate_rejection(&err), "unexpected error: {err:#}"),
    }

    let stranger = TestCa::new("some other CA");
    let wrong_ca = within(
        10,
        tls_connect(origin.addr(), "echo.test", stranger.root_store()),
    )
    .await;
    match wrong_ca {
        Ok(_) => anyhow::bail!("a certificate from an untrusted CA was accepted"),
        Err(err) => assert!(is_certificate_rejection(&err), "unexpected error: {err:#}"),
    }
    Ok(())
}

#[tokio::test]
async fn plain_echo_follows_half_close() -> anyhow::Result<()> {
    init();
    let origin = EchoOrigin::plain().await?;
    let stream = TcpStream::connect(origin.addr()).await?;
    let (mut reader, mut writer) = stream.into_split();

    // More than socket buffers hold, so the echo must keep flowing while we write.
    let payload: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
    let sent = payload.clone();
    let write = async move {
        writer.write_all(&sent).await?;
        // Half-close: we send no more, but must still receive everything.
        writer.shutdown().await?;
        anyhow::Ok(writer)
    };
    let read = async {
        let mut echoed = Vec::new();
        reader.read_to_end(&mut echoed).await?;
        anyhow::Ok(echoed)
    };
    let (_writer, echoed) = within(30, async { tokio::try_join!(write, read) }).await?;
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed bytes differ");
    Ok(())
}

#[tokio::test]
async fn http_origin_answers_plain_and_tls() -> anyhow::Result<()> {
    init();
    let plain = HttpOrigin::plain().await?;
    let resp = within(10, http_get(plain.addr(), "site.test", "/hello?x=1")).await?;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), "hello from origin: GET /hello?x=1\n");
    assert_eq!(resp.header("x-origin"), Some("test"));
    assert_eq!(resp.header("connection"), Some("close"));

    let ca = TestCa::new("selftest CA");
    let tls = HttpOrigin::tls(ca.issue(&["site.test"]).server_config(&[b"http/1.1"])).await?;
    let resp = within(
        10,
        https_get(tls.addr(), "site.test", ca.root_store(), "/secure"),
    )
    .await?;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), "hello from origin: GET /secure\n");
    assert_eq!(tls.accepted(), 1);
    Ok(())
}

#[tokio::test]
async fn http_origin_handles_odd_requests() -> anyhow::Result<()> {
    init();
    let origin = HttpOrigin::plain().await?;

    let post = b"POST /submit HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello";
    let resp = within(10, raw_http(origin.addr(), post)).await?;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_text(), "hello from origin: POST /submit\n");

    let head = b"HEAD / HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let resp = within(10, raw_http(origin.addr(), head)).await?;
    assert_eq!(resp.status, 200);
    assert!(resp.body.is_empty());
    let would_be = "hello from origin: HEAD /\n".len().to_string();
    assert_eq!(resp.header("content-length"), Some(would_be.as_str()));

    let garbage = b"NONSENSE\r\n\r\n";
    let resp = within(10, raw_http(origin.addr(), garbage)).await?;
    assert_eq!(resp.status, 400);

    let mut huge = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
    huge.resize(20 * 1024, b'a');
    huge.extend_from_slice(b"\r\n\r\n");
    let resp = within(10, raw_http(origin.addr(), &huge)).await?;
    assert_eq!(resp.status, 431);
    assert_eq!(origin.accepted(), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_direct_plain_and_tls() -> anyhow::Result<()> {
    init();
    let origin = BulkOrigin::plain().await?;
    let stream = TcpStream::connect(origin.addr()).await?;
    within(60, bulk_transfer(stream, 8 * MIB)).await?;

    // Lengths that do not fill whole buffers, and nothing at all.
    for n in [0, 1, 65_537] {
        let stream = TcpStream::connect(origin.addr()).await?;
        within(10, bulk_transfer(stream, n)).await?;
    }

    let ca = TestCa::new("selftest CA");
    let tls = BulkOrigin::tls(ca.issue(&["bulk.test"]).server_config(&[])).await?;
    let stream = within(10, tls_connect(tls.addr(), "bulk.test", ca.root_store())).await?;
    within(60, bulk_transfer(stream, 4 * MIB)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_of_paced_bulk_requests_checks_every_byte() -> anyhow::Result<()> {
    init();
    let ca = TestCa::new("selftest CA");
    let origin = BulkOrigin::tls(ca.issue(&["bulk.test"]).server_config(&[])).await?;
    // Pieces that do not divide the length, so the last one is short.
    let (bytes, chunk) = (10_000, 3_000);
    let load = Load::start(LoadSpec {
        request: Request::PacedBulk {
            bytes,
            chunk,
            tick: Duration::from_millis(5),
        },
        ..LoadSpec::get(vec![origin.addr()], "bulk.test", ca.root_store(), 20)
    });
    load.wait_ok(3, Duration::from_secs(20)).await?;
    let result = within(20, load.stop()).await;
    assert_eq!(result.failed() + result.unreachable, 0, "{result}");
    assert_eq!(result.bytes_verified, result.ok() * 2 * bytes, "{result}");
    Ok(())
}

/// What a [`faulty_relay`] does to the bytes it forwards.
#[derive(Clone, Copy)]
enum Fault {
    /// Flip one bit of the byte at this offset.
    Flip(u64),
    /// Forward this many bytes, then end the stream.
    Cut(u64),
}

/// Forwards `reader` to `writer`, applying `fault` if given.
async fn forward<R, W>(mut reader: R, mut writer: W, fault: Option<Fault>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        let mut n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let end = offset + n as u64;
        match fault {
            Some(Fault::Flip(at)) if (offset..end).contains(&at) => {
                buf[(at - offset) as usize] ^= 0x01;
            }
            Some(Fault::Cut(at)) if end >= at => {
                n = (at - offset) as usize;
                writer.write_all(&buf[..n]).await?;
                break;
            }
            _ => {}
        }
        writer.write_all(&buf[..n]).await?;
        offset = end;
    }
    writer.shutdown().await
}

/// A one-connection relay to `target` that damages one direction.
async fn faulty_relay(
    target: SocketAddr,
    direction: Direction,
    fault: Fault,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let relay = async {
            let (visitor, _) = listener.accept().await?;
            let origin = TcpStream::connect(target).await?;
            let (visitor_r, visitor_w) = visitor.into_split();
            let (origin_r, origin_w) = origin.into_split();
            let (up, down) = match direction {
                Direction::VisitorToOrigin => (Some(fault), None),
                Direction::OriginToVisitor => (None, Some(fault)),
            };
            tokio::try_join!(
                forward(visitor_r, origin_w, up),
                forward(origin_r, visitor_w, down)
            )?;
            io::Result::Ok(())
        };
        if let Err(err) = relay.await {
            // Expected once the visitor gives up on a damaged stream.
            tracing::debug!(%err, "faulty relay ended");
        }
    });
    Ok(addr)
}

async fn bulk_through(relay: SocketAddr, n: u64) -> anyhow::Result<BulkError> {
    let stream = TcpStream::connect(relay).await?;
    match within(30, bulk_transfer(stream, n)).await {
        Ok(()) => anyhow::bail!("bulk transfer passed through a faulty relay"),
        Err(err) => err
            .downcast_ref::<BulkError>()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("expected a BulkError, got: {err:#}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_detects_damage() -> anyhow::Result<()> {
    init();
    let origin = BulkOrigin::plain().await?;
    let n = 2 * MIB;

    // Past the 8-byte length, inside the payload.
    let relay = faulty_relay(
        origin.addr(),
        Direction::VisitorToOrigin,
        Fault::Flip(1_000_003),
    )
    .await?;
    let err = bulk_through(relay, n).await?;
    assert_eq!(
        err,
        BulkError::Corrupted {
            direction: Direction::VisitorToOrigin,
            offset: None
        }
    );

    let relay = faulty_relay(
        origin.addr(),
        Direction::OriginToVisitor,
        Fault::Flip(777_777),
    )
    .await?;
    let err = bulk_through(relay, n).await?;
    assert_eq!(
        err,
        BulkError::Corrupted {
            direction: Direction::OriginToVisitor,
            offset: Some(777_777)
        }
    );

    let relay = faulty_relay(
        origin.addr(),
        Direction::OriginToVisitor,
        Fault::Cut(123_456),
    )
    .await?;
    let err = bulk_through(relay, n).await?;
    assert_eq!(
        err,
        BulkError::Truncated {
            direction: Direction::OriginToVisitor,
            received: 123_456,
            expected: n
        }
    );
    Ok(())
}

#[tokio::test]
async fn silent_origin_holds_connections_until_shut_down() -> anyhow::Result<()> {
    init();
    let origin = SilentOrigin::plain().await?;
    let addr = origin.addr();
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(b"anyone there?").await?;
    within(10, origin.wait_accepted(1)).await;
    let mut buf = [0u8; 16];
    match stream.try_read(&mut buf) {
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
        other => anyhow::bail!("silent origin produced {other:?}"),
    }

    within(10, origin.shutdown()).await;
    // The held connection is closed (with a reset, as our bytes went unread)...
    match within(10, stream.read(&mut buf)).await {
        Ok(0) => {}
        Err(err) if err.kind() == io::ErrorKind::ConnectionReset => {}
        other => anyhow::bail!("expected the connection to close, got {other:?}"),
    }
    // ...and the listener is gone.
    assert!(TcpStream::connect(addr).await.is_err());
    Ok(())
}

#[test]
fn pki_files_round_trip() -> anyhow::Result<()> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let ca = TestCa::new("selftest CA");
    let leaf = ca.issue(&["files.test", "127.0.0.1"]);
    let dir = tempfile::tempdir()?;

    let (cert_path, key_path) = leaf.write_files(dir.path(), "files")?;
    assert_eq!(CertificateDer::from_pem_file(&cert_path)?, leaf.cert_der);
    assert_eq!(
        PrivateKeyDer::from_pem_file(&key_path)?.secret_der(),
        leaf.key_der.secret_der()
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_path)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let ca_path = ca.write_pem(dir.path(), "ca")?;
    assert_eq!(CertificateDer::from_pem_file(&ca_path)?, ca.cert_der());
    assert_eq!(ca.cert_pem(), std::fs::read_to_string(&ca_path)?);

    let copy = leaf.clone();
    assert_eq!(copy.key_der().secret_der(), leaf.key_der.secret_der());
    assert!(!format!("{leaf:?}").contains(&leaf.key_pem));
    Ok(())
}

#[tokio::test]
#[should_panic(expected = "did not finish within 0s")]
async fn within_panics_on_deadline() {
    within(0, std::future::pending::<()>()).await;
}

/// The full-size transfer the end-to-end tests run through shroud, done
/// directly: the harness alone must stay cheap (well under a second in a
/// debug build) so that such tests time the tunnel, not the harness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_256_mib_direct() -> anyhow::Result<()> {
    init();
    let origin = BulkOrigin::plain().await?;
    let stream = TcpStream::connect(origin.addr()).await?;
    let started = std::time::Instant::now();
    within(600, bulk_transfer(stream, 256 * MIB)).await?;
    eprintln!("256 MiB each way in {:?}", started.elapsed());
    Ok(())
}
