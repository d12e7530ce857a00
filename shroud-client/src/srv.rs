//! Finding a hostname's proxies from DNS SRV records, without this machine's resolver.
//!
//! The owner of `example.com` may publish which proxies serve it:
//!
//! ```text
//! _shroud._tcp.example.com. 300 IN SRV 10 60 443 proxy-a.example.net.
//! _shroud._tcp.example.com. 300 IN SRV 10 40 443 proxy-b.example.net.
//! ```
//!
//! [`lookup_proxies`] asks one DNS server for those records over TCP (RFC 1035 4.2.2: each
//! message preceded by its 2-byte length), on a stream opened through a [`Transport`], so in
//! Tor mode the question leaves through Tor like every other connection and never through this
//! machine's resolver. It returns the targets in the order RFC 2782 says to try them
//! ([`order_by_priority_and_weight`]).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::SRV;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};
use hickory_proto::serialize::binary::DecodeError;
use hickory_proto::ProtoError;
use shroud_mux::hostname::HostnameError;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::transport::Transport;

/// The labels before the hostname that hold its SRV records: `_shroud._tcp.HOSTNAME`.
pub const SRV_LABELS: &str = "_shroud._tcp";

/// The longest CNAME chain followed inside one answer.
const MAX_CNAME_CHAIN: usize = 8;

/// One proxy an SRV record names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SrvTarget {
    /// The proxy's hostname, normalised (lower case, no trailing dot).
    pub name: String,
    /// The port its tunnels listen on.
    pub port: u16,
    /// Lower is tried first.
    pub priority: u16,
    /// Within one priority, the relative chance of being tried first.
    pub weight: u16,
}

