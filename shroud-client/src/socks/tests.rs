//! The proxy for local programs over real TCP on 127.0.0.1, with a stand-in for Tor that
//! records what it was asked and echoes bytes back.

use std::sync::Mutex;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// What the stand-in for Tor does with a connection.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Opens a stream that echoes every byte.
    Echo,
    /// Fails with this reply.
    Fail(Reply),
    /// Never answers.
    Hang,
}

/// Records every destination asked for, with its isolation.
struct FakeTor {
    behaviour: Behaviour,
    asked: Mutex<Vec<DestinationIsolation>>,
}

impl FakeTor {
    fn new(behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            behaviour,
            asked: Mutex::new(Vec::new()),
        })
    }

    fn asked(&self) -> Vec<DestinationIsolation> {
        self.asked.lock().unwrap().clone()
    }
}

impl Outbound for FakeTor {
    fn connect<'a>(
        &'a self,
        _destination: &'a Destination,
        isolation: DestinationIsolation,
    ) -> BoxFuture<'a, Result<BoxStream, OutboundError>> {
        self.asked.lock().unwrap().push(isolation);
        let behaviour = self.behaviour;
        Box::pin(async move {
            match behaviour {
                Behaviour::Echo => {
                    let (near, mut far) = tokio::io::duplex(1024);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = far.read(&mut buf).await {
                            if n == 0 || far.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    Ok(Box::new(near) as BoxStream)
                }
                Behaviour::Fail(reply) => Err(OutboundError {
                    reply,
                    message: "refused by the stand-in".into(),
                }),
                Behaviour::Hang => std::future::pending().await,
            }
        })
    }
}

/// A proxy on 127.0.0.1 serving through `tor`; stops when the guard drops.
async fn start(
    tor: Arc<FakeTor>,
    options: SocksOptions,
) -> (SocketAddr, tokio_util::sync::DropGuard) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(listener, tor, options, shutdown.clone()));
    (addr, shutdown.drop_guard())
}

/// A SOCKS5 CONNECT without authentication; returns the connection and the reply code.
async fn socks5(proxy: SocketAddr, atyp: u8, addr: &[u8], port: u16) -> (TcpStream, u8) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let mut request = vec![5, 1, 0, 5, 1, 0, atyp];
    request.extend_from_slice(addr);
    request.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&request).await.unwrap();
    let mut reply = [0u8; 12];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[..2], [5, 0], "method selection");
    assert_eq!(reply[2], 5, "reply version");
    (stream, reply[3])
}

fn name(host: &str) -> Vec<u8> {
    let mut bytes = vec![host.len() as u8];
    bytes.extend_from_slice(host.as_bytes());
    bytes
}

async fn http_connect(proxy: SocketAddr, target: &str, extra: &[u8]) -> (TcpStream, String) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    head.extend_from_slice(extra);
    stream.write_all(&head).await.unwrap();
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "{response:?}");
        response.push(byte[0]);
    }
    (stream, String::from_utf8(response).unwrap())
}

async fn echoes(stream: &mut TcpStream) {
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn local_destinations_are_refused_on_the_real_network_and_tor_is_never_asked() {
    let tor = FakeTor::new(Behaviour::Echo);
    let (proxy, _guard) = start(tor.clone(), SocksOptions::default()).await;
    let v6_loopback = std::net::Ipv6Addr::LOCALHOST.octets();
    for (atyp, addr) in [
        (1, vec![127, 0, 0, 1]),
        (1, vec![10, 0, 0, 5]),
        (1, vec![169, 254, 169, 254]),
        (4, v6_loopback.to_vec()),
        (3, name("127.0.0.1")),
        (3, name("localhost")),
        (3, name("127.1")),
    ] {
        let (mut stream, code) = socks5(proxy, atyp, &addr, 80).await;
        assert_eq!(code, 2, "connection not allowed by ruleset: {addr:?}");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the reply, then the close: {rest:?}");
    }
    let (_, response) = http_connect(proxy, "127.0.0.1:22", b"").await;
    assert!(
        response.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{response}"
    );
    assert!(tor.asked().is_empty(), "nothing local reached Tor");

    // A public name goes to Tor, as a name.
    let (mut stream, code) = socks5(proxy, 3, &name("Example.COM"), 443).await;
    assert_eq!(code, 0);
    echoes(&mut stream).await;
    let asked = tor.asked();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].destination.to_string(), "example.com:443");
}

#[tokio::test]
async fn on_a_private_network_local_destinations_go_through() {
    let tor = FakeTor::new(Behaviour::Echo);
    let options = SocksOptions {
        allow_local: true,
        ..SocksOptions::default()
    };
    let (proxy, _guard) = start(tor.clone(), options).await;
    let (mut stream, code) = socks5(proxy, 1, &[127, 0, 0, 1], 8080).await;
    assert_eq!(code, 0);
    echoes(&mut stream).await;
    // HTTP CONNECT, with bytes sent before the 200 arrived: they reach the destination first.
    let (mut stream, response) = http_connect(proxy, "localhost:8080", b"early").await;
    assert_eq!(response, "HTTP/1.1 200 Connection established\r\n\r\n");
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"early");
    echoes(&mut stream).await;
}

