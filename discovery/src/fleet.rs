//! The fleet: which proxies exist, which are healthy, and which ones a hostname gets.
//!
//! Proxies enter the fleet two ways. Static entries come from the fleet file and are **always
//! listed**: nothing checks their health, so list there only proxies someone else watches.
//! Live entries come from heartbeats ([`Fleet::heartbeat`]); one not heard from for the
//! heartbeat timeout drops out, and one that says it is leaving ([`Fleet::leave`]) drops out at
//! once. Nothing is persisted: a restarted service rebuilds the fleet from the file and the
//! next round of heartbeats.
//!
//! [`Fleet::select`] picks the proxies for one hostname by rendezvous hashing, spreading them
//! across regions first, so each hostname gets a stable set and different hostnames spread
//! over the whole fleet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use shroud_mux::hostname::HostnameError;
use tokio::time::Instant;

use crate::signed::ProxyEntry;

/// Longest region label accepted, in bytes.
pub const MAX_REGION_LEN: usize = 64;
/// Most live (heartbeat) entries kept at once.
pub const DEFAULT_MAX_LIVE: usize = 4096;
/// Largest fleet file read, in bytes.
const MAX_FLEET_FILE_LEN: u64 = 1024 * 1024;
/// Most public addresses kept for one proxy.
pub const MAX_ADDRS_PER_PROXY: usize = 16;
/// Most bound hostnames kept for one proxy; a heartbeat naming more is kept in part.
pub const MAX_NAMES_PER_PROXY: usize = 4096;
/// Most bound hostnames kept over the whole fleet; past it, heartbeats' new names are dropped
/// (those names are then answered by rendezvous choice, as if held nowhere).
pub const MAX_NAMES_IN_FLEET: usize = 256 * 1024;

/// Why a proxy entry is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The name is not a hostname.
    #[error("proxy name {name:?} is not a valid hostname")]
    BadName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        #[source]
        source: HostnameError,
    },
    /// The port is 0.
    #[error("proxy {name} has port 0")]
    ZeroPort {
        /// The proxy's name.
        name: String,
    },
    /// The region is empty.
    #[error("proxy {name}:{port} has an empty region")]
    EmptyRegion {
        /// The proxy's name.
        name: String,
        /// The proxy's port.
        port: u16,
    },
    /// More public addresses than [`MAX_ADDRS_PER_PROXY`].
    #[error("proxy {name} lists more than {MAX_ADDRS_PER_PROXY} public addresses")]
    TooManyAddrs {
        /// The proxy's name.
        name: String,
    },
    /// The onion endpoint is not `ADDRESS.onion:PORT`.
    #[error("proxy {name}:{port} has an onion endpoint that is not ADDRESS.onion:PORT")]
    BadOnion {
        /// The proxy's name.
        name: String,
        /// The proxy's port.
        port: u16,
        /// What is wrong with it.
        #[source]
        source: shroud_mux::onion::OnionError,
    },
    /// The region is too long or holds control characters.
    #[error(
        "proxy {name}:{port} has a region longer than {MAX_REGION_LEN} bytes or with control \
         characters"
    )]
    BadRegion {
        /// The proxy's name.
        name: String,
        /// The proxy's port.
        port: u16,
    },
}

/// Checks an entry and returns it with its name normalised.
pub fn check_entry(entry: ProxyEntry) -> Result<ProxyEntry, EntryError> {
    let name =
        shroud_mux::hostname::normalize(&entry.name).map_err(|source| EntryError::BadName {
            name: entry.name.clone(),
            source,
        })?;
    if entry.port == 0 {
        return Err(EntryError::ZeroPort { name });
    }
    if entry.region.trim().is_empty() {
        return Err(EntryError::EmptyRegion {
            name,
            port: entry.port,
        });
    }
    if entry.region.len() > MAX_REGION_LEN || entry.region.chars().any(char::is_control) {
        return Err(EntryError::BadRegion {
            name,
            port: entry.port,
        });
    }
    let onion = entry
        .onion
        .as_deref()
        .map(crate::signed::check_onion)
        .transpose()
        .map_err(|source| EntryError::BadOnion {
            name: name.clone(),
            port: entry.port,
            source,
        })?;
    Ok(ProxyEntry {
        name,
        port: entry.port,
        region: entry.region,
        onion,
    })
}