/// Why [`lookup_proxies`] found no proxies.
#[derive(Debug, thiserror::Error)]
pub enum SrvError {
    /// The hostname is not a hostname, or too long to ask about.
    #[error("{name:?} is not a hostname that can have SRV records")]
    BadHostname {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        #[source]
        source: HostnameError,
    },
    /// The question could not be encoded.
    #[error("could not encode the DNS question")]
    Encode(#[source] ProtoError),
    /// No stream to the DNS server could be opened.
    #[error("could not reach the DNS server {server}")]
    Connect {
        /// The DNS server.
        server: SocketAddr,
        /// Why, from the transport.
        #[source]
        source: io::Error,
    },
    /// The stream broke while sending the question or reading the answer.
    #[error("DNS over TCP with {server} failed")]
    Io {
        /// The DNS server.
        server: SocketAddr,
        /// What broke.
        #[source]
        source: io::Error,
    },
    /// The DNS server did not answer in time.
    #[error("no answer from the DNS server {server} within {timeout:?}")]
    Timeout {
        /// The DNS server.
        server: SocketAddr,
        /// How long we waited, connecting included.
        timeout: Duration,
    },
    /// The answer is not a DNS message.
    #[error("the DNS server's answer could not be decoded")]
    Malformed(#[source] DecodeError),
    /// The answer is a DNS message, but not the answer to our question.
    #[error("the DNS server's answer does not answer our question: {0}")]
    Mismatch(&'static str),
    /// The answer was truncated even over TCP.
    #[error("the DNS server's answer was truncated")]
    Truncated,
    /// The DNS server answered with an error (SERVFAIL, REFUSED, ...).
    #[error("the DNS server answered {0}")]
    ServerError(ResponseCode),
    /// The name does not exist, or has no SRV records with a usable target.
    #[error("{name} has no SRV records naming a proxy")]
    NotFound {
        /// The name asked about, `_shroud._tcp.HOSTNAME`.
        name: String,
    },
    /// The name's single SRV record has target `.`: the service is decidedly not available
    /// there (RFC 2782).
    #[error("{name} says the service is not available there (SRV target \".\")")]
    ServiceNotAvailable {
        /// The name asked about, `_shroud._tcp.HOSTNAME`.
        name: String,
    },
}

/// Asks `dns_server` for the SRV records at `_shroud._tcp.HOSTNAME`, over a stream from
/// `transport`, and returns their targets in the order to try them (see
/// [`order_by_priority_and_weight`]); duplicate targets are dropped.
///
/// The whole exchange, connecting included, must finish within `timeout`. The answer must
/// carry our message id and question; its size is bounded by the 2-byte length prefix
/// (64 KiB). Targets that are not hostnames are skipped.
pub async fn lookup_proxies(
    transport: &dyn Transport,
    dns_server: SocketAddr,
    hostname: &str,
    timeout: Duration,
) -> Result<Vec<SrvTarget>, SrvError> {
    lookup_srv(transport, dns_server, hostname, timeout)
        .await
        .map(|answer| answer.targets)
}

/// What [`lookup_srv`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvAnswer {
    /// The targets, in the order to try them.
    pub targets: Vec<SrvTarget>,
    /// How long the answer may be trusted: the shortest TTL among the records used.
    pub ttl: Duration,
}

/// [`lookup_proxies`], also saying how long the answer may be trusted.
pub async fn lookup_srv(
    transport: &dyn Transport,
    dns_server: SocketAddr,
    hostname: &str,
    timeout: Duration,
) -> Result<SrvAnswer, SrvError> {
    let bad_hostname = |source| SrvError::BadHostname {
        name: hostname.to_owned(),
        source,
    };
    let hostname = shroud_mux::hostname::normalize(hostname).map_err(bad_hostname)?;
    let qname = Name::from_ascii(format!("{SRV_LABELS}.{hostname}."))
        .map_err(|_| bad_hostname(HostnameError::TooLong))?;

    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(qname.clone(), RecordType::SRV));
    let wire = query.to_vec().map_err(SrvError::Encode)?;

    let answer = tokio::time::timeout(timeout, exchange(transport, dns_server, &wire))
        .await
        .map_err(|_| SrvError::Timeout {
            server: dns_server,
            timeout,
        })??;
    let response = Message::from_vec(&answer).map_err(SrvError::Malformed)?;
    let (records, ttl) = srv_records(&query, &response)?;
    let targets = order_by_priority_and_weight(records, &mut fastrand::Rng::new());
    let mut unique: Vec<SrvTarget> = Vec::with_capacity(targets.len());
    for target in targets {
        let seen = unique
            .iter()
            .any(|other| other.name == target.name && other.port == target.port);
        if !seen {
            unique.push(target);
        }
    }
    Ok(SrvAnswer {
        targets: unique,
        ttl: Duration::from_secs(u64::from(ttl)),
    })
}

/// Sends one length-prefixed question and reads one length-prefixed answer.
async fn exchange(
    transport: &dyn Transport,
    server: SocketAddr,
    wire: &[u8],
) -> Result<Vec<u8>, SrvError> {
    let io_error = |source| SrvError::Io { server, source };
    let len = u16::try_from(wire.len()).map_err(|_| {
        io_error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "DNS question longer than 65535 bytes",
        ))
    })?;
    let mut stream = transport
        .connect(&server.ip().to_string(), server.port())
        .await
        .map_err(|source| SrvError::Connect { server, source })?;

    let mut framed = Vec::with_capacity(2 + wire.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(wire);
    stream.write_all(&framed).await.map_err(io_error)?;
    stream.flush().await.map_err(io_error)?;

    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io_error)?;
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await.map_err(io_error)?;
    Ok(answer)
}

