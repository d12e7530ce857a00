//! The proxy's DNS authorization (`shroud_proxy::dns_auth`) against a real DNS server.
//!
//! Time-dependent behaviour (caching, revocation) is driven with explicit instants through
//! `allows_at`, so nothing here waits for a TTL to pass.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use shroud_mux::auth::{PublicKey, SecretKey};
use shroud_proxy::dns_auth::{DnsAuthLimits, DnsAuthorizer, DnsVerdict};
use shroud_tests::dns::TestDns;
use shroud_tests::{init, within};
use tokio::time::Instant;

const TXT_NAME: &str = "_shroud.example.test";

fn key(seed: u8) -> PublicKey {
    SecretKey::from_seed(&[seed; 32]).public()
}

fn record(key: &PublicKey) -> String {
    format!("shroud-key={key}")
}

fn authorizer(addr: SocketAddr) -> DnsAuthorizer {
    DnsAuthorizer::new(Some(addr), DnsAuthLimits::default()).unwrap()
}

fn allowed(secs: u64) -> DnsVerdict {
    DnsVerdict::Allowed {
        valid_for: Duration::from_secs(secs),
    }
}

#[tokio::test]
async fn grants_a_listed_key_and_not_another() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    dns.add_txt(TXT_NAME, &record(&key(1)), 300).unwrap();
    let auth = authorizer(dns.addr);
    let now = Instant::now();

    let verdict = within(10, auth.allows_at("example.test", &key(1), now)).await;
    assert_eq!(verdict, allowed(300));
    let verdict = within(10, auth.allows_at("example.test", &key(2), now)).await;
    assert_eq!(verdict, DnsVerdict::NotListed);
    // Both answered from one lookup; the name is matched without regard to case or a
    // trailing dot.
    let verdict = within(10, auth.allows_at("EXAMPLE.test.", &key(1), now)).await;
    assert_eq!(verdict, allowed(300));
    assert_eq!(dns.queries(), 1);

    // `allows` is `allows_at` now.
    let verdict = within(10, auth.allows("example.test", &key(1))).await;
    assert!(
        matches!(verdict, DnsVerdict::Allowed { valid_for } if valid_for <= Duration::from_secs(300))
    );
}

#[tokio::test]
async fn several_keys_one_per_record_and_malformed_records_ignored() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    dns.add_txt(TXT_NAME, &record(&key(1)), 300).unwrap();
    dns.add_txt(TXT_NAME, &record(&key(2)), 300).unwrap();
    for malformed in [
        "v=spf1 -all".to_owned(),
        "shroud-key=ed25519:not-a-key".to_owned(),
        format!("shroud-key= {}", key(3)),
        format!("shroud-key={} ", key(4)),
        format!("SHROUD-KEY={}", key(5)),
        key(6).to_string(),
        format!("shroud-key={} shroud-key={}", key(7), key(8)),
    ] {
        dns.add_txt(TXT_NAME, &malformed, 300).unwrap();
    }
    // A record for another name lists nothing here.
    dns.add_txt("_shroud.other.example.test", &record(&key(9)), 300)
        .unwrap();
    let auth = authorizer(dns.addr);
    let now = Instant::now();

    for listed in [1, 2] {
        let verdict = within(10, auth.allows_at("example.test", &key(listed), now)).await;
        assert_eq!(verdict, allowed(300), "key {listed}");
    }
    for not_listed in 3..=9 {
        let verdict = within(10, auth.allows_at("example.test", &key(not_listed), now)).await;
        assert_eq!(verdict, DnsVerdict::NotListed, "key {not_listed}");
    }
}

#[tokio::test]
async fn ttl_is_the_shortest_in_the_answer_and_clamped() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    dns.add_txt("_shroud.short.example.test", &record(&key(1)), 1)
        .unwrap();
    dns.add_txt("_shroud.long.example.test", &record(&key(1)), 86_400)
        .unwrap();
    dns.add_txt("_shroud.mixed.example.test", &record(&key(1)), 600)
        .unwrap();
    dns.add_txt("_shroud.mixed.example.test", &record(&key(2)), 120)
        .unwrap();
    // A CNAME (delegating the list elsewhere, as for ACME challenges) is followed, and its
    // TTL counts.
    dns.add_cname(
        "_shroud.alias.example.test",
        "_shroud.long.example.test",
        40,
    )
    .unwrap();
    let auth = authorizer(dns.addr);
    let now = Instant::now();

    for (host, secs) in [
        ("short.example.test", 5),
        ("long.example.test", 3600),
        ("mixed.example.test", 120),
        ("alias.example.test", 40),
    ] {
        let verdict = within(10, auth.allows_at(host, &key(1), now)).await;
        assert_eq!(verdict, allowed(secs), "{host}");
    }
}

