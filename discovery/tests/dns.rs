//! The service's DNS listener against hostile and malformed input, over real UDP and TCP
//! sockets: junk gets FORMERR or nothing, never a crash, and honest questions keep being
//! answered.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{entry, within, TestService};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use shroud_discovery::dns::DnsZone;
use shroud_discovery::fleet::StaticProxy;
use shroud_discovery::server::DnsService;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

/// A service whose zone `fleet.test` has one static proxy at 192.0.2.7; returns it and its DNS
/// address.
async fn service() -> (TestService, SocketAddr) {
    let (udp, tcp) = shroud_discovery::dns::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dns = udp.local_addr().unwrap();
    let service = TestService::start(vec![], |config| {
        let mut proxy: StaticProxy = entry("p1.proxy.test", 443, "eu").into();
        proxy.addrs = vec!["192.0.2.7".parse().unwrap()];
        let file = shroud_discovery::fleet::FleetFile { proxy: vec![proxy] }
            .validate()
            .unwrap();
        config.fleet = shroud_discovery::fleet::Fleet::new(file, Duration::from_secs(30));
        config.dns = Some(DnsService {
            zone: DnsZone::new("fleet.test", &["ns.example".into()], 30, 3).unwrap(),
            udp,
            tcp,
        });
    })
    .await;
    (service, dns)
}

fn question(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message
}

/// Sends `bytes` over UDP and returns the answer, if one comes within a second.
async fn udp_exchange(dns: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(bytes, dns).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), socket.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Message::from_vec(&buf[..n]).ok()
}

async fn ask(dns: SocketAddr, name: &str) -> Message {
    let query = question(name, RecordType::A);
    within(udp_exchange(dns, &query.to_vec().unwrap()))
        .await
        .expect("an answer")
}

#[tokio::test]
async fn junk_gets_formerr_or_nothing_and_honest_questions_still_get_answers() {
    let (service, dns) = service().await;
    let honest = ask(dns, "app.example.fleet.test.").await;
    assert_eq!(honest.metadata.response_code, ResponseCode::NoError);
    assert_eq!(honest.answers.len(), 1);

    // Datagrams that are no DNS message at all: a single byte, a header cut short, noise,
    // a response instead of a query. Each gets FORMERR or nothing.
    let mut noise = vec![0u8; 1400];
    for (i, byte) in noise.iter_mut().enumerate() {
        *byte = (i * 37 % 251) as u8;
    }
    let mut response = question("app.example.fleet.test.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    let junk: Vec<Vec<u8>> = vec![
        vec![0x42],
        vec![0x12, 0x34, 0x01, 0x00, 0x00],
        noise,
        response.to_vec().unwrap(),
    ];
    for bytes in &junk {
        if let Some(answer) = udp_exchange(dns, bytes).await {
            assert_eq!(
                answer.metadata.response_code,
                ResponseCode::FormErr,
                "{bytes:?}"
            );
            assert!(answer.answers.is_empty());
        }
    }

    // Two questions in one message: not answered as if it were one.
    let mut two = question("app.example.fleet.test.", RecordType::A);
    two.add_query(Query::query(
        Name::from_ascii("other.fleet.test.").unwrap(),
        RecordType::A,
    ));
    if let Some(answer) = udp_exchange(dns, &two.to_vec().unwrap()).await {
        assert_ne!(answer.metadata.response_code, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
    }

    // TCP: a length prefix promising more than ever comes, then the peer goes quiet; and a
    // connection that sends garbage. Neither stops the listener.
    let mut silent = TcpStream::connect(dns).await.unwrap();
    silent.write_all(&[0xff, 0xff, 0x00]).await.unwrap();
    let mut garbage = TcpStream::connect(dns).await.unwrap();
    garbage.write_all(&[0x00, 0x04, 1, 2, 3, 4]).await.unwrap();
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_secs(1), garbage.read(&mut sink)).await;

    // Still serving, over UDP and over TCP.
    let again = ask(dns, "app.example.fleet.test.").await;
    assert_eq!(again.answers.len(), 1);
    let mut tcp = TcpStream::connect(dns).await.unwrap();
    let wire = question("app.example.fleet.test.", RecordType::A)
        .to_vec()
        .unwrap();
    let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&wire);
    tcp.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    within(tcp.read_exact(&mut len)).await.unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    within(tcp.read_exact(&mut body)).await.unwrap();
    let over_tcp = Message::from_vec(&body).unwrap();
    assert_eq!(over_tcp.answers.len(), 1);
    drop(silent);
    service.stop().await;
}