/// Checks `response` answers `query` and takes the SRV records for its name out of it, with
/// the shortest TTL of the records used (in seconds).
fn srv_records(query: &Message, response: &Message) -> Result<(Vec<SrvTarget>, u32), SrvError> {
    let metadata = &response.metadata;
    if metadata.message_type != MessageType::Response {
        return Err(SrvError::Mismatch("it is not a response"));
    }
    if metadata.id != query.metadata.id {
        return Err(SrvError::Mismatch("its message id is not ours"));
    }
    if metadata.op_code != OpCode::Query {
        return Err(SrvError::Mismatch("it is not a response to a query"));
    }
    let asked = query.queries.first();
    let answered = response.queries.as_slice();
    let same_question = match (asked, answered) {
        (Some(asked), [answered]) => {
            same_name(asked.name(), answered.name())
                && answered.query_type() == RecordType::SRV
                && answered.query_class() == DNSClass::IN
        }
        _ => false,
    };
    if !same_question {
        return Err(SrvError::Mismatch("its question is not ours"));
    }
    if metadata.truncation {
        return Err(SrvError::Truncated);
    }

    let asked_name = asked.map(|query| query.name().clone()).unwrap_or_default();
    let display_name = asked_name.to_ascii();
    let display_name = display_name
        .strip_suffix('.')
        .unwrap_or(&display_name)
        .to_owned();
    match metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Err(SrvError::NotFound { name: display_name }),
        code => return Err(SrvError::ServerError(code)),
    }

    // Follow CNAMEs from the name asked about, as a recursive resolver includes them.
    let mut owner = asked_name;
    let mut srvs = Vec::new();
    let mut ttl = u32::MAX;
    for _ in 0..MAX_CNAME_CHAIN {
        srvs = response
            .answers
            .iter()
            .filter(|record| same_name(&record.name, &owner))
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some((srv.clone(), record.ttl)),
                _ => None,
            })
            .collect();
        if !srvs.is_empty() {
            break;
        }
        let cname = response
            .answers
            .iter()
            .find_map(|record| match &record.data {
                RData::CNAME(target) if same_name(&record.name, &owner) => {
                    Some((target.0.clone(), record.ttl))
                }
                _ => None,
            });
        match cname {
            Some((target, cname_ttl)) => {
                owner = target;
                ttl = ttl.min(cname_ttl);
            }
            None => break,
        }
    }
    let ttl = srvs.iter().map(|(_, ttl)| *ttl).fold(ttl, u32::min);
    let srvs: Vec<SRV> = srvs.into_iter().map(|(srv, _)| srv).collect();

    if let [only] = srvs.as_slice() {
        if only.target.is_root() {
            return Err(SrvError::ServiceNotAvailable { name: display_name });
        }
    }
    let targets: Vec<SrvTarget> = srvs
        .iter()
        .filter_map(|srv| {
            let target = srv.target.to_ascii();
            match shroud_mux::hostname::normalize(&target) {
                Ok(name) => Some(SrvTarget {
                    name,
                    port: srv.port,
                    priority: srv.priority,
                    weight: srv.weight,
                }),
                Err(err) => {
                    tracing::debug!(%err, target, "skipping an SRV target that is not a hostname");
                    None
                }
            }
        })
        .collect();
    if targets.is_empty() {
        return Err(SrvError::NotFound { name: display_name });
    }
    Ok((targets, ttl))
}

/// Whether two names are the same, ignoring case and whether either is absolute.
fn same_name(a: &Name, b: &Name) -> bool {
    let a = a.to_ascii();
    let b = b.to_ascii();
    a.strip_suffix('.')
        .unwrap_or(&a)
        .eq_ignore_ascii_case(b.strip_suffix('.').unwrap_or(&b))
}

/// Orders SRV targets as RFC 2782 says to try them: ascending priority; within a priority,
/// repeatedly pick one at random with chance proportional to its weight (a weight-0 target
/// has a small chance: it is picked only when the random draw is 0).
pub fn order_by_priority_and_weight(
    mut records: Vec<SrvTarget>,
    rng: &mut fastrand::Rng,
) -> Vec<SrvTarget> {
    records.sort_by_key(|record| record.priority);
    let mut ordered = Vec::with_capacity(records.len());
    for group in records.chunk_by(|a, b| a.priority == b.priority) {
        let mut pending = group.to_vec();
        // "Arrange [them] in any order, except that all those with weight 0 are placed at the
        // beginning of the list": shuffle so that equal weights are not tried in answer order.
        rng.shuffle(&mut pending);
        pending.sort_by_key(|record| record.weight != 0);
        while !pending.is_empty() {
            let total: u64 = pending.iter().map(|record| u64::from(record.weight)).sum();
            let draw = rng.u64(0..=total);
            let mut running = 0u64;
            let index = pending
                .iter()
                .position(|record| {
                    running += u64::from(record.weight);
                    running >= draw
                })
                .unwrap_or(0);
            ordered.push(pending.remove(index));
        }
    }
    ordered
}