/// The fleet file: `[[proxy]]` tables with `name`, `port`, `region` and, optionally, the
/// proxy's public `addrs` (which the service's DNS answers give visitors) and its `onion`
/// endpoint (what `shroud-proxy --onion-tunnel` printed, with the port).
///
/// ```toml
/// [[proxy]]
/// name = "p1.example.net"
/// port = 443
/// region = "eu"
/// addrs = ["192.0.2.10", "2001:db8::10"]
/// onion = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion:443"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    /// The static proxies.
    #[serde(default)]
    pub proxy: Vec<StaticProxy>,
}

/// One `[[proxy]]` of the fleet file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticProxy {
    /// The proxy's hostname.
    pub name: String,
    /// Its tunnel port.
    pub port: u16,
    /// Its region label.
    pub region: String,
    /// Its public addresses, if the service's DNS should answer them.
    #[serde(default)]
    pub addrs: Vec<IpAddr>,
    /// Its tunnel listener as an onion service, `ADDRESS.onion:PORT`.
    #[serde(default)]
    pub onion: Option<String>,
}

impl StaticProxy {
    /// The entry lists carry.
    pub fn entry(&self) -> ProxyEntry {
        ProxyEntry {
            name: self.name.clone(),
            port: self.port,
            region: self.region.clone(),
            onion: self.onion.clone(),
        }
    }
}

impl From<ProxyEntry> for StaticProxy {
    fn from(entry: ProxyEntry) -> Self {
        Self {
            name: entry.name,
            port: entry.port,
            region: entry.region,
            addrs: Vec::new(),
            onion: entry.onion,
        }
    }
}

/// Why the fleet file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The file could not be read.
    #[error("could not read the fleet file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than anyone would write by hand.
    #[error("the fleet file {} is larger than {MAX_FLEET_FILE_LEN} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid TOML of the expected shape. Said on one line, with the line and
    /// column, since it goes to logs (a reload that fails).
    #[error("the fleet file is not valid: {}", one_line(.0))]
    Parse(toml::de::Error),
    /// An entry is not acceptable.
    #[error("[[proxy]] number {number} in the fleet file")]
    Entry {
        /// Its position, counting from 1.
        number: usize,
        /// What is wrong with it.
        #[source]
        source: EntryError,
    },
    /// Two entries name the same proxy and port.
    #[error("the fleet file lists {name}:{port} twice")]
    Duplicate {
        /// The proxy's name.
        name: String,
        /// The proxy's port.
        port: u16,
    },
}

/// A TOML error as one line: where (`TOML parse error at line 2, column 8`), then what.
fn one_line(err: &toml::de::Error) -> String {
    let text = err.to_string();
    let message = err.message().trim().replace('\n', "; ");
    match text.lines().next() {
        Some(place) if place.starts_with("TOML parse error") => format!("{place}: {message}"),
        _ => message,
    }
}

impl FleetFile {
    /// Reads and validates a fleet file.
    pub fn load(path: &Path) -> Result<Self, FleetError> {
        use std::io::Read as _;
        let read_error = |source| FleetError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut text = String::new();
        file.take(MAX_FLEET_FILE_LEN + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > MAX_FLEET_FILE_LEN {
            return Err(FleetError::TooLarge {
                path: path.to_owned(),
            });
        }
        Self::parse(&text)
    }

    /// Parses and validates the text of a fleet file.
    pub fn parse(text: &str) -> Result<Self, FleetError> {
        let file: FleetFile = toml::from_str(text).map_err(FleetError::Parse)?;
        file.validate()
    }

    /// Checks every entry, normalises names, and refuses duplicates.
    pub fn validate(self) -> Result<Self, FleetError> {
        let mut seen = HashSet::new();
        let mut proxy = Vec::with_capacity(self.proxy.len());
        for (index, file_entry) in self.proxy.into_iter().enumerate() {
            let entry = check_entry(file_entry.entry()).map_err(|source| FleetError::Entry {
                number: index + 1,
                source,
            })?;
            if !seen.insert((entry.name.clone(), entry.port)) {
                return Err(FleetError::Duplicate {
                    name: entry.name,
                    port: entry.port,
                });
            }
            if file_entry.addrs.len() > MAX_ADDRS_PER_PROXY {
                return Err(FleetError::Entry {
                    number: index + 1,
                    source: EntryError::TooManyAddrs { name: entry.name },
                });
            }
            proxy.push(StaticProxy {
                addrs: file_entry.addrs,
                ..entry.into()
            });
        }
        Ok(Self { proxy })
    }
}

/// Why a heartbeat was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// The entry is not acceptable.
    #[error(transparent)]
    Entry(#[from] EntryError),
    /// The fleet already holds as many live entries as it may.
    #[error("the fleet is full ({0} live proxies)")]
    Full(usize),
}

/// What a proxy's heartbeat says besides its entry: where visitors reach it, and which
/// hostnames it holds tunnels for now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    /// Its public addresses.
    pub addrs: Vec<IpAddr>,
    /// The hostnames bound on it.
    pub names: Vec<String>,
    /// Where its peer link listens, if it links with the fleet.
    pub peer: Option<SocketAddr>,
}

