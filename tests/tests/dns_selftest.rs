//! The test DNS server answers a real resolver over UDP and over TCP, and its zone changes
//! while it runs.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::{Ipv4Addr, SocketAddr};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::TokioResolver;
use shroud_tests::dns::TestDns;
use shroud_tests::{init, within};

#[derive(Clone, Copy)]
enum Over {
    Udp,
    Tcp,
}

fn resolver(addr: SocketAddr, over: Over) -> TokioResolver {
    let mut connection = match over {
        Over::Udp => ConnectionConfig::udp(),
        Over::Tcp => ConnectionConfig::tcp(),
    };
    connection.port = addr.port();
    let server = NameServerConfig::new(addr.ip(), true, vec![connection]);
    let config = ResolverConfig::from_name_servers(vec![server]);
    let mut options = ResolverOpts::default();
    // Every lookup must reach the server, so the query counts below are exact.
    options.cache_size = 0;
    options.attempts = 0;
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(options)
        .build()
        .unwrap()
}

fn txt_strings(lookup: &hickory_resolver::lookup::Lookup) -> Vec<String> {
    lookup
        .answers()
        .iter()
        .filter_map(|record| match &record.data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|part| String::from_utf8_lossy(part).into_owned())
                    .collect::<String>(),
            ),
            _ => None,
        })
        .collect()
}

async fn serves_a_zone_over(over: Over) {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    dns.add_a("www.example.test", Ipv4Addr::new(192, 0, 2, 7), 300)
        .unwrap();
    dns.add_cname("alias.example.test.", "www.example.test", 300)
        .unwrap();
    dns.add_srv(
        "_shroud._tcp.example.test",
        10,
        5,
        443,
        "proxy.example.net",
        300,
    )
    .unwrap();
    dns.add_txt("_shroud.example.test", "shroud-key=one", 120)
        .unwrap();
    dns.add_txt("_shroud.example.test", "other", 120).unwrap();
    let long = "x".repeat(600);
    dns.add_txt("long.example.test", &long, 120).unwrap();
    assert!(dns
        .add_a("www.elsewhere.test", Ipv4Addr::LOCALHOST, 1)
        .is_err());

    let resolver = resolver(dns.addr, over);

    let a = within(10, resolver.ipv4_lookup("www.example.test."))
        .await
        .unwrap();
    assert_eq!(a.answers().len(), 1);
    assert_eq!(
        a.answers()[0].data,
        RData::A(Ipv4Addr::new(192, 0, 2, 7).into())
    );
    assert_eq!(a.answers()[0].ttl, 300);
    assert_eq!(dns.queries(), 1);

    // A CNAME inside the zone is followed in the same answer.
    let alias = within(10, resolver.ipv4_lookup("ALIAS.example.test."))
        .await
        .unwrap();
    assert!(alias
        .answers()
        .iter()
        .any(|record| record.data == RData::A(Ipv4Addr::new(192, 0, 2, 7).into())));

    let srv = within(10, resolver.srv_lookup("_shroud._tcp.example.test."))
        .await
        .unwrap();
    let RData::SRV(record) = &srv.answers()[0].data else {
        panic!("not an SRV record: {:?}", srv.answers());
    };
    assert_eq!((record.priority, record.weight, record.port), (10, 5, 443));
    assert_eq!(record.target.to_ascii(), "proxy.example.net.");

    let txt = within(10, resolver.txt_lookup("_shroud.example.test."))
        .await
        .unwrap();
    let mut strings = txt_strings(&txt);
    strings.sort();
    assert_eq!(strings, ["other", "shroud-key=one"]);
    assert_eq!(
        txt_strings(
            &within(10, resolver.txt_lookup("long.example.test."))
                .await
                .unwrap()
        ),
        [long]
    );

    // A name that does not exist: NXDOMAIN, with the SOA for negative caching.
    dns.set_negative_ttl(17);
    let err = within(10, resolver.txt_lookup("missing.example.test."))
        .await
        .unwrap_err();
    assert!(err.is_nx_domain(), "{err}");
    let NetError::Dns(DnsError::NoRecordsFound(NoRecords { negative_ttl, .. })) = err else {
        panic!("not a negative answer: {err}");
    };
    assert_eq!(negative_ttl, Some(17));

    // A name that exists with other types: NODATA, not NXDOMAIN. So does an empty
    // non-terminal (`_tcp.example.test`, which only has names below it).
    for name in ["www.example.test.", "_tcp.example.test."] {
        let err = within(10, resolver.txt_lookup(name)).await.unwrap_err();
        let NetError::Dns(DnsError::NoRecordsFound(no_records)) = &err else {
            panic!("not a negative answer for {name}: {err}");
        };
        assert_eq!(no_records.response_code, ResponseCode::NoError, "{name}");
    }

    // Outside the zone: refused.
    let err = within(10, resolver.ipv4_lookup("www.elsewhere.test."))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused))
        ),
        "{err}"
    );

    // The zone changes while the server runs.
    assert_eq!(dns.remove("_shroud.example.test.", RecordType::TXT), 2);
    assert_eq!(dns.remove("_shroud.example.test.", RecordType::TXT), 0);
    let before = dns.queries();
    let err = within(10, resolver.txt_lookup("_shroud.example.test."))
        .await
        .unwrap_err();
    assert!(err.is_no_records_found(), "{err}");
    assert_eq!(dns.queries(), before + 1);
    dns.add_txt("_shroud.example.test", "shroud-key=two", 120)
        .unwrap();
    let txt = within(10, resolver.txt_lookup("_shroud.example.test."))
        .await
        .unwrap();
    assert_eq!(txt_strings(&txt), ["shroud-key=two"]);
    assert_eq!(dns.queries(), before + 2);
}

#[tokio::test]
async fn serves_a_zone_over_udp() {
    serves_a_zone_over(Over::Udp).await;
}

#[tokio::test]
async fn serves_a_zone_over_tcp() {
    serves_a_zone_over(Over::Tcp).await;
}

#[tokio::test]
async fn stops_when_dropped() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    let addr = dns.addr;
    drop(dns);
    // The TCP listener closes once its aborted task is dropped; poll for it rather than sleep.
    within(10, async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}
