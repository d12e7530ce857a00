//! A real DNS server on `127.0.0.1:0` that serves one in-memory zone, for tests.
//!
//! [`TestDns`] answers over UDP and TCP on the same port, as a real name server does, so a
//! resolver may fall back from one to the other. Its zone is mutable while it runs: a test adds
//! a record, looks it up, removes it (to revoke a TXT key, say) and looks again. It counts the
//! requests it receives, so a test can prove that a cached answer did not reach the network.
//!
//! Answers are authoritative: records of the asked type; a CNAME followed within the zone;
//! NODATA (NOERROR, no answers, the zone's SOA in the authority section) for a name that exists
//! with other types or has names below it; NXDOMAIN with the SOA otherwise; REFUSED for names
//! outside the zone. The SOA's TTL and MINIMUM are the negative-caching TTL
//! ([`TestDns::set_negative_ttl`]).
//!
//! The server runs on the tokio runtime that started it and stops when the handle is dropped.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context as _};
use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::Server;
use shroud_discovery::dns::{Answer, ZoneHandler};

/// How long the server waits for a request on an idle TCP connection.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// The longest CNAME chain followed inside the zone.
const MAX_CNAME_CHAIN: usize = 8;
/// The negative-caching TTL of a new zone, in seconds.
const DEFAULT_NEGATIVE_TTL: u32 = 60;
/// The longest character-string in a TXT record (RFC 1035 3.3).
const MAX_CHARACTER_STRING: usize = 255;

/// A DNS server for one zone on `127.0.0.1`, UDP and TCP on one port. Stops when dropped.
pub struct TestDns {
    /// Where it listens, for both UDP and TCP.
    pub addr: SocketAddr,
    zone: Arc<Zone>,
    server: Server<ZoneHandler<Handler>>,
}

impl TestDns {
    /// Starts a server authoritative for `origin` (e.g. `example.test`), with no records but
    /// the zone's SOA.
    ///
    /// Binds UDP to port 0, then TCP to the same port, trying again with a new port if TCP's
    /// is taken. Must be called on a tokio runtime; the server runs on it.
    pub async fn start(origin: &str) -> anyhow::Result<TestDns> {
        let origin_key = key_of(origin);
        if origin_key.is_empty() {
            bail!("the zone's origin may not be the root");
        }
        let origin_name = fqdn(&origin_key)?;
        let zone = Arc::new(Zone {
            origin_key,
            origin: origin_name,
            records: Mutex::new(HashMap::new()),
            negative_ttl: AtomicU32::new(DEFAULT_NEGATIVE_TTL),
            queries: AtomicUsize::new(0),
        });

        let (udp, tcp) = shroud_discovery::dns::bind((Ipv4Addr::LOCALHOST, 0).into())
            .context("bind the DNS server's UDP socket and TCP listener")?;
        let addr = udp.local_addr().context("read the DNS server's address")?;

        let mut server = Server::new(ZoneHandler(Handler { zone: zone.clone() }));
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        Ok(TestDns { addr, zone, server })
    }

    /// Adds an A record. `name` is absolute (a trailing dot is optional) and inside the zone.
    pub fn add_a(&self, name: &str, addr: Ipv4Addr, ttl: u32) -> anyhow::Result<()> {
        self.add(name, ttl, RData::A(A(addr)))
    }

    /// Adds a CNAME record from `name` to `target` (any absolute name).
    pub fn add_cname(&self, name: &str, target: &str, ttl: u32) -> anyhow::Result<()> {
        let target = fqdn(&key_of(target))?;
        self.add(name, ttl, RData::CNAME(CNAME(target)))
    }

    /// Adds an SRV record; a `target` of `.` says the service is not available (RFC 2782).
    pub fn add_srv(
        &self,
        name: &str,
        priority: u16,
        weight: u16,
        port: u16,
        target: &str,
        ttl: u32,
    ) -> anyhow::Result<()> {
        let target = fqdn(&key_of(target))?;
        self.add(
            name,
            ttl,
            RData::SRV(SRV::new(priority, weight, port, target)),
        )
    }

    /// Adds a TXT record holding `text`, split into 255-byte character-strings if longer.
    pub fn add_txt(&self, name: &str, text: &str, ttl: u32) -> anyhow::Result<()> {
        let strings: Vec<&[u8]> = if text.is_empty() {
            vec![b""]
        } else {
            text.as_bytes().chunks(MAX_CHARACTER_STRING).collect()
        };
        self.add(name, ttl, RData::TXT(TXT::from_bytes(strings)))
    }

    /// Removes every record of type `rtype` at `name`; returns how many there were.
    pub fn remove(&self, name: &str, rtype: RecordType) -> usize {
        let key = key_of(name);
        let mut records = self.zone.records();
        let Some(entries) = records.get_mut(&key) else {
            return 0;
        };
        let before = entries.len();
        entries.retain(|entry| entry.data.record_type() != rtype);
        let removed = before - entries.len();
        if entries.is_empty() {
            records.remove(&key);
        }
        removed
    }

    /// Sets the TTL and MINIMUM of the zone's SOA, which resolvers use to cache NXDOMAIN and
    /// NODATA answers (RFC 2308). 60 s unless set.
    pub fn set_negative_ttl(&self, ttl: u32) {
        self.zone.negative_ttl.store(ttl, Ordering::Relaxed);
    }

