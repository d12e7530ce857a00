//! Authorization by DNS: a hostname's owner lists the client keys that may publish it.
//!
//! The owner of `example.com` publishes TXT records at `_shroud.example.com`, one key each:
//!
//! ```text
//! _shroud.example.com. 300 IN TXT "shroud-key=ed25519:..."
//! ```
//!
//! [`DnsAuthorizer::allows`] says whether a key is listed. Only a record whose whole text is
//! `shroud-key=` followed by a key in [`PublicKey`]'s text form counts; other TXT records at
//! that name are ignored. Answers are cached for their TTL, clamped to
//! [`DnsAuthLimits::min_ttl`]..[`DnsAuthLimits::max_ttl`], so a removed record stops granting
//! within that time; negative answers (NXDOMAIN, no TXT records) are cached briefly. A lookup
//! that fails is [`DnsVerdict::Unavailable`], never a grant, and is not cached.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use hickory_resolver::net::{DnsError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;
use shroud_mux::auth::PublicKey;
use tokio::time::Instant;

/// The label under a hostname that holds its TXT records: `_shroud.HOSTNAME`.
pub const TXT_LABEL: &str = "_shroud";

/// What a TXT record's text starts with when it lists a key.
pub const KEY_PREFIX: &str = "shroud-key=";

/// Bounds on lookups and on the cache of answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAuthLimits {
    /// The shortest time an answer is cached, whatever its TTL (default 5 s).
    pub min_ttl: Duration,
    /// The longest time an answer is cached, whatever its TTL (default 1 h).
    pub max_ttl: Duration,
    /// The longest time a negative answer (NXDOMAIN, or no TXT records) is cached, even if the
    /// zone's SOA allows longer (default 60 s). Never less than `min_ttl`.
    pub max_negative_ttl: Duration,
    /// How long a negative answer without an SOA is cached (default 30 s).
    pub default_negative_ttl: Duration,
    /// How many hostnames' answers are cached at most; the oldest go first (default 10,000).
    pub max_names: usize,
    /// How long one lookup may take, retries included, before it is unavailable (default 5 s).
    pub timeout: Duration,
}

impl Default for DnsAuthLimits {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
            max_negative_ttl: Duration::from_secs(60),
            default_negative_ttl: Duration::from_secs(30),
            max_names: 10_000,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Whether DNS lists a key for a hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsVerdict {
    /// The key is listed. The answer is cached for `valid_for` more; ask again after that to
    /// notice a revocation.
    Allowed {
        /// How long this answer stays current.
        valid_for: Duration,
    },
    /// The name has no record listing this key (or no `_shroud` records at all).
    NotListed,
    /// DNS could not answer (timeout, SERVFAIL, unreachable server); the reason, for logs.
    /// Never a grant.
    Unavailable(String),
}

/// Why a [`DnsAuthorizer`] could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DnsAuthError {
    /// The resolver could not be set up.
    #[error(transparent)]
    Resolver(#[from] shroud_process::dns::ResolverError),
}

/// Looks up `_shroud.HOSTNAME` TXT records and caches what they list.
pub struct DnsAuthorizer {
    resolver: TokioResolver,
    limits: DnsAuthLimits,
    cache: Mutex<Cache>,
}

impl fmt::Debug for DnsAuthorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsAuthorizer")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl DnsAuthorizer {
    /// An authorizer that asks `dns_server` (over UDP, then TCP for truncated answers), or the
    /// servers in the system's `/etc/resolv.conf` when `None`.
    ///
    /// Must be called on a tokio runtime.
    pub fn new(
        dns_server: Option<SocketAddr>,
        limits: DnsAuthLimits,
    ) -> Result<Self, DnsAuthError> {
        // Three tries fit in one lookup's budget, so a lost UDP packet is retried. This module
        // caches answers itself, with its own bounds; see `lookup`.
        let try_timeout = (limits.timeout / 3).max(Duration::from_millis(100));
        let resolver = shroud_process::dns::resolver(dns_server, try_timeout, false)?;
        Ok(Self {
            resolver,
            limits,
            cache: Mutex::new(Cache::default()),
        })
    }