/// A live entry's state.
#[derive(Debug, Clone)]
struct Live {
    region: String,
    onion: Option<String>,
    last_seen: Instant,
    addrs: Vec<IpAddr>,
    names: HashSet<String>,
    peer: Option<SocketAddr>,
}

/// What replacing the fleet file's proxies changed, counted by name and port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StaticsChange {
    /// Proxies the new file lists and the old one did not.
    pub added: usize,
    /// Proxies the old file listed and the new one does not.
    pub removed: usize,
    /// Proxies both list, with another region or other addresses.
    pub changed: usize,
    /// Proxies the new file lists.
    pub total: usize,
}

/// The set of proxies the service knows, static and live.
#[derive(Debug, Clone)]
pub struct Fleet {
    statics: Vec<ProxyEntry>,
    static_addrs: HashMap<(String, u16), Vec<IpAddr>>,
    live: HashMap<(String, u16), Live>,
    /// The names held over all live entries: the sum of their `names`' lengths.
    names_held: usize,
    heartbeat_timeout: Duration,
    max_live: usize,
}

impl Fleet {
    /// A fleet with the static entries of `file`, which are always listed, and live entries
    /// that drop out when not heard from for `heartbeat_timeout`.
    pub fn new(file: FleetFile, heartbeat_timeout: Duration) -> Self {
        let statics = file.proxy.iter().map(StaticProxy::entry).collect();
        let static_addrs = file
            .proxy
            .into_iter()
            .map(|p| ((p.name, p.port), p.addrs))
            .collect();
        Self {
            statics,
            static_addrs,
            live: HashMap::new(),
            names_held: 0,
            heartbeat_timeout,
            max_live: DEFAULT_MAX_LIVE,
        }
    }

    /// Sets the most live entries kept at once (default [`DEFAULT_MAX_LIVE`]).
    pub fn with_max_live(mut self, max_live: usize) -> Self {
        self.max_live = max_live;
        self
    }

    /// The static entries.
    pub fn statics(&self) -> &[ProxyEntry] {
        &self.statics
    }

    /// Lists `file`'s proxies as the static ones from now on, in place of the old file's (a
    /// reload of the fleet file). Live entries stay: a proxy that the new file no longer lists
    /// but that sends heartbeats is listed again by its next one.
    pub fn replace_statics(&mut self, file: FleetFile) -> StaticsChange {
        let new = Fleet::new(file, self.heartbeat_timeout);
        let regions = |statics: &[ProxyEntry]| -> HashMap<(String, u16), String> {
            statics
                .iter()
                .map(|entry| ((entry.name.clone(), entry.port), entry.region.clone()))
                .collect()
        };
        let (old_regions, new_regions) = (regions(&self.statics), regions(&new.statics));
        let change = StaticsChange {
            added: new_regions
                .keys()
                .filter(|key| !old_regions.contains_key(*key))
                .count(),
            removed: old_regions
                .keys()
                .filter(|key| !new_regions.contains_key(*key))
                .count(),
            changed: new_regions
                .iter()
                .filter(|(key, region)| {
                    old_regions.get(*key).is_some_and(|old| {
                        old != *region || self.static_addrs.get(*key) != new.static_addrs.get(*key)
                    })
                })
                .count(),
            total: new.statics.len(),
        };
        self.statics = new.statics;
        self.static_addrs = new.static_addrs;
        change
    }

