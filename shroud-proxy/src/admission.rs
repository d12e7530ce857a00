//! Admission: the proxy's limits on new work, each checked before the work it guards is done,
//! and counted for as long as that work lasts.
//!
//! An overloaded proxy refuses new work early rather than slowing everyone down. In the order a
//! connection meets them:
//!
//! 1. **Connections at once** (`--max-connections`): checked in the accept loop, before
//!    anything is read, written or spawned; a connection over it is closed at once.
//! 2. **Connections per address** (`--max-connections-per-address`): checked right after, still
//!    before anything is read. Plain-HTTP visitors get `429 Too Many Requests`; TLS visitors and
//!    tunnels are closed (nothing can be said in TLS before the ClientHello is read). An address
//!    is an IPv4 address or an IPv6 /64 (one IPv6 host usually holds a whole /64). The count
//!    covers visitors for as long as they are connected, and tunnels until they are bound:
//!    tunnels arrive on the visitors' port and are anonymous until their bind is verified,
//!    after which the per-key limits below take over.
//! 3. The ClientHello or HTTP request head is read, within its deadline and size limit, and
//!    routed; an unknown name is refused (`unrecognized_name`, `404`).
//! 4. **Connections per hostname** (`--max-connections-per-hostname`): checked right after
//!    routing, counted while the visitor is connected. Over it, HTTP visitors get
//!    `503 Service Unavailable`, TLS visitors a fatal `internal_error` alert.
//! 5. **Streams per tunnel** (`--max-streams-per-tunnel`): the session refuses a new stream at
//!    once when the tunnel has that many open (see `shroud_mux::Session::open`); the visitor
//!    gets the same `503` or alert.
//!
//! A tunnel's bind is judged by its proof, then by the policy (and DNS), and only then by:
//!
//! 6. **Tunnels per key** (`--max-tunnels-per-key`): bound tunnels of one client key at once.
//!    Over it, every name of the bind is refused with status `LimitReached`, which clients
//!    retry with backoff.
//! 7. **Hostnames per key** (`--max-hostnames-per-key`): distinct names bound by all of a key's
//!    tunnels together. Names are admitted in the bind's order; one over the limit is refused
//!    with `LimitReached` when other tunnels of the key hold the names that fill it (they may
//!    close), or `ExceedsLimit`, which clients do not retry, when this bind alone asks for more.
//!
//! Each check and its count happen under one short lock, so concurrent connections cannot
//! slip past a limit together. Every count is held by a guard that gives it back on drop,
//! so no path (error, panic, cancelled task) can leak it.
//!
//! Refusals are logged one by one at debug, and counted ([`Admission::refusals`]); a summary
//! of the counts is logged at warn at most once a minute, so an operator sees that limits are
//! biting without a log line per visitor (and without visitors' addresses at that level).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shroud_mux::auth::PublicKey;
use shroud_mux::control::{BindOutcome, BindStatus};
use tracing::{debug, warn};

/// How often, at most, refusals are summarised at warn level.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// The limits [`Admission`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Most bound tunnels one client key may hold at once.
    pub max_tunnels_per_key: usize,
    /// Most distinct hostnames one key may hold bound, over all its tunnels.
    pub max_hostnames_per_key: usize,
    /// Most visitor connections to one hostname at once.
    pub max_connections_per_hostname: usize,
    /// Most connections from one address (IPv4, or IPv6 /64) at once: visitors, and tunnels
    /// until they are bound.
    pub max_connections_per_address: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        Self {
            max_tunnels_per_key: 8,
            max_hostnames_per_key: 64,
            max_connections_per_hostname: 10_000,
            max_connections_per_address: 512,
        }
    }
}

/// Which limit refused some work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-connections`.
    Connections,
    /// `--max-connections-per-address`.
    ConnectionsPerAddress,
    /// `--max-connections-per-hostname`.
    ConnectionsPerHostname,
    /// `--max-streams-per-tunnel`.
    StreamsPerTunnel,
    /// `--max-tunnels-per-key`.
    TunnelsPerKey,
    /// `--max-hostnames-per-key`.
    HostnamesPerKey,
}

impl Limit {
    /// Every limit, in the order of the module documentation.
    pub const ALL: [Limit; 6] = [
        Limit::Connections,
        Limit::ConnectionsPerAddress,
        Limit::ConnectionsPerHostname,
        Limit::StreamsPerTunnel,
        Limit::TunnelsPerKey,
        Limit::HostnamesPerKey,
    ];