    /// Whether DNS lists `key` for `hostname` now. See [`DnsAuthorizer::allows_at`].
    pub async fn allows(&self, hostname: &str, key: &PublicKey) -> DnsVerdict {
        self.allows_at(hostname, key, Instant::now()).await
    }

    /// Whether DNS lists `key` for `hostname` at `now`: answers from the cache while its entry
    /// for `hostname` is current at `now`, otherwise looks `_shroud.HOSTNAME` up and caches the
    /// answer from `now` on. `now` is explicit so that tests can move time.
    pub async fn allows_at(&self, hostname: &str, key: &PublicKey, now: Instant) -> DnsVerdict {
        let Ok(hostname) = shroud_mux::hostname::normalize(hostname) else {
            // No record can list a key for a name that is not a hostname.
            return DnsVerdict::NotListed;
        };
        let cached = self.cache_lock().get(&hostname, now);
        let entry = match cached {
            Some(entry) => entry,
            None => match self.lookup(&hostname).await {
                Ok(Some(answer)) => {
                    let entry = Entry {
                        keys: answer.keys,
                        expires: now + answer.ttl,
                    };
                    self.cache_lock()
                        .insert(hostname, entry.clone(), now, self.limits.max_names);
                    entry
                }
                Ok(None) => return DnsVerdict::NotListed,
                Err(reason) => return DnsVerdict::Unavailable(reason),
            },
        };
        if entry.keys.contains(key) {
            DnsVerdict::Allowed {
                valid_for: entry.expires.saturating_duration_since(now),
            }
        } else {
            DnsVerdict::NotListed
        }
    }

    /// Asks DNS for the keys listed for `hostname` and how long to trust the answer.
    ///
    /// `Ok(None)` means the name cannot carry records at all (too long), `Err` that DNS did
    /// not answer.
    async fn lookup(&self, hostname: &str) -> Result<Option<Answer>, String> {
        let Ok(name) = Name::from_ascii(format!("{TXT_LABEL}.{hostname}.")) else {
            // Longer than DNS allows once the label is added.
            return Ok(None);
        };
        // The resolver caches nothing (cache_size 0), but make sure: this module's cache alone
        // decides when an answer is stale, so a revocation is seen once its TTL has passed.
        self.resolver
            .clear_lookup_cache(name.clone(), RecordType::TXT);
        let limits = &self.limits;
        let lookup = tokio::time::timeout(limits.timeout, self.resolver.txt_lookup(name)).await;
        let lookup = match lookup {
            Err(_) => return Err(format!("no answer within {:?}", limits.timeout)),
            Ok(Ok(lookup)) => lookup,
            // NXDOMAIN, or NOERROR without TXT records: nothing listed.
            Ok(Err(NetError::Dns(DnsError::NoRecordsFound(NoRecords {
                response_code: ResponseCode::NXDomain | ResponseCode::NoError,
                negative_ttl,
                ..
            })))) => {
                let ttl = negative_ttl
                    .map(|secs| Duration::from_secs(u64::from(secs)))
                    .unwrap_or(limits.default_negative_ttl)
                    .min(limits.max_negative_ttl)
                    .max(limits.min_ttl);
                return Ok(Some(Answer {
                    keys: Vec::new(),
                    ttl,
                }));
            }
            Ok(Err(err)) => return Err(err.to_string()),
        };

        let mut keys = Vec::new();
        let mut ttl = None::<u32>;
        for record in lookup.answers() {
            // The TTL of the whole answer is its shortest, CNAMEs on the way included.
            ttl = Some(ttl.map_or(record.ttl, |ttl| ttl.min(record.ttl)));
            let RData::TXT(txt) = &record.data else {
                continue;
            };
            // A TXT record's character-strings form one text (as for SPF, RFC 7208 3.3).
            let text: Vec<u8> = txt
                .txt_data
                .iter()
                .flat_map(|part| part.iter())
                .copied()
                .collect();
            match parse_key_record(&text) {
                Some(key) if !keys.contains(&key) => keys.push(key),
                Some(_) => {}
                None => tracing::debug!(
                    host = %hostname,
                    "ignoring a _shroud TXT record that is not shroud-key=KEY"
                ),
            }
        }
        let ttl = match ttl {
            Some(secs) => Duration::from_secs(u64::from(secs)),
            None => limits.min_ttl,
        };
        let ttl = ttl.min(limits.max_ttl).max(limits.min_ttl);
        Ok(Some(Answer { keys, ttl }))
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Every change to the cache is a single insert or remove; a panic elsewhere while the
        // lock was held cannot have left it inconsistent.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reads a TXT record's text as `shroud-key=KEY`; `None` if it is anything else.
pub fn parse_key_record(text: &[u8]) -> Option<PublicKey> {
    let text = std::str::from_utf8(text).ok()?;
    text.strip_prefix(KEY_PREFIX)?.parse().ok()
}

/// What one lookup found: the keys listed, and how long to trust that.
#[derive(Debug)]
struct Answer {
    keys: Vec<PublicKey>,
    ttl: Duration,
}

/// What DNS listed for one hostname, until when.
#[derive(Debug, Clone)]
struct Entry {
    keys: Vec<PublicKey>,
    expires: Instant,
}

/// Answers by hostname, at most `max_names` of them.
#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<String, (Entry, u64)>,
    /// Insertion counter: the entry with the smallest is the oldest.
    next_seq: u64,
}

impl Cache {
    fn get(&self, hostname: &str, now: Instant) -> Option<Entry> {
        let (entry, _) = self.entries.get(hostname)?;
        (now < entry.expires).then(|| entry.clone())
    }