/// Proxies from SRV records (`--srv`): looked up again when the answer's TTL runs out (at least
/// every minute, at most every hour), through the client's transport.
///
/// A target may be an onion address (a proxy run with `--onion-tunnel`): with Tor the tunnel
/// is dialed there, and the proxy's certificate must then name that onion address, the only
/// name an SRV record gives. Without Tor such targets cannot be reached and are skipped.
pub struct SrvSource {
    hostname: String,
    dns_server: SocketAddr,
    max_proxies: usize,
    timeout: Duration,
    tor: bool,
}

impl SrvSource {
    /// Looks up `_shroud._tcp.HOSTNAME` at `dns_server`, keeping the first `max_proxies`
    /// targets. `tor` gives the query more time (it crosses a circuit), and lets onion targets
    /// in.
    pub fn new(hostname: &str, dns_server: SocketAddr, max_proxies: usize, tor: bool) -> Self {
        Self {
            hostname: hostname.to_owned(),
            dns_server,
            max_proxies,
            timeout: Duration::from_secs(if tor { 60 } else { 10 }),
            tor,
        }
    }

    /// The proxy a target names; `None` for one that cannot be used here (an onion target
    /// without Tor, or one that is not a valid onion address).
    fn proxy(&self, target: SrvTarget) -> Option<crate::shared::ProxyAddr> {
        if !shroud_mux::onion::is_onion(&target.name) {
            return Some(crate::shared::ProxyAddr::new(target.name, target.port));
        }
        if !self.tor {
            tracing::warn!(target = %target.name, "an SRV target is an onion address, which only the tor transport reaches; skipping it");
            return None;
        }
        match shroud_mux::onion::normalize(&target.name) {
            Ok(onion) => Some(crate::shared::ProxyAddr {
                name: onion.clone(),
                port: target.port,
                onion: Some(onion),
            }),
            Err(err) => {
                tracing::warn!(target = %target.name, %err, "skipping an SRV target");
                None
            }
        }
    }
}