#[tokio::test]
async fn each_destination_and_each_credential_has_its_own_isolation() {
    let tor = FakeTor::new(Behaviour::Echo);
    let (proxy, _guard) = start(tor.clone(), SocksOptions::default()).await;
    for host in ["a.example", "a.example", "b.example"] {
        let (_stream, code) = socks5(proxy, 3, &name(host), 443).await;
        assert_eq!(code, 0);
    }
    let (_stream, code) = socks5(proxy, 3, &name("a.example"), 80).await;
    assert_eq!(code, 0);
    // Username/password: the same destination, isolated from the unauthenticated stream.
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let mut request = vec![5, 1, 2, 1, 1, b'u', 1, b'p', 5, 1, 0, 3];
    request.extend(name("a.example"));
    request.extend_from_slice(&443u16.to_be_bytes());
    stream.write_all(&request).await.unwrap();
    let mut reply = [0u8; 14];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[..4], [5, 2, 1, 0]);
    assert_eq!(reply[5], 0);

    let asked = tor.asked();
    assert_eq!(asked.len(), 5);
    let shares = |a: &DestinationIsolation, b: &DestinationIsolation| a.compatible_same_type(b);
    assert!(shares(&asked[0], &asked[1]), "same host and port");
    assert!(!shares(&asked[0], &asked[2]), "another host");
    assert!(!shares(&asked[0], &asked[3]), "another port");
    assert!(!shares(&asked[0], &asked[4]), "credentials given");
    assert!(asked[0].join_same_type(&asked[2]).is_none());
}

#[tokio::test]
async fn failures_are_told_with_the_matching_code() {
    for (reply, code, status) in [
        (Reply::ConnectionRefused, 5, "502 Bad Gateway"),
        (Reply::HostUnreachable, 4, "502 Bad Gateway"),
        (Reply::NotAllowed, 2, "403 Forbidden"),
    ] {
        let tor = FakeTor::new(Behaviour::Fail(reply));
        let (proxy, _guard) = start(tor, SocksOptions::default()).await;
        let (_, got) = socks5(proxy, 3, &name("example.com"), 443).await;
        assert_eq!(got, code, "{reply:?}");
        let (mut stream, response) = http_connect(proxy, "example.com:443", b"").await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{response}"
        );
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        assert_eq!(body, "refused by the stand-in\n");
    }
    // A destination that never answers: "TTL expired" once the connect deadline passes.
    let tor = FakeTor::new(Behaviour::Hang);
    let options = SocksOptions {
        connect_timeout: Duration::from_millis(200),
        ..SocksOptions::default()
    };
    let (proxy, _guard) = start(tor, options).await;
    let (_, code) = socks5(proxy, 3, &name("example.com"), 443).await;
    assert_eq!(code, 6);
    let (_, response) = http_connect(proxy, "example.com:443", b"").await;
    assert!(
        response.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"),
        "{response}"
    );
}

#[tokio::test]
async fn a_silent_program_is_closed_at_the_handshake_deadline_and_the_proxy_serves_on() {
    let tor = FakeTor::new(Behaviour::Echo);
    let options = SocksOptions {
        handshake_timeout: Duration::from_millis(200),
        ..SocksOptions::default()
    };
    let (proxy, _guard) = start(tor, options).await;
    let mut silent = TcpStream::connect(proxy).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0))), "closed: {read:?}");
    assert!(started.elapsed() >= Duration::from_millis(150));
    // Junk: closed without a reply.
    let mut junk = TcpStream::connect(proxy).await.unwrap();
    junk.write_all(b"\x16\x03\x01\x00").await.unwrap();
    // Closed without a reply: an end of stream, or a reset if the junk was still unread.
    let mut rest = Vec::new();
    let _ = junk.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{rest:?}");
    let (mut stream, code) = socks5(proxy, 3, &name("example.com"), 443).await;
    assert_eq!(code, 0);
    echoes(&mut stream).await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let tor = FakeTor::new(Behaviour::Echo);
    let options = SocksOptions {
        max_connections: 2,
        ..SocksOptions::default()
    };
    let (proxy, _guard) = start(tor, options).await;
    let (mut first, _) = socks5(proxy, 3, &name("example.com"), 443).await;
    let (mut second, _) = socks5(proxy, 3, &name("example.com"), 443).await;
    let mut third = TcpStream::connect(proxy).await.unwrap();
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
    echoes(&mut first).await;
    echoes(&mut second).await;
    // One ends: there is room again.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        let greeting = stream.write_all(&[5, 1, 0]).await;
        let mut reply = [0u8; 2];
        if greeting.is_ok() && stream.read_exact(&mut reply).await.is_ok() {
            assert_eq!(reply, [5, 0]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a connection ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn only_loopback_listens_without_the_flag() {
    for addr in ["127.0.0.1:9050", "[::1]:9050", "127.0.0.2:1"] {
        assert!(
            check_listen_addr(addr.parse().unwrap(), false).is_ok(),
            "{addr}"
        );
    }
    for addr in ["0.0.0.0:9050", "192.168.1.5:9050", "[::]:9050"] {
        let err = check_listen_addr(addr.parse().unwrap(), false).unwrap_err();
        assert!(err.contains("--socks-allow-non-loopback"), "{err}");
        assert!(check_listen_addr(addr.parse().unwrap(), true).is_ok());
    }
}

#[test]
fn arti_errors_become_socks_replies() {
    assert_eq!(
        reply_for(ErrorKind::RemoteHostNotFound),
        Reply::HostUnreachable
    );
    assert_eq!(
        reply_for(ErrorKind::RemoteConnectionRefused),
        Reply::ConnectionRefused
    );
    assert_eq!(
        reply_for(ErrorKind::RemoteStreamClosed),
        Reply::ConnectionRefused
    );
    assert_eq!(reply_for(ErrorKind::ExitPolicyRejected), Reply::NotAllowed);
    assert_eq!(
        reply_for(ErrorKind::ForbiddenStreamTarget),
        Reply::NotAllowed
    );
    assert_eq!(reply_for(ErrorKind::RemoteNetworkTimeout), Reply::TimedOut);
    assert_eq!(reply_for(ErrorKind::Internal), Reply::GeneralFailure);
}