    fn insert(&mut self, hostname: String, entry: Entry, now: Instant, max_names: usize) {
        if max_names == 0 {
            return;
        }
        if !self.entries.contains_key(&hostname) && self.entries.len() >= max_names {
            self.entries.retain(|_, (entry, _)| now < entry.expires);
            while self.entries.len() >= max_names {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, seq))| *seq)
                    .map(|(name, _)| name.clone());
                match oldest {
                    Some(name) => self.entries.remove(&name),
                    None => break,
                };
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.insert(hostname, (entry, seq));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use shroud_mux::auth::SecretKey;

    use super::*;

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public()
    }

    #[test]
    fn reads_only_exact_key_records() {
        let text = format!("shroud-key={}", key(1));
        assert_eq!(parse_key_record(text.as_bytes()), Some(key(1)));
        for bad in [
            format!("shroud-key= {}", key(1)),
            format!("shroud-key={} ", key(1)),
            format!("SHROUD-KEY={}", key(1)),
            format!("{}", key(1)),
            "shroud-key=ed25519:short".to_owned(),
            "v=spf1 -all".to_owned(),
        ] {
            assert_eq!(parse_key_record(bad.as_bytes()), None, "{bad:?}");
        }
        assert_eq!(parse_key_record(b"shroud-key=\xff"), None);
    }

    #[test]
    fn cache_expires_and_evicts_the_oldest() {
        let t0 = Instant::now();
        let entry = |secs| Entry {
            keys: vec![key(1)],
            expires: t0 + Duration::from_secs(secs),
        };
        let mut cache = Cache::default();
        cache.insert("a.test".into(), entry(10), t0, 2);
        cache.insert("b.test".into(), entry(10), t0, 2);
        assert!(cache.get("a.test", t0 + Duration::from_secs(9)).is_some());
        assert!(cache.get("a.test", t0 + Duration::from_secs(10)).is_none());

        // Full: the oldest (a) goes.
        cache.insert("c.test".into(), entry(10), t0, 2);
        assert_eq!(cache.entries.len(), 2);
        assert!(cache.get("a.test", t0).is_none());
        assert!(cache.get("b.test", t0).is_some());

        // Replacing a name does not evict another.
        cache.insert("b.test".into(), entry(20), t0, 2);
        assert!(cache.get("c.test", t0).is_some());

        // Expired entries go before live ones, however old.
        cache.insert("d.test".into(), entry(30), t0 + Duration::from_secs(15), 2);
        assert!(cache.get("b.test", t0 + Duration::from_secs(15)).is_some());
        assert!(cache.get("d.test", t0 + Duration::from_secs(15)).is_some());
        assert_eq!(cache.entries.len(), 2);
    }
}