    /// Records a heartbeat from `entry` at `now`, adding it or refreshing it (its region and
    /// its [`Reach`]).
    ///
    /// The entry's name is normalised first, and so are the names it holds; names that are not
    /// hostnames are dropped, and so are names past [`MAX_NAMES_PER_PROXY`] or
    /// [`MAX_NAMES_IN_FLEET`]. A heartbeat for a static entry changes nothing: static entries
    /// are always listed. Returns whether the entry is new to the fleet.
    pub fn heartbeat(
        &mut self,
        entry: ProxyEntry,
        reach: Reach,
        now: Instant,
    ) -> Result<bool, HeartbeatError> {
        let entry = check_entry(entry)?;
        if reach.addrs.len() > MAX_ADDRS_PER_PROXY {
            return Err(EntryError::TooManyAddrs { name: entry.name }.into());
        }
        if self.is_static(&entry.name, entry.port) {
            return Ok(false);
        }
        self.prune(now);
        let key = (entry.name, entry.port);
        if !self.live.contains_key(&key) && self.live.len() >= self.max_live {
            return Err(HeartbeatError::Full(self.live.len()));
        }
        let held_here = self.live.get(&key).map_or(0, |live| live.names.len());
        let held_elsewhere = self.names_held - held_here;
        let room = MAX_NAMES_IN_FLEET
            .saturating_sub(held_elsewhere)
            .min(MAX_NAMES_PER_PROXY);
        let names: HashSet<String> = reach
            .names
            .iter()
            .filter_map(|name| shroud_mux::hostname::normalize(name).ok())
            .take(room)
            .collect();
        self.names_held = held_elsewhere + names.len();
        let previous = self.live.insert(
            key,
            Live {
                region: entry.region,
                onion: entry.onion,
                last_seen: now,
                addrs: reach.addrs,
                names,
                peer: reach.peer,
            },
        );
        Ok(previous.is_none())
    }

    /// The peer-link addresses of at most `n` healthy proxies other than `except` (a name and
    /// port), in name order: where a proxy joining the fleet's gossip may announce itself.
    pub fn peer_links(&self, except: (&str, u16), n: usize, now: Instant) -> Vec<SocketAddr> {
        let mut links: Vec<(&(String, u16), SocketAddr)> = self
            .live
            .iter()
            .filter(|(key, live)| {
                (key.0.as_str(), key.1) != except
                    && now.saturating_duration_since(live.last_seen) < self.heartbeat_timeout
            })
            .filter_map(|(key, live)| live.peer.map(|peer| (key, peer)))
            .collect();
        links.sort();
        links.into_iter().take(n).map(|(_, peer)| peer).collect()
    }

    /// The public addresses visitors of `host` should be sent to at `now`: those of at most
    /// `n` healthy proxies whose heartbeats say they hold `host`, or, when none does, those of
    /// the `n` proxies [`Fleet::select`] picks for it (where its clients are told to go).
    /// Proxies that announced no address add none.
    pub fn addresses(&self, host: &str, n: usize, now: Instant) -> Vec<IpAddr> {
        let fresh =
            |live: &&Live| now.saturating_duration_since(live.last_seen) < self.heartbeat_timeout;
        let mut holders: Vec<(&(String, u16), &Live)> = self
            .live
            .iter()
            .filter(|(_, live)| fresh(live) && live.names.contains(host))
            .collect();
        holders.sort_by(|a, b| a.0.cmp(b.0));
        holders.truncate(n);
        let addrs: Vec<IpAddr> = if holders.is_empty() {
            self.select(host, n, now)
                .into_iter()
                .flat_map(|entry| {
                    let key = (entry.name, entry.port);
                    self.static_addrs
                        .get(&key)
                        .or_else(|| self.live.get(&key).map(|live| &live.addrs))
                        .cloned()
                        .unwrap_or_default()
                })
                .collect()
        } else {
            holders
                .into_iter()
                .flat_map(|(_, live)| live.addrs.iter().copied())
                .collect()
        };
        let mut seen = HashSet::new();
        addrs
            .into_iter()
            .filter(|addr| seen.insert(*addr))
            .collect()
    }

