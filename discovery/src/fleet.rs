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
use std::net::IpAddr;
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
    Ok(ProxyEntry {
        name,
        port: entry.port,
        region: entry.region,
    })
}

/// The fleet file: `[[proxy]]` tables with `name`, `port`, `region` and, optionally, the
/// proxy's public `addrs` (which the service's DNS answers give visitors).
///
/// ```toml
/// [[proxy]]
/// name = "p1.example.net"
/// port = 443
/// region = "eu"
/// addrs = ["192.0.2.10", "2001:db8::10"]
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
}

impl StaticProxy {
    /// The entry lists carry.
    pub fn entry(&self) -> ProxyEntry {
        ProxyEntry {
            name: self.name.clone(),
            port: self.port,
            region: self.region.clone(),
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
    /// The file is not valid TOML of the expected shape.
    #[error("the fleet file is not valid")]
    Parse(#[source] toml::de::Error),
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
}

/// A live entry's state.
#[derive(Debug, Clone)]
struct Live {
    region: String,
    last_seen: Instant,
    addrs: Vec<IpAddr>,
    names: HashSet<String>,
}

/// The set of proxies the service knows, static and live.
#[derive(Debug, Clone)]
pub struct Fleet {
    statics: Vec<ProxyEntry>,
    static_addrs: HashMap<(String, u16), Vec<IpAddr>>,
    live: HashMap<(String, u16), Live>,
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
        let held_elsewhere: usize = self
            .live
            .iter()
            .filter(|(other, _)| **other != key)
            .map(|(_, live)| live.names.len())
            .sum();
        let room = MAX_NAMES_IN_FLEET
            .saturating_sub(held_elsewhere)
            .min(MAX_NAMES_PER_PROXY);
        let names = reach
            .names
            .iter()
            .filter_map(|name| shroud_mux::hostname::normalize(name).ok())
            .take(room)
            .collect();
        let previous = self.live.insert(
            key,
            Live {
                region: entry.region,
                last_seen: now,
                addrs: reach.addrs,
                names,
            },
        );
        Ok(previous.is_none())
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
        self.live.remove(&(name, port)).is_some()
    }

    /// Forgets live entries not heard from for the heartbeat timeout.
    pub fn prune(&mut self, now: Instant) {
        let timeout = self.heartbeat_timeout;
        self.live
            .retain(|_, live| now.saturating_duration_since(live.last_seen) < timeout);
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
mod tests {
    use super::*;

    fn entry(name: &str, region: &str) -> ProxyEntry {
        ProxyEntry {
            name: name.into(),
            port: 443,
            region: region.into(),
        }
    }

    fn fleet_of(entries: Vec<ProxyEntry>) -> Fleet {
        let proxy = entries.into_iter().map(StaticProxy::from).collect();
        Fleet::new(FleetFile { proxy }, Duration::from_secs(30))
    }

    #[test]
    fn parses_and_validates_the_fleet_file() {
        let file = FleetFile::parse(
            r#"
            [[proxy]]
            name = "P1.Example.net."
            port = 443
            region = "eu"

            [[proxy]]
            name = "p1.example.net"
            port = 8443
            region = "eu"
            "#,
        )
        .unwrap();
        assert_eq!(file.proxy[0].name, "p1.example.net");
        assert_eq!(file.proxy.len(), 2);
        assert_eq!(FleetFile::parse("").unwrap().proxy, vec![]);

        let dup = "[[proxy]]\nname = \"a.test\"\nport = 1\nregion = \"x\"\n\
                   [[proxy]]\nname = \"A.test\"\nport = 1\nregion = \"y\"\n";
        let err = FleetFile::parse(dup).unwrap_err();
        assert!(
            matches!(err, FleetError::Duplicate { port: 1, .. }),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "the fleet file lists a.test:1 twice");

        let bad_name = "[[proxy]]\nname = \"a b\"\nport = 1\nregion = \"x\"\n";
        assert!(matches!(
            FleetFile::parse(bad_name),
            Err(FleetError::Entry {
                number: 1,
                source: EntryError::BadName { .. }
            })
        ));
        let empty_region = "[[proxy]]\nname = \"a.test\"\nport = 1\nregion = \" \"\n";
        assert!(matches!(
            FleetFile::parse(empty_region),
            Err(FleetError::Entry {
                source: EntryError::EmptyRegion { .. },
                ..
            })
        ));
        let zero_port = "[[proxy]]\nname = \"a.test\"\nport = 0\nregion = \"x\"\n";
        assert!(matches!(
            FleetFile::parse(zero_port),
            Err(FleetError::Entry {
                source: EntryError::ZeroPort { .. },
                ..
            })
        ));
        let unknown = "[[proxy]]\nname = \"a.test\"\nport = 1\nregion = \"x\"\nweight = 2\n";
        assert!(matches!(
            FleetFile::parse(unknown),
            Err(FleetError::Parse(_))
        ));
        assert!(matches!(
            FleetFile::parse("[[proxies]]\n"),
            Err(FleetError::Parse(_))
        ));
    }

    #[test]
    fn the_example_fleet_file_parses() {
        let file = FleetFile::parse(include_str!("../fleet.example.toml")).unwrap();
        assert_eq!(file.proxy.len(), 2);
    }

    #[test]
    fn selection_spreads_across_regions_first() {
        let fleet = fleet_of(vec![
            entry("eu1.test", "eu"),
            entry("eu2.test", "eu"),
            entry("eu3.test", "eu"),
            entry("us1.test", "us"),
            entry("us2.test", "us"),
            entry("ap1.test", "ap"),
        ]);
        let now = Instant::now();
        for i in 0..50 {
            let host = format!("host{i}.example");
            let three = fleet.select(&host, 3, now);
            let regions: HashSet<_> = three.iter().map(|e| e.region.as_str()).collect();
            assert_eq!(regions.len(), 3, "{host}: {three:?}");

            let five = fleet.select(&host, 5, now);
            assert_eq!(
                &five[..3],
                &three[..],
                "a longer list extends a shorter one"
            );
            // The fourth and fifth are second picks from eu and us, never a second ap.
            let later: HashSet<_> = five[3..].iter().map(|e| e.region.as_str()).collect();
            assert_eq!(later, HashSet::from(["eu", "us"]), "{host}: {five:?}");

            let all = fleet.select(&host, 100, now);
            assert_eq!(all.len(), 6);
        }
    }

    #[test]
    fn selection_is_deterministic_and_spreads_hosts() {
        let entries: Vec<_> = (0..10)
            .map(|i| entry(&format!("p{i}.test"), "eu"))
            .collect();
        let fleet = fleet_of(entries.clone());
        let mut reversed = entries;
        reversed.reverse();
        let other_order = fleet_of(reversed);
        let now = Instant::now();

        let mut first_choices = HashSet::new();
        for i in 0..200 {
            let host = format!("h{i}.example");
            let picked = fleet.select(&host, 3, now);
            assert_eq!(picked, fleet.select(&host, 3, now));
            assert_eq!(picked, other_order.select(&host, 3, now));
            first_choices.insert(picked[0].name.clone());
        }
        // 200 hosts over 10 proxies: every proxy is somebody's first choice.
        assert_eq!(first_choices.len(), 10);

        // Pinned values: the hash must not change between builds.
        let picked: Vec<_> = fleet
            .select("example.com", 3, now)
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(picked, PINNED_EXAMPLE_COM);
    }

    const PINNED_EXAMPLE_COM: [&str; 3] = ["p5.test", "p3.test", "p1.test"];

    #[test]
    fn removing_a_proxy_moves_only_its_hosts() {
        let entries: Vec<_> = (0..10)
            .map(|i| entry(&format!("p{i}.test"), "eu"))
            .collect();
        let full = fleet_of(entries.clone());
        let without_p3 = fleet_of(
            entries
                .into_iter()
                .filter(|e| e.name != "p3.test")
                .collect(),
        );
        let now = Instant::now();
        for i in 0..200 {
            let host = format!("h{i}.example");
            let before = full.select(&host, 1, now);
            let after = without_p3.select(&host, 1, now);
            if before[0].name != "p3.test" {
                assert_eq!(before, after);
            }
        }
    }

    #[test]
    fn heartbeats_expire_and_leave_removes() {
        let mut fleet = fleet_of(vec![entry("static.test", "eu")]);
        let t0 = Instant::now();
        assert!(fleet
            .heartbeat(entry("Live.Test", "us"), Reach::default(), t0)
            .unwrap());
        assert!(fleet.healthy(t0).contains(&entry("live.test", "us")));
        assert_eq!(fleet.healthy(t0).len(), 2);

        // Still there just before the timeout, refreshed by a heartbeat, gone after.
        let t29 = t0 + Duration::from_secs(29);
        assert_eq!(fleet.healthy(t29).len(), 2);
        assert!(!fleet
            .heartbeat(entry("live.test", "us"), Reach::default(), t29)
            .unwrap());
        let t58 = t0 + Duration::from_secs(58);
        assert_eq!(fleet.healthy(t58).len(), 2);
        let t59 = t0 + Duration::from_secs(59);
        assert_eq!(fleet.healthy(t59), vec![entry("static.test", "eu")]);
        assert_eq!(fleet.select("x.test", 3, t59).len(), 1);
        fleet.prune(t59);
        assert!(fleet.live.is_empty());

        // Leaving removes at once; static entries stay whatever is said.
        fleet
            .heartbeat(entry("live.test", "us"), Reach::default(), t59)
            .unwrap();
        assert!(fleet.leave("LIVE.test", 443));
        assert!(!fleet.leave("live.test", 443));
        assert!(!fleet.leave("static.test", 443));
        assert_eq!(fleet.healthy(t59), vec![entry("static.test", "eu")]);
        assert!(!fleet
            .heartbeat(entry("static.test", "us"), Reach::default(), t59)
            .unwrap());
        assert_eq!(fleet.healthy(t59), vec![entry("static.test", "eu")]);
    }

    #[test]
    fn live_entries_are_bounded() {
        let mut fleet = fleet_of(vec![]).with_max_live(2);
        let now = Instant::now();
        fleet
            .heartbeat(entry("a.test", "eu"), Reach::default(), now)
            .unwrap();
        fleet
            .heartbeat(entry("b.test", "eu"), Reach::default(), now)
            .unwrap();
        assert_eq!(
            fleet.heartbeat(entry("c.test", "eu"), Reach::default(), now),
            Err(HeartbeatError::Full(2))
        );
        // A known entry may still refresh, and expired ones make room.
        fleet
            .heartbeat(entry("a.test", "eu"), Reach::default(), now)
            .unwrap();
        let later = now + Duration::from_secs(31);
        fleet
            .heartbeat(entry("c.test", "eu"), Reach::default(), later)
            .unwrap();
        assert!(matches!(
            fleet.heartbeat(entry("bad name", "eu"), Reach::default(), later),
            Err(HeartbeatError::Entry(EntryError::BadName { .. }))
        ));
    }

    fn reach(addrs: &[&str], names: &[&str]) -> Reach {
        Reach {
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        }
    }

    fn ips(addrs: &[&str]) -> Vec<IpAddr> {
        addrs.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn addresses_are_the_holders_or_else_the_rendezvous_choice() {
        let file = FleetFile::parse(
            "[[proxy]]\nname = \"static.test\"\nport = 443\nregion = \"eu\"\n\
             addrs = [\"192.0.2.1\", \"2001:db8::1\"]\n",
        )
        .unwrap();
        let mut fleet = Fleet::new(file, Duration::from_secs(30));
        let t0 = Instant::now();
        fleet
            .heartbeat(
                entry("a.test", "eu"),
                reach(&["192.0.2.2"], &["Example.TEST"]),
                t0,
            )
            .unwrap();
        fleet
            .heartbeat(
                entry("b.test", "us"),
                reach(&["192.0.2.3"], &["example.test", "x.test"]),
                t0,
            )
            .unwrap();
        fleet
            .heartbeat(entry("c.test", "us"), reach(&["192.0.2.4"], &[]), t0)
            .unwrap();

        // Held by a and b (names are normalised): their addresses, whatever rendezvous says.
        assert_eq!(
            fleet.addresses("example.test", 3, t0),
            ips(&["192.0.2.2", "192.0.2.3"])
        );
        assert_eq!(fleet.addresses("example.test", 1, t0), ips(&["192.0.2.2"]));

        // Held nowhere: the addresses of the proxies a list for it would name.
        let chosen = fleet.select("nowhere.test", 2, t0);
        let expected: Vec<IpAddr> = chosen
            .iter()
            .flat_map(|e| match e.name.as_str() {
                "static.test" => ips(&["192.0.2.1", "2001:db8::1"]),
                "a.test" => ips(&["192.0.2.2"]),
                "b.test" => ips(&["192.0.2.3"]),
                _ => ips(&["192.0.2.4"]),
            })
            .collect();
        assert_eq!(fleet.addresses("nowhere.test", 2, t0), expected);

        // A holder that stops sending heartbeats stops being answered.
        let t31 = t0 + Duration::from_secs(31);
        fleet
            .heartbeat(
                entry("b.test", "us"),
                reach(&["192.0.2.3"], &["example.test"]),
                t0 + Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(fleet.addresses("example.test", 3, t31), ips(&["192.0.2.3"]));
    }

    #[test]
    fn reach_is_bounded() {
        let mut fleet = fleet_of(vec![]);
        let t0 = Instant::now();
        let many: Vec<String> = (0..MAX_NAMES_PER_PROXY + 10)
            .map(|i| format!("n{i}.test"))
            .collect();
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        fleet
            .heartbeat(entry("a.test", "eu"), reach(&[], &names), t0)
            .unwrap();
        assert_eq!(
            fleet.live[&("a.test".to_owned(), 443)].names.len(),
            MAX_NAMES_PER_PROXY
        );

        let addrs: Vec<String> = (0..=MAX_ADDRS_PER_PROXY)
            .map(|i| format!("192.0.2.{i}"))
            .collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let err = fleet
            .heartbeat(entry("b.test", "eu"), reach(&addrs, &[]), t0)
            .unwrap_err();
        assert!(
            matches!(err, HeartbeatError::Entry(EntryError::TooManyAddrs { .. })),
            "{err}"
        );
        let too_many = format!(
            "[[proxy]]\nname = \"s.test\"\nport = 1\nregion = \"x\"\naddrs = [{}]\n",
            addrs
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(matches!(
            FleetFile::parse(&too_many),
            Err(FleetError::Entry {
                source: EntryError::TooManyAddrs { .. },
                ..
            })
        ));
        assert!(matches!(
            FleetFile::parse(
                "[[proxy]]\nname = \"s.test\"\nport = 1\nregion = \"x\"\naddrs = [\"nope\"]\n"
            ),
            Err(FleetError::Parse(_))
        ));
    }
}
