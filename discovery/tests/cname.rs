//! `require_cname` against a tiny in-test DNS server on 127.0.0.1 (UDP): the list is given
//! only for hostnames that are CNAMEs to HOST.DOMAIN.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::{entry, now_unix, within, TestService};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use shroud_discovery::server::RequireCname;
use shroud_discovery::signed;
use tokio::net::UdpSocket;

/// Answers CNAME queries from `records` (owner → target); NXDOMAIN for other names, SERVFAIL
/// for names starting with "servfail".
async fn dns_server(records: HashMap<String, String>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(query) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            let mut response = Message::response(query.metadata.id, query.metadata.op_code);
            response.metadata.recursion_desired = query.metadata.recursion_desired;
            response.metadata.recursion_available = true;
            response.add_queries(query.queries.clone());
            if let Some(question) = query.queries.first() {
                let name = question.name().to_ascii().to_ascii_lowercase();
                let owner = name.trim_end_matches('.');
                if owner.starts_with("servfail") {
                    response.metadata.response_code = ResponseCode::ServFail;
                } else if let Some(target) = records.get(owner) {
                    if question.query_type() == RecordType::CNAME {
                        let target = Name::from_ascii(format!("{target}.")).unwrap();
                        response.add_answer(Record::from_rdata(
                            question.name().clone(),
                            60,
                            RData::CNAME(CNAME(target)),
                        ));
                    }
                } else {
                    response.metadata.response_code = ResponseCode::NXDomain;
                }
            }
            let bytes = response.to_vec().unwrap();
            let _ = socket.send_to(&bytes, peer).await;
        }
    });
    addr
}

#[tokio::test]
async fn lists_only_for_hosts_pointed_at_the_fleet() {
    let dns = dns_server(HashMap::from([
        (
            "good.example".to_owned(),
            "good.example.fleet.test".to_owned(),
        ),
        (
            "Mixed.example".to_ascii_lowercase(),
            "MIXED.example.Fleet.test".to_owned(),
        ),
        ("elsewhere.example".to_owned(), "other.cdn.test".to_owned()),
    ]))
    .await;
    let service = TestService::start(vec![entry("p1.proxy.test", 443, "eu")], |c| {
        c.require_cname = Some(RequireCname {
            domain: "fleet.test".into(),
            dns_servers: vec![dns],
        });
    })
    .await;
    let pinned = service.signing_key.public();

    let ok = within(service.get("/v1/proxies?host=good.example")).await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    signed::verify(&ok.body, &pinned, "good.example", now_unix(), None).unwrap();
    let mixed = within(service.get("/v1/proxies?host=mixed.example")).await;
    assert_eq!(
        mixed.status,
        200,
        "{}",
        String::from_utf8_lossy(&mixed.body)
    );

    let absent = within(service.get("/v1/proxies?host=absent.example")).await;
    assert_eq!(absent.status, 403);
    let text = String::from_utf8_lossy(&absent.body);
    assert!(
        text.contains("absent.example.fleet.test"),
        "the refusal says what is expected: {text}"
    );

    let elsewhere = within(service.get("/v1/proxies?host=elsewhere.example")).await;
    assert_eq!(elsewhere.status, 403);
    assert!(String::from_utf8_lossy(&elsewhere.body).contains("other.cdn.test"));

    let failing = within(service.get("/v1/proxies?host=servfail.example")).await;
    assert_eq!(failing.status, 503);

    service.stop().await;
}