    /// How many requests have reached the server, over UDP and TCP together.
    pub fn queries(&self) -> usize {
        self.zone.queries.load(Ordering::SeqCst)
    }

    fn add(&self, name: &str, ttl: u32, data: RData) -> anyhow::Result<()> {
        let key = key_of(name);
        if !self.zone.contains(&key) {
            bail!("{name:?} is not inside the zone {}", self.zone.origin);
        }
        // Checks the name is a valid domain name.
        fqdn(&key)?;
        self.zone
            .records()
            .entry(key)
            .or_default()
            .push(Entry { ttl, data });
        Ok(())
    }
}

impl std::fmt::Debug for TestDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDns")
            .field("addr", &self.addr)
            .field("origin", &self.zone.origin_key)
            .finish_non_exhaustive()
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        // Dropping the server aborts its tasks too; cancelling first lets them end cleanly.
        self.server.shutdown_token().cancel();
    }
}

/// A name as the zone's map keys it: lower case, no trailing dot.
fn key_of(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The absolute [`Name`] of a key.
fn fqdn(key: &str) -> anyhow::Result<Name> {
    Name::from_ascii(format!("{key}.")).with_context(|| format!("{key:?} is not a domain name"))
}

/// One record's type-specific part, stored under its owner name.
#[derive(Debug, Clone)]
struct Entry {
    ttl: u32,
    data: RData,
}

/// The zone: its records and counters, shared by the handle and the server.
#[derive(Debug)]
struct Zone {
    origin_key: String,
    origin: Name,
    records: Mutex<HashMap<String, Vec<Entry>>>,
    negative_ttl: AtomicU32,
    queries: AtomicUsize,
}

/// What the zone answers to one question.
struct ZoneAnswer {
    code: ResponseCode,
    answers: Vec<Record>,
    soa: Option<Record>,
}

impl Zone {
    fn records(&self) -> MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn contains(&self, key: &str) -> bool {
        key == self.origin_key
            || key
                .strip_suffix(self.origin_key.as_str())
                .is_some_and(|head| head.ends_with('.'))
    }

    fn soa(&self) -> Record {
        let ttl = self.negative_ttl.load(Ordering::Relaxed);
        let prepend = |label: &str| {
            self.origin
                .prepend_label(label)
                .unwrap_or_else(|_| self.origin.clone())
        };
        let soa = SOA::new(
            prepend("ns"),
            prepend("hostmaster"),
            1,
            3600,
            600,
            86400,
            ttl,
        );
        Record::from_rdata(self.origin.clone(), ttl, RData::SOA(soa))
    }

    fn answer(&self, query: &Query) -> ZoneAnswer {
        let qtype = query.query_type();
        let mut name = query.name().clone();
        let mut key = key_of(&name.to_ascii());
        if !self.contains(&key) {
            return ZoneAnswer {
                code: ResponseCode::Refused,
                answers: Vec::new(),
                soa: None,
            };
        }
        let records = self.records();
        let mut answers = Vec::new();
        for _ in 0..MAX_CNAME_CHAIN {
            if key == self.origin_key && qtype == RecordType::SOA {
                answers.push(self.soa());
                return ZoneAnswer {
                    code: ResponseCode::NoError,
                    answers,
                    soa: None,
                };
            }
            let entries = records.get(&key).map(Vec::as_slice).unwrap_or_default();
            let matching: Vec<Record> = entries
                .iter()
                .filter(|entry| qtype == RecordType::ANY || entry.data.record_type() == qtype)
                .map(|entry| Record::from_rdata(name.clone(), entry.ttl, entry.data.clone()))
                .collect();
            if !matching.is_empty() {
                answers.extend(matching);
                return ZoneAnswer {
                    code: ResponseCode::NoError,
                    answers,
                    soa: None,
                };
            }
            let cname = entries.iter().find_map(|entry| match &entry.data {
                RData::CNAME(target) => Some((entry.ttl, target.0.clone())),
                _ => None,
            });
            if let Some((ttl, target)) = cname {
                answers.push(Record::from_rdata(
                    name.clone(),
                    ttl,
                    RData::CNAME(CNAME(target.clone())),
                ));
                key = key_of(&target.to_ascii());
                name = target;
                if !self.contains(&key) {
                    // Out of our zone: the resolver follows it elsewhere.
                    return ZoneAnswer {
                        code: ResponseCode::NoError,
                        answers,
                        soa: None,
                    };
                }
                continue;
            }
            let dotted = format!(".{key}");
            let exists = !entries.is_empty()
                || key == self.origin_key
                || records.keys().any(|other| other.ends_with(&dotted));
            return ZoneAnswer {
                code: if exists {
                    ResponseCode::NoError
                } else {
                    ResponseCode::NXDomain
                },
                answers,
                soa: Some(self.soa()),
            };
        }
        ZoneAnswer {
            code: ResponseCode::ServFail,
            answers: Vec::new(),
            soa: None,
        }
    }
}

/// The server's zone: answers from the [`Zone`] and counts requests.
struct Handler {
    zone: Arc<Zone>,
}

impl shroud_discovery::dns::Zone for Handler {
    fn answer(&self, query: &Query) -> Answer {
        let answer = self.zone.answer(query);
        Answer {
            code: answer.code,
            answers: answer.answers,
            authority: answer.soa.into_iter().collect(),
        }
    }

    fn on_request(&self) {
        self.zone.queries.fetch_add(1, Ordering::SeqCst);
    }
}