#[tokio::test]
async fn revocation_takes_effect_once_the_ttl_has_passed() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    dns.add_txt(TXT_NAME, &record(&key(1)), 30).unwrap();
    let auth = authorizer(dns.addr);
    let t0 = Instant::now();

    let verdict = within(10, auth.allows_at("example.test", &key(1), t0)).await;
    assert_eq!(verdict, allowed(30));
    assert_eq!(dns.queries(), 1);

    assert_eq!(dns.remove(TXT_NAME, hickory_proto::rr::RecordType::TXT), 1);

    // Within the TTL the cached grant stands, without asking DNS again.
    let at = t0 + Duration::from_secs(29);
    let verdict = within(10, auth.allows_at("example.test", &key(1), at)).await;
    assert_eq!(verdict, allowed(1));
    assert_eq!(dns.queries(), 1);

    // Once it has passed, DNS is asked again and the key is gone.
    let at = t0 + Duration::from_secs(30);
    let verdict = within(10, auth.allows_at("example.test", &key(1), at)).await;
    assert_eq!(verdict, DnsVerdict::NotListed);
    assert_eq!(dns.queries(), 2);
}

#[tokio::test]
async fn nxdomain_is_not_listed_and_cached_briefly() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    // The zone allows caching negative answers for 10 minutes; the authorizer caps that at 60 s.
    dns.set_negative_ttl(600);
    let auth = authorizer(dns.addr);
    let t0 = Instant::now();

    let verdict = within(10, auth.allows_at("example.test", &key(1), t0)).await;
    assert_eq!(verdict, DnsVerdict::NotListed);
    assert_eq!(dns.queries(), 1);

    // A record added now is not seen while the negative answer is cached...
    dns.add_txt(TXT_NAME, &record(&key(1)), 300).unwrap();
    let at = t0 + Duration::from_secs(59);
    let verdict = within(10, auth.allows_at("example.test", &key(1), at)).await;
    assert_eq!(verdict, DnsVerdict::NotListed);
    assert_eq!(dns.queries(), 1);

    // ...and is once it expires.
    let at = t0 + Duration::from_secs(60);
    let verdict = within(10, auth.allows_at("example.test", &key(1), at)).await;
    assert_eq!(verdict, allowed(300));
    assert_eq!(dns.queries(), 2);
}

#[tokio::test]
async fn negative_ttl_follows_a_short_soa() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    dns.set_negative_ttl(10);
    // NODATA (the name exists, without TXT records) is negative too.
    dns.add_a(TXT_NAME, std::net::Ipv4Addr::LOCALHOST, 300)
        .unwrap();
    let auth = authorizer(dns.addr);
    let t0 = Instant::now();

    let verdict = within(10, auth.allows_at("example.test", &key(1), t0)).await;
    assert_eq!(verdict, DnsVerdict::NotListed);
    let at = t0 + Duration::from_secs(9);
    within(10, auth.allows_at("example.test", &key(1), at)).await;
    assert_eq!(dns.queries(), 1);
    let at = t0 + Duration::from_secs(10);
    within(10, auth.allows_at("example.test", &key(1), at)).await;
    assert_eq!(dns.queries(), 2);
}

#[tokio::test]
async fn a_refusing_server_is_unavailable_not_a_grant() {
    init();
    // The server is authoritative for another zone only, so it refuses the question.
    let dns = TestDns::start("elsewhere.test").await.unwrap();
    let auth = authorizer(dns.addr);

    let verdict = within(10, auth.allows("example.test", &key(1))).await;
    assert!(matches!(verdict, DnsVerdict::Unavailable(_)), "{verdict:?}");
    // Failures are not cached: the next check asks again.
    let before = dns.queries();
    let verdict = within(10, auth.allows("example.test", &key(1))).await;
    assert!(matches!(verdict, DnsVerdict::Unavailable(_)), "{verdict:?}");
    assert!(dns.queries() > before);
}

#[tokio::test]
async fn a_dns_server_that_is_down_is_unavailable() {
    init();
    // A port that nothing listens on: bind it, note it, close it.
    let addr = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    };
    let limits = DnsAuthLimits {
        timeout: Duration::from_millis(600),
        ..DnsAuthLimits::default()
    };
    let auth = DnsAuthorizer::new(Some(addr), limits).unwrap();

    let verdict = within(10, auth.allows("example.test", &key(1))).await;
    let DnsVerdict::Unavailable(reason) = verdict else {
        panic!("expected Unavailable, got {verdict:?}");
    };
    assert!(!reason.is_empty());
}

#[tokio::test]
async fn names_that_cannot_be_listed_are_not_listed_without_a_query() {
    init();
    let dns = TestDns::start("example.test").await.unwrap();
    let auth = authorizer(dns.addr);
    // Not a hostname; and a hostname too long to carry the `_shroud.` label.
    let too_long = vec!["a".repeat(58); 4].join(".") + ".example.test";
    assert!(too_long.len() <= 253 && too_long.len() + 8 > 253);
    for name in ["not a name", "", too_long.as_str()] {
        let verdict = within(10, auth.allows(name, &key(1))).await;
        assert_eq!(verdict, DnsVerdict::NotListed, "{name:?}");
    }
    assert_eq!(dns.queries(), 0);
}