    /// The command-line flag that sets this limit.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::Connections => "--max-connections",
            Limit::ConnectionsPerAddress => "--max-connections-per-address",
            Limit::ConnectionsPerHostname => "--max-connections-per-hostname",
            Limit::StreamsPerTunnel => "--max-streams-per-tunnel",
            Limit::TunnelsPerKey => "--max-tunnels-per-key",
            Limit::HostnamesPerKey => "--max-hostnames-per-key",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How many times each limit has refused work since the proxy started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals {
    counts: [u64; Limit::ALL.len()],
}

impl Refusals {
    /// Refusals by `limit`.
    pub fn get(&self, limit: Limit) -> u64 {
        self.counts[limit.index()]
    }

    /// Refusals by every limit together.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// The proxy's live counts, and the limits they are held to.
pub struct Admission {
    limits: AdmissionLimits,
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    by_hostname: Arc<Mutex<HashMap<String, usize>>>,
    by_key: Arc<Mutex<HashMap<PublicKey, KeyCounts>>>,
    refusals: [AtomicU64; Limit::ALL.len()],
    /// When refusals were last summarised, and the counts then.
    summary: Mutex<Option<(Instant, Refusals)>>,
}

/// What one key holds at this proxy.
#[derive(Default)]
struct KeyCounts {
    tunnels: usize,
    /// Each bound name, with how many of the key's tunnels hold it.
    names: HashMap<String, usize>,
}

impl Admission {
    /// Fresh counts held to `limits`.
    pub fn new(limits: AdmissionLimits) -> Self {
        Self {
            limits,
            by_address: Arc::default(),
            by_hostname: Arc::default(),
            by_key: Arc::default(),
            refusals: Default::default(),
            summary: Mutex::new(None),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    /// Counts one more connection from `ip`, or refuses it (and records the refusal) when that
    /// address already has its limit.
    pub fn connection_from(&self, ip: IpAddr) -> Option<AddressGuard> {
        let address = address_key(ip);
        let admitted = {
            let mut counts = lock(&self.by_address);
            let count = counts.get(&address).copied().unwrap_or(0);
            if count >= self.limits.max_connections_per_address {
                false
            } else {
                counts.insert(address, count + 1);
                true
            }
        };
        if !admitted {
            debug!(%address, "connection limit per address reached; refusing");
            self.refused(Limit::ConnectionsPerAddress);
            return None;
        }
        Some(AddressGuard {
            counts: self.by_address.clone(),
            address,
        })
    }

    /// Counts one more visitor of `hostname`, or refuses it (and records the refusal) when the
    /// name already has its limit.
    pub fn visitor_for(&self, hostname: &str) -> Option<HostnameGuard> {
        let admitted = {
            let mut counts = lock(&self.by_hostname);
            match counts.get_mut(hostname) {
                Some(count) if *count >= self.limits.max_connections_per_hostname => false,
                Some(count) => {
                    *count += 1;
                    true
                }
                None if self.limits.max_connections_per_hostname == 0 => false,
                None => {
                    counts.insert(hostname.to_owned(), 1);
                    true
                }
            }
        };
        if !admitted {
            debug!(host = %hostname, "connection limit per hostname reached; refusing");
            self.refused(Limit::ConnectionsPerHostname);
            return None;
        }
        Some(HostnameGuard {
            counts: self.by_hostname.clone(),
            hostname: hostname.to_owned(),
        })
    }

    /// Holds a bind to the per-key limits. `outcomes` are the verdicts so far, one per name of
    /// the bind; each `Bound` one that a limit refuses is changed to `LimitReached` or
    /// `ExceedsLimit`, with a reason naming the limit. Returns the guard that keeps the
    /// tunnel and its names counted, or `None` when no name is left bound.
    pub fn admit_bind(&self, key: &PublicKey, outcomes: &mut [BindOutcome]) -> Option<KeyGuard> {
        if !outcomes.iter().any(|o| o.status == BindStatus::Bound) {
            return None;
        }
        let limits = &self.limits;
        let mut refused = None;
        let mut admitted = Vec::new();
        {
            let mut keys = lock(&self.by_key);
            let counts = keys.entry(*key).or_default();
            if counts.tunnels >= limits.max_tunnels_per_key {
                let reason = format!(
                    "this key already has as many tunnels bound on this proxy as it allows one \
                     key ({}, --max-tunnels-per-key); retry when one closes",
                    limits.max_tunnels_per_key
                );
                for outcome in outcomes.iter_mut() {
                    if outcome.status == BindStatus::Bound {
                        outcome.status = BindStatus::LimitReached;
                        outcome.reason = reason.clone();
                    }
                }
                refused = Some(Limit::TunnelsPerKey);
            } else {
                let mut new_names = 0;
                for outcome in outcomes.iter_mut() {
                    if outcome.status != BindStatus::Bound {
                        continue;
                    }
                    let held = counts.names.contains_key(&outcome.name);
                    if held || counts.names.len() + new_names < limits.max_hostnames_per_key {
                        new_names += usize::from(!held);
                        admitted.push(outcome.name.clone());
                        continue;
                    }
                    refused = Some(Limit::HostnamesPerKey);
                    if admitted.len() >= limits.max_hostnames_per_key {
                        // The names this bind was granted fill the limit by themselves.
                        outcome.status = BindStatus::ExceedsLimit;
                        outcome.reason = format!(
                            "this bind asks for more hostnames than this proxy lets one key \
                             hold ({}, --max-hostnames-per-key)",
                            limits.max_hostnames_per_key
                        );
                    } else {
                        outcome.status = BindStatus::LimitReached;
                        outcome.reason = format!(
                            "this key already has as many hostnames bound on this proxy as it \
                             allows one key ({}, --max-hostnames-per-key); retry when one is \
                             unbound",
                            limits.max_hostnames_per_key
                        );
                    }
                }
                if !admitted.is_empty() {
                    counts.tunnels += 1;
                    for name in &admitted {
                        *counts.names.entry(name.clone()).or_insert(0) += 1;
                    }
                }
            }
            if counts.tunnels == 0 {
                keys.remove(key);
            }
        }
        if let Some(limit) = refused {
            debug!(%key, flag = limit.flag(), "per-key limit reached; refusing names of a bind");
            self.refused(limit);
        }
        if admitted.is_empty() {
            return None;
        }
        Some(KeyGuard {
            counts: self.by_key.clone(),
            key: *key,
            names: admitted,
        })
    }

    /// Records work refused by `limit` outside this module (connections at once, streams per
    /// tunnel), and summarises refusals now and then.
    pub fn refused(&self, limit: Limit) {
        self.refusals[limit.index()].fetch_add(1, Ordering::Relaxed);
        self.summarize();
    }

    /// How often each limit has refused work so far.
    pub fn refusals(&self) -> Refusals {
        let mut refusals = Refusals::default();
        for limit in Limit::ALL {
            refusals.counts[limit.index()] = self.refusals[limit.index()].load(Ordering::Relaxed);
        }
        refusals
    }

    /// Logs what each limit refused since the last summary, if that was long enough ago (or
    /// never). Under load, whoever finds the lock taken skips it: the summary is best effort.
    fn summarize(&self) {
        let Ok(mut last) = self.summary.try_lock() else {
            return;
        };
        let now = Instant::now();
        if last.is_some_and(|(at, _)| now.duration_since(at) < SUMMARY_INTERVAL) {
            return;
        }
        let before = last.map(|(_, counts)| counts).unwrap_or_default();
        let current = self.refusals();
        let since = |limit: Limit| current.get(limit) - before.get(limit);
        warn!(
            connections = since(Limit::Connections),
            per_address = since(Limit::ConnectionsPerAddress),
            per_hostname = since(Limit::ConnectionsPerHostname),
            streams_per_tunnel = since(Limit::StreamsPerTunnel),
            tunnels_per_key = since(Limit::TunnelsPerKey),
            hostnames_per_key = since(Limit::HostnamesPerKey),
            "limits refused new work (counts since the last report, at most one a minute)"
        );
        *last = Some((now, current));
    }
}

/// One connection counted against its address; gives the slot back on drop.
pub struct AddressGuard {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl Drop for AddressGuard {
    fn drop(&mut self) {
        release(&self.counts, &self.address);
    }
}

impl std::fmt::Debug for AddressGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressGuard").finish_non_exhaustive()
    }
}

/// One visitor counted against its hostname; gives the slot back on drop.
pub struct HostnameGuard {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    hostname: String,
}

impl Drop for HostnameGuard {
    fn drop(&mut self) {
        release(&self.counts, &self.hostname);
    }
}

/// A bound tunnel counted against its key, with the names it holds; gives them back on drop.
pub struct KeyGuard {
    counts: Arc<Mutex<HashMap<PublicKey, KeyCounts>>>,
    key: PublicKey,
    names: Vec<String>,
}

impl KeyGuard {
    /// Stops counting `hostname` for this tunnel (it was unbound while the tunnel lives on).
    pub fn release_name(&mut self, hostname: &str) {
        let Some(at) = self.names.iter().position(|n| n == hostname) else {
            return;
        };
        self.names.swap_remove(at);
        let mut keys = lock(&self.counts);
        if let Some(counts) = keys.get_mut(&self.key) {
            release_name(counts, hostname);
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let mut keys = lock(&self.counts);
        let Some(counts) = keys.get_mut(&self.key) else {
            return;
        };
        for name in &self.names {
            release_name(counts, name);
        }
        counts.tunnels = counts.tunnels.saturating_sub(1);
        if counts.tunnels == 0 {
            keys.remove(&self.key);
        }
    }
}

fn release_name(counts: &mut KeyCounts, hostname: &str) {
    if let Some(holders) = counts.names.get_mut(hostname) {
        *holders -= 1;
        if *holders == 0 {
            counts.names.remove(hostname);
        }
    }
}

/// Gives back one count of `key`, forgetting keys that reach zero so the map only holds
/// what is in use.
fn release<K: std::hash::Hash + Eq>(counts: &Mutex<HashMap<K, usize>>, key: &K) {
    let mut counts = lock(counts);
    if let Some(count) = counts.get_mut(key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(key);
        }
    }
}

/// What connections are counted by: an IPv4 address (IPv4-mapped IPv6 included, as a dual-stack
/// listener reports them), or an IPv6 address's /64.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single insert, increment or removal, so a panic
    // elsewhere cannot leave the counts half-changed: a poisoned lock is still sound.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use shroud_mux::auth::SecretKey;

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_tunnels_per_key: 2,
            max_hostnames_per_key: 3,
            max_connections_per_hostname: 2,
            max_connections_per_address: 2,
        }
    }

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public()
    }

    fn bound(names: &[&str]) -> Vec<BindOutcome> {
        names
            .iter()
            .map(|name| BindOutcome {
                name: (*name).to_owned(),
                status: BindStatus::Bound,
                reason: String::new(),
            })
            .collect()
    }

    fn statuses(outcomes: &[BindOutcome]) -> Vec<BindStatus> {
        outcomes.iter().map(|o| o.status).collect()
    }

    #[test]
    fn addresses_are_counted_while_connected() {
        let admission = Admission::new(limits());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = admission.connection_from(ip).unwrap();
        let _second = admission.connection_from(ip).unwrap();
        assert!(admission.connection_from(ip).is_none());
        // Another address is not affected.
        assert!(admission
            .connection_from("192.0.2.2".parse().unwrap())
            .is_some());
        drop(first);
        assert!(admission.connection_from(ip).is_some());
        assert_eq!(admission.refusals().get(Limit::ConnectionsPerAddress), 1);
        assert_eq!(admission.refusals().total(), 1);
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_ipv4_as_ipv4() {
        let admission = Admission::new(limits());
        let _a = admission
            .connection_from("2001:db8::1".parse().unwrap())
            .unwrap();
        let _b = admission
            .connection_from("2001:db8::ffff:2".parse().unwrap())
            .unwrap();
        assert!(admission
            .connection_from("2001:db8:0:0:1::3".parse().unwrap())
            .is_none());
        assert!(admission
            .connection_from("2001:db8:0:1::1".parse().unwrap())
            .is_some());
        let _c = admission
            .connection_from("::ffff:192.0.2.9".parse().unwrap())
            .unwrap();
        let _d = admission
            .connection_from("192.0.2.9".parse().unwrap())
            .unwrap();
        assert!(admission
            .connection_from("192.0.2.9".parse().unwrap())
            .is_none());
    }

    #[test]
    fn hostnames_are_counted_while_connected_and_forgotten_at_zero() {
        let admission = Admission::new(limits());
        let a1 = admission.visitor_for("a.test").unwrap();
        let a2 = admission.visitor_for("a.test").unwrap();
        assert!(admission.visitor_for("a.test").is_none());
        let _b = admission.visitor_for("b.test").unwrap();
        drop(a1);
        let _a3 = admission.visitor_for("a.test").unwrap();
        drop(a2);
        drop(_a3);
        assert!(!lock(&admission.by_hostname).contains_key("a.test"));
        assert_eq!(admission.refusals().get(Limit::ConnectionsPerHostname), 1);
    }

    #[test]
    fn tunnels_per_key_refuse_every_name_for_later() {
        let admission = Admission::new(limits());
        let k = key(1);
        let first = admission.admit_bind(&k, &mut bound(&["a.test"])).unwrap();
        let _second = admission.admit_bind(&k, &mut bound(&["a.test"])).unwrap();
        let mut third = bound(&["a.test"]);
        assert!(admission.admit_bind(&k, &mut third).is_none());
        assert_eq!(statuses(&third), [BindStatus::LimitReached]);
        assert!(third[0].reason.contains("(2, --max-tunnels-per-key)"));
        // Reasons travel as str8: they must fit.
        assert!(third[0].reason.len() <= 255);
        // Another key is not affected.
        assert!(admission
            .admit_bind(&key(2), &mut bound(&["b.test"]))
            .is_some());
        drop(first);
        assert!(admission.admit_bind(&k, &mut bound(&["a.test"])).is_some());
        assert_eq!(admission.refusals().get(Limit::TunnelsPerKey), 1);
    }

    #[test]
    fn hostnames_per_key_count_distinct_names_over_all_tunnels() {
        let admission = Admission::new(limits());
        let k = key(1);
        let mut first = admission
            .admit_bind(&k, &mut bound(&["a.test", "b.test"]))
            .unwrap();
        // a.test again costs nothing; c.test is the third and last; d.test is one too many,
        // but only because the other tunnel holds two: retry later.
        let mut second = bound(&["a.test", "c.test", "d.test"]);
        let guard = admission.admit_bind(&k, &mut second).unwrap();
        assert_eq!(
            statuses(&second),
            [
                BindStatus::Bound,
                BindStatus::Bound,
                BindStatus::LimitReached
            ]
        );
        assert!(second[2].reason.contains("(3, --max-hostnames-per-key)"));
        assert!(second[2].reason.len() <= 255);
        drop(guard);
        // Names leave with their tunnel, and one unbound while the tunnel lives leaves too.
        first.release_name("b.test");
        let mut third = bound(&["c.test", "d.test"]);
        assert!(admission.admit_bind(&k, &mut third).is_some());
        assert_eq!(statuses(&third), [BindStatus::Bound, BindStatus::Bound]);
        assert_eq!(admission.refusals().get(Limit::HostnamesPerKey), 1);
    }

    #[test]
    fn a_bind_that_alone_exceeds_the_hostname_limit_is_refused_for_good() {
        let admission = Admission::new(limits());
        let mut outcomes = bound(&["a.test", "b.test", "c.test", "d.test"]);
        // A name the policy refused neither counts nor changes.
        outcomes[1].status = BindStatus::NotAuthorized;
        let mut more = outcomes.clone();
        more.push(bound(&["e.test"]).remove(0));
        let guard = admission.admit_bind(&key(1), &mut more);
        assert!(guard.is_some());
        assert_eq!(
            statuses(&more),
            [
                BindStatus::Bound,
                BindStatus::NotAuthorized,
                BindStatus::Bound,
                BindStatus::Bound,
                BindStatus::ExceedsLimit
            ]
        );
        assert!(more[4].status.is_permanent());
        assert!(more[4].reason.contains("(3, --max-hostnames-per-key)"));
        assert!(more[4].reason.len() <= 255);
    }

    #[test]
    fn a_bind_with_nothing_bound_counts_nothing() {
        let admission = Admission::new(limits());
        let mut refused = bound(&["a.test"]);
        refused[0].status = BindStatus::NotAuthorized;
        for _ in 0..5 {
            assert!(admission.admit_bind(&key(1), &mut refused).is_none());
        }
        assert!(lock(&admission.by_key).is_empty());
        assert_eq!(admission.refusals().total(), 0);
    }

    #[test]
    fn guards_release_everything_they_hold() {
        let admission = Admission::new(limits());
        let k = key(1);
        {
            let _t = admission.admit_bind(&k, &mut bound(&["a.test", "b.test"]));
            let _a = admission.connection_from("192.0.2.1".parse().unwrap());
            let _h = admission.visitor_for("a.test");
        }
        assert!(lock(&admission.by_key).is_empty());
        assert!(lock(&admission.by_address).is_empty());
        assert!(lock(&admission.by_hostname).is_empty());
    }
}