    /// Removes the live entry `name:port` at once; returns whether there was one.
    ///
    /// Static entries stay: they are always listed.
    pub fn leave(&mut self, name: &str, port: u16) -> bool {
        let Ok(name) = shroud_mux::hostname::normalize(name) else {
            return false;
        };
        let removed = self.live.remove(&(name, port));
        if let Some(live) = &removed {
            self.names_held -= live.names.len();
        }
        removed.is_some()
    }

    /// Forgets live entries not heard from for the heartbeat timeout.
    pub fn prune(&mut self, now: Instant) {
        let timeout = self.heartbeat_timeout;
        let mut forgotten = 0;
        self.live.retain(|_, live| {
            let fresh = now.saturating_duration_since(live.last_seen) < timeout;
            if !fresh {
                forgotten += live.names.len();
            }
            fresh
        });
        self.names_held -= forgotten;
    }

    /// Every entry that may be listed at `now`: the static ones and the live ones heard from
    /// within the heartbeat timeout, without duplicates, in no particular order.
    pub fn healthy(&self, now: Instant) -> Vec<ProxyEntry> {
        let mut out = self.statics.clone();
        out.extend(
            self.live
                .iter()
                .filter(|(_, live)| {
                    now.saturating_duration_since(live.last_seen) < self.heartbeat_timeout
                })
                .map(|((name, port), live)| ProxyEntry {
                    name: name.clone(),
                    port: *port,
                    region: live.region.clone(),
                    onion: live.onion.clone(),
                }),
        );
        out
    }

    /// Picks at most `n` healthy proxies for `host`, most preferred first.
    ///
    /// Each proxy gets a score from a stable hash of the host and the proxy (rendezvous
    /// hashing). Within a region, higher scores come first; across regions, the list takes one
    /// proxy from each region before a second from any, ordering each round by score. The
    /// answer depends only on the host and the healthy set, and removing one proxy moves few
    /// others.
    pub fn select(&self, host: &str, n: usize, now: Instant) -> Vec<ProxyEntry> {
        select_from(self.healthy(now), host, n)
    }

    fn is_static(&self, name: &str, port: u16) -> bool {
        self.statics
            .iter()
            .any(|entry| entry.name == name && entry.port == port)
    }
}

/// [`Fleet::select`] over an explicit set of candidates.
pub fn select_from(candidates: Vec<ProxyEntry>, host: &str, n: usize) -> Vec<ProxyEntry> {
    let mut by_region: BTreeMap<String, Vec<(u64, ProxyEntry)>> = BTreeMap::new();
    for entry in candidates {
        let score = rendezvous_score(host, &entry);
        by_region
            .entry(entry.region.clone())
            .or_default()
            .push((score, entry));
    }
    for members in by_region.values_mut() {
        // Highest score first; ties (vanishingly rare) broken by name and port for determinism.
        members.sort_by(|(sa, ea), (sb, eb)| sb.cmp(sa).then_with(|| ea.cmp(eb)));
        members.dedup_by(|(_, a), (_, b)| a.name == b.name && a.port == b.port);
    }
    let mut out = Vec::with_capacity(n);
    let mut round = 0;
    while out.len() < n {
        let mut this_round: Vec<&(u64, ProxyEntry)> = by_region
            .values()
            .filter_map(|members| members.get(round))
            .collect();
        if this_round.is_empty() {
            break;
        }
        this_round.sort_by(|(sa, ea), (sb, eb)| sb.cmp(sa).then_with(|| ea.cmp(eb)));
        out.extend(
            this_round
                .into_iter()
                .take(n - out.len())
                .map(|(_, entry)| entry.clone()),
        );
        round += 1;
    }
    out
}

/// The rendezvous score of `entry` for `host`: FNV-1a over both, finished with a 64-bit mixer
/// so that similar names still get unrelated scores. Stable across builds and platforms.
fn rendezvous_score(host: &str, entry: &ProxyEntry) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    // The separators keep ("ab", "c") and ("a", "bc") apart.
    feed(host.as_bytes());
    feed(&[0]);
    feed(entry.name.as_bytes());
    feed(&[0]);
    feed(&entry.port.to_be_bytes());
    // MurmurHash3's finaliser.
    let mut x = hash;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

#[cfg(test)]
mod tests;