impl crate::fleet::FleetSource for SrvSource {
    fn fetch<'a>(
        &'a mut self,
        transport: &'a dyn Transport,
    ) -> futures::future::BoxFuture<'a, Result<crate::fleet::Fleet, crate::fleet::FleetError>> {
        Box::pin(async move {
            let answer = lookup_srv(transport, self.dns_server, &self.hostname, self.timeout)
                .await
                .map_err(|err| crate::fleet::FleetError {
                    permanent: false,
                    message: format!("SRV lookup for {}: {err}", self.hostname),
                })?;
            let mut proxies: Vec<_> = answer
                .targets
                .into_iter()
                .filter_map(|t| self.proxy(t))
                .collect();
            let spares = proxies.split_off(self.max_proxies.min(proxies.len()));
            Ok(crate::fleet::Fleet {
                proxies,
                spares,
                refresh_after: answer
                    .ttl
                    .clamp(Duration::from_secs(60), Duration::from_secs(3600)),
            })
        })
    }

    fn describe(&self) -> String {
        format!(
            "DNS SRV {SRV_LABELS}.{} at {}",
            self.hostname, self.dns_server
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use futures::future::BoxFuture;
    use hickory_proto::rr::rdata::CNAME;
    use hickory_proto::rr::Record;

    use super::*;
    use crate::transport::BoxStream;

    fn target(name: &str, priority: u16, weight: u16) -> SrvTarget {
        SrvTarget {
            name: name.to_owned(),
            port: 443,
            priority,
            weight,
        }
    }

    /// How often each name comes first over many orderings.
    fn first_counts(records: &[SrvTarget], draws: usize, seed: u64) -> Vec<(String, usize)> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut counts: Vec<(String, usize)> =
            records.iter().map(|r| (r.name.clone(), 0)).collect();
        for _ in 0..draws {
            let ordered = order_by_priority_and_weight(records.to_vec(), &mut rng);
            let first = &ordered[0].name;
            counts.iter_mut().find(|(name, _)| name == first).unwrap().1 += 1;
        }
        counts
    }

    #[test]
    fn an_onion_target_is_dialed_through_tor_and_named_by_its_address() {
        let onion = shroud_mux::onion::from_public_key(&[4; 32]);
        let dns = "127.0.0.1:53".parse().unwrap();
        let tor = SrvSource::new("a.example", dns, 3, true);
        let mut listed = target(&format!("{}.", onion.to_ascii_uppercase()), 10, 1);
        listed.port = 8443;
        assert_eq!(
            tor.proxy(listed.clone()),
            Some(crate::shared::ProxyAddr {
                name: onion.clone(),
                port: 8443,
                onion: Some(onion.clone()),
            }),
            "the certificate must then name the onion address, the only name SRV gives"
        );
        // Without Tor it cannot be reached: skipped, not looked up.
        let direct = SrvSource::new("a.example", dns, 3, false);
        assert_eq!(direct.proxy(listed), None);
        // A mangled onion address is skipped; ordinary names pass as they are.
        let mangled = target(&onion.replacen('a', "b", 1), 10, 1);
        assert_eq!(tor.proxy(mangled), None);
        let plain = tor.proxy(target("p.example", 10, 1)).unwrap();
        assert_eq!(plain.onion, None);
    }

    #[test]
    fn orders_by_ascending_priority_and_keeps_every_record() {
        let records = vec![
            target("c", 30, 1),
            target("a1", 10, 5),
            target("b", 20, 0),
            target("a2", 10, 5),
            target("a3", 10, 0),
        ];
        for seed in 0..50 {
            let ordered =
                order_by_priority_and_weight(records.clone(), &mut fastrand::Rng::with_seed(seed));
            let priorities: Vec<u16> = ordered.iter().map(|r| r.priority).collect();
            assert_eq!(priorities, [10, 10, 10, 20, 30]);
            let mut names: Vec<&str> = ordered.iter().map(|r| r.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, ["a1", "a2", "a3", "b", "c"]);
        }
        assert!(order_by_priority_and_weight(Vec::new(), &mut fastrand::Rng::new()).is_empty());
    }

    #[test]
    fn same_seed_same_order() {
        let records: Vec<SrvTarget> = (0..8).map(|i| target(&format!("p{i}"), 1, i)).collect();
        let a = order_by_priority_and_weight(records.clone(), &mut fastrand::Rng::with_seed(7));
        let b = order_by_priority_and_weight(records, &mut fastrand::Rng::with_seed(7));
        assert_eq!(a, b);
    }

    #[test]
    fn weights_set_the_chance_of_going_first() {
        let counts = first_counts(&[target("light", 1, 1), target("heavy", 1, 3)], 20_000, 1);
        let heavy = counts[1].1 as f64 / 20_000.0;
        assert!((0.70..0.80).contains(&heavy), "heavy first {heavy}");
    }

    #[test]
    fn weight_zero_has_a_small_chance() {
        let counts = first_counts(&[target("zero", 1, 0), target("ten", 1, 10)], 20_000, 2);
        // The draw is uniform over 0..=10, and only 0 picks the weight-0 target: 1/11.
        let zero = counts[0].1 as f64 / 20_000.0;
        assert!((0.05..0.14).contains(&zero), "zero first {zero}");
    }

    #[test]
    fn all_zero_weights_come_in_random_order() {
        let records = [target("a", 1, 0), target("b", 1, 0), target("c", 1, 0)];
        for (name, count) in first_counts(&records, 9_000, 3) {
            let share = count as f64 / 9_000.0;
            assert!((0.28..0.39).contains(&share), "{name} first {share}");
        }
    }

    /// A transport whose every stream is answered by `respond`, over a tiny duplex buffer.
    #[derive(Clone)]
    struct FakeDns {
        respond: Arc<dyn Fn(Message) -> Vec<u8> + Send + Sync>,
    }

    impl FakeDns {
        fn new(respond: impl Fn(Message) -> Vec<u8> + Send + Sync + 'static) -> Self {
            Self {
                respond: Arc::new(respond),
            }
        }

        /// Answers with `build(query)` framed properly.
        fn answering(build: impl Fn(&Message) -> Message + Send + Sync + 'static) -> Self {
            Self::new(move |query| frame(&build(&query).to_vec().unwrap()))
        }
    }

    fn frame(wire: &[u8]) -> Vec<u8> {
        let mut framed = u16::try_from(wire.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(wire);
        framed
    }

    impl Transport for FakeDns {
        fn connect<'a>(&'a self, host: &'a str, port: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
            assert_eq!((host, port), ("192.0.2.53", 53));
            let (client, mut server) = tokio::io::duplex(7);
            let respond = self.respond.clone();
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                server.read_exact(&mut len).await.unwrap();
                let mut wire = vec![0u8; usize::from(u16::from_be_bytes(len))];
                server.read_exact(&mut wire).await.unwrap();
                let reply = respond(Message::from_vec(&wire).unwrap());
                // The client may have given up already.
                let _ = server.write_all(&reply).await;
                let _ = server.shutdown().await;
            });
            Box::pin(async move { Ok(Box::new(client) as BoxStream) })
        }

        fn name(&self) -> &'static str {
            "fake"
        }
    }

    const SERVER: SocketAddr = SocketAddr::new(
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 53)),
        53,
    );

    fn reply_to(query: &Message) -> Message {
        let mut reply = Message::response(query.metadata.id, OpCode::Query);
        reply.add_queries(query.queries.clone());
        reply
    }

    fn srv(owner: &Name, priority: u16, weight: u16, port: u16, target: &str) -> Record {
        let target = Name::from_ascii(target).unwrap();
        Record::from_rdata(
            owner.clone(),
            300,
            RData::SRV(SRV::new(priority, weight, port, target)),
        )
    }

    async fn lookup(dns: FakeDns) -> Result<Vec<SrvTarget>, SrvError> {
        lookup_proxies(&dns, SERVER, "Example.COM.", Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn reads_targets_and_follows_cnames() {
        let dns = FakeDns::answering(|query| {
            let asked = query.queries[0].name().clone();
            assert_eq!(asked.to_ascii(), "_shroud._tcp.example.com.");
            assert_eq!(query.queries[0].query_type(), RecordType::SRV);
            assert!(query.metadata.recursion_desired);
            let alias = Name::from_ascii("srv.example.net.").unwrap();
            let mut reply = reply_to(query);
            reply.add_answer(Record::from_rdata(
                asked,
                300,
                RData::CNAME(CNAME(alias.clone())),
            ));
            reply.add_answer(srv(&alias, 20, 0, 8443, "Proxy-B.example.NET."));
            reply.add_answer(srv(&alias, 10, 0, 443, "proxy-a.example.net."));
            reply.add_answer(srv(&alias, 10, 0, 443, "proxy-a.example.net."));
            // Not a hostname: skipped.
            reply.add_answer(srv(&alias, 10, 0, 443, "*.example.net."));
            reply
        });
        let targets = lookup(dns).await.unwrap();
        assert_eq!(
            targets,
            [
                SrvTarget {
                    name: "proxy-a.example.net".into(),
                    port: 443,
                    priority: 10,
                    weight: 0
                },
                SrvTarget {
                    name: "proxy-b.example.net".into(),
                    port: 8443,
                    priority: 20,
                    weight: 0
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_single_dot_target_means_not_available() {
        let dns = FakeDns::answering(|query| {
            let mut reply = reply_to(query);
            reply.add_answer(srv(query.queries[0].name(), 0, 0, 0, "."));
            reply
        });
        let err = lookup(dns).await.unwrap_err();
        assert!(
            matches!(err, SrvError::ServiceNotAvailable { ref name } if name == "_shroud._tcp.example.com"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn negative_and_error_answers() {
        let nx = FakeDns::answering(|query| {
            let mut reply = reply_to(query);
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply
        });
        assert!(matches!(lookup(nx).await, Err(SrvError::NotFound { .. })));

        let empty = FakeDns::answering(reply_to);
        assert!(matches!(
            lookup(empty).await,
            Err(SrvError::NotFound { .. })
        ));

        let servfail = FakeDns::answering(|query| {
            let mut reply = reply_to(query);
            reply.metadata.response_code = ResponseCode::ServFail;
            reply
        });
        assert!(matches!(
            lookup(servfail).await,
            Err(SrvError::ServerError(ResponseCode::ServFail))
        ));

        let truncated = FakeDns::answering(|query| {
            let mut reply = reply_to(query);
            reply.metadata.truncation = true;
            reply
        });
        assert!(matches!(lookup(truncated).await, Err(SrvError::Truncated)));
    }

    #[tokio::test]
    async fn refuses_answers_to_another_question() {
        let wrong_id = FakeDns::answering(|query| {
            let mut reply = reply_to(query);
            reply.metadata.id = query.metadata.id.wrapping_add(1);
            reply
        });
        assert!(matches!(lookup(wrong_id).await, Err(SrvError::Mismatch(_))));

        let wrong_name = FakeDns::answering(|query| {
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            let other = Name::from_ascii("_shroud._tcp.example.org.").unwrap();
            reply.add_query(Query::query(other.clone(), RecordType::SRV));
            reply.add_answer(srv(&other, 0, 0, 443, "evil.example.org."));
            reply
        });
        assert!(matches!(
            lookup(wrong_name).await,
            Err(SrvError::Mismatch(_))
        ));

        let wrong_type = FakeDns::answering(|query| {
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            reply.add_query(Query::query(
                query.queries[0].name().clone(),
                RecordType::TXT,
            ));
            reply
        });
        assert!(matches!(
            lookup(wrong_type).await,
            Err(SrvError::Mismatch(_))
        ));

        let a_query = FakeDns::answering(|query| query.clone());
        assert!(matches!(lookup(a_query).await, Err(SrvError::Mismatch(_))));

        // The right id and question, but answers for another name are not taken.
        let stray = FakeDns::answering(|query| {
            let mut reply = reply_to(query);
            let other = Name::from_ascii("_shroud._tcp.example.org.").unwrap();
            reply.add_answer(srv(&other, 0, 0, 443, "evil.example.org."));
            reply
        });
        assert!(matches!(
            lookup(stray).await,
            Err(SrvError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn broken_answers() {
        let garbage = FakeDns::new(|_| frame(b"\x00\x01\x02"));
        assert!(matches!(lookup(garbage).await, Err(SrvError::Malformed(_))));

        // A length prefix promising more than arrives before the stream ends.
        let short = FakeDns::new(|_| vec![0x01, 0x00, 0xab, 0xcd]);
        let err = lookup(short).await.unwrap_err();
        let SrvError::Io { source, .. } = &err else {
            panic!("expected Io, got {err}");
        };
        assert_eq!(source.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_on_a_silent_server() {
        /// A transport whose streams never answer; it keeps their far ends open.
        #[derive(Default)]
        struct Silent(std::sync::Mutex<Vec<tokio::io::DuplexStream>>);
        impl Transport for Silent {
            fn connect<'a>(&'a self, _: &'a str, _: u16) -> BoxFuture<'a, io::Result<BoxStream>> {
                let (client, server) = tokio::io::duplex(1024);
                self.0.lock().unwrap().push(server);
                Box::pin(async move { Ok(Box::new(client) as BoxStream) })
            }
            fn name(&self) -> &'static str {
                "silent"
            }
        }
        let err = lookup_proxies(
            &Silent::default(),
            SERVER,
            "example.com",
            Duration::from_secs(3),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, SrvError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn refuses_names_that_are_not_hostnames() {
        let dns = FakeDns::answering(reply_to);
        for name in ["", "a b", &"a.".repeat(125)] {
            let err = lookup_proxies(&dns, SERVER, name, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(
                matches!(err, SrvError::BadHostname { .. }),
                "{name:?}: {err}"
            );
        }
    }
}
