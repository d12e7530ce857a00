//! Membership and names by gossip: foca (SWIM) driven over the peer links.
//!
//! foca is sans-IO: frames in ([`run`]'s `inbound`, read from the links peers dial to us),
//! frames out ([`Peers::send_gossip`], on the links we dial), timers here. Because every frame
//! rides a link whose ends proved the fleet secret, a host outside the fleet can neither join
//! nor inject a route. Each proxy disseminates the names it holds as a foca custom broadcast,
//! versioned so a newer list replaces an older one; it sends its list again whenever a member
//! comes up (so a newcomer learns it) and every [`REFRESH`] (so a lost broadcast heals).

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use foca::{AccumulatingRuntime, BroadcastHandler, Config, Foca, Invalidates, OwnedNotification};
use futures::StreamExt as _;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{debug, info, warn};

use crate::peers::{PeerId, Peers};
use crate::shared::Shared;

/// How often a proxy sends its list of names again although nothing changed.
pub const REFRESH: Duration = Duration::from_secs(15);
/// How often seeds that are not known alive are announced to again.
const RESEED: Duration = Duration::from_secs(5);
/// Largest foca packet; a list of names must fit in one broadcast.
const MAX_PACKET: usize = 200 * 1024;
/// The cluster size foca's timings are tuned for (how many times a broadcast is passed on).
const CLUSTER_SIZE: u32 = 20;
/// How long a member stays suspect before it is declared down. With foca's LAN probing (one
/// probe a second, 500 ms to answer, then indirect probes through three others), a silent
/// member leaves routing 4 to 8 s after it stops answering (a probe reaches it within a few
/// periods); the bound is 10 s.
const SUSPECT_TO_DOWN: Duration = Duration::from_secs(3);
/// Most names one peer's list may carry.
const MAX_NAMES: usize = 2048;

/// What one proxy holds, as broadcast.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// The proxy that holds the names.
    pub holder: PeerId,
    /// The version of its list: a newer one replaces an older.
    pub version: u64,
    /// The names it holds, each a hostname in normal form.
    pub names: Vec<String>,
}

impl Announcement {
    /// Decodes a broadcast (postcard) and checks it as a receiver does before recording it:
    /// at most `MAX_NAMES` names, each a hostname in normal form.
    pub fn decode(data: &[u8]) -> Result<Self, AnnouncementError> {
        let announcement: Announcement = postcard::from_bytes(data)?;
        if announcement.names.len() > MAX_NAMES {
            return Err(AnnouncementError::TooMany(announcement.names.len()));
        }
        for name in &announcement.names {
            if shroud_mux::hostname::normalize(name).as_deref() != Ok(name.as_str()) {
                return Err(AnnouncementError::BadName);
            }
        }
        Ok(announcement)
    }
}

/// The identity of an announcement: a newer one from the same address replaces an older.
struct Key {
    holder: PeerId,
    version: u64,
}

impl Invalidates for Key {
    fn invalidates(&self, other: &Self) -> bool {
        self.holder.addr == other.holder.addr
            && (self.holder.bump, self.version) > (other.holder.bump, other.version)
    }
}

/// Takes announcements in: records the news in [`Peers`], and tells foca to pass it on.
struct Holdings(Arc<Peers>);

/// Why an announcement was discarded.
#[derive(Debug, thiserror::Error)]
pub enum AnnouncementError {
    /// The bytes are not a postcard-encoded [`Announcement`].
    #[error("undecodable announcement: {0}")]
    Decode(#[from] postcard::Error),
    /// More names than one announcement may carry.
    #[error("announcement with {0} names")]
    TooMany(usize),
    /// A name that is not a hostname in normal form.
    #[error("announcement with an invalid hostname")]
    BadName,
}

impl BroadcastHandler<PeerId> for Holdings {
    type Key = Key;
    type Error = AnnouncementError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&PeerId>,
    ) -> Result<Option<Key>, AnnouncementError> {
        let announcement = Announcement::decode(data)?;
        let key = Key {
            holder: announcement.holder.clone(),
            version: announcement.version,
        };
        let news = self.0.record_holding(
            announcement.holder,
            announcement.version,
            announcement.names,
        );
        // Our own announcements are always passed on; others' only when they are news.
        let ours = key.holder.addr == self.0.advertise();
        Ok((news || ours).then_some(key))
    }
}

/// This proxy's identity at start: its link address, and the time, so that a restart wins
/// over the identity it had before.
pub fn identity(advertise: SocketAddr) -> PeerId {
    let bump = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    PeerId {
        addr: advertise,
        bump,
    }
}

type Gossip = Foca<PeerId, foca::PostcardCodec, StdRng, Holdings>;

/// A new gossip member for this proxy, known as `me`, its peers' names recorded in `peers`.
fn member(peers: &Arc<Peers>, me: PeerId, rng: StdRng) -> Gossip {
    let mut config = Config::new_lan(NonZeroU32::new(CLUSTER_SIZE).unwrap_or(NonZeroU32::MIN));
    config.max_packet_size = NonZeroUsize::new(MAX_PACKET).unwrap_or(NonZeroUsize::MIN);
    config.suspect_to_down_after = SUSPECT_TO_DOWN;
    Foca::with_custom_broadcast(
        me,
        config,
        rng,
        foca::PostcardCodec,
        Holdings(peers.clone()),
    )
}

/// Hands `frames` in turn to a new gossip member, as [`run`] hands it what peers send, and
/// returns how many foca accepted. Members foca reports up or down are recorded in `peers`
/// as [`run`] records them; nothing is sent and no timer is set. The member's identity is
/// its address with bump 0 and its random choices are seeded, so the outcome depends on the
/// frames alone. This is the receiving path without a network, for the `gossip` fuzz target
/// under `fuzz/`.
pub fn receive_frames<'a>(peers: &Arc<Peers>, frames: impl IntoIterator<Item = &'a [u8]>) -> usize {
    let me = PeerId {
        addr: peers.advertise(),
        bump: 0,
    };
    let mut foca = member(peers, me, rand::SeedableRng::seed_from_u64(0));
    let mut runtime = AccumulatingRuntime::new();
    let mut accepted = 0;
    for frame in frames {
        if foca.handle_data(frame, &mut runtime).is_ok() {
            accepted += 1;
        }
        while runtime.to_send().is_some() {}
        while runtime.to_schedule().is_some() {}
        while let Some(notification) = runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(id) => peers.member_up(id),
                OwnedNotification::MemberDown(id) => peers.member_down(&id),
                OwnedNotification::Rename(old, new) => {
                    peers.member_down(&old);
                    peers.member_up(new);
                }
                _ => {}
            }
        }
    }
    accepted
}

/// Runs this proxy's membership until `shutdown`, then says goodbye. `inbound` brings the
/// frames peers send; the names announced are those bound in `shared`.
pub async fn run(
    shared: Arc<Shared>,
    peers: Arc<Peers>,
    mut inbound: mpsc::Receiver<Vec<u8>>,
    shutdown: CancellationToken,
) {
    let mut driver = Driver {
        foca: member(&peers, identity(peers.advertise()), rand::make_rng()),
        runtime: AccumulatingRuntime::new(),
        timers: DelayQueue::new(),
        peers: peers.clone(),
        version: 0,
        shared: shared.clone(),
    };
    info!(link = %peers.advertise(), "joining the fleet's gossip");
    driver.publish();
    driver.announce_to_seeds().await;
    driver.flush();

    let mut names = shared.watch_names();
    let mut refresh = tokio::time::interval(REFRESH);
    let mut reseed = tokio::time::interval(RESEED);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                if let Err(err) = driver.foca.leave_cluster(&mut driver.runtime) {
                    debug!(%err, "leaving the gossip");
                }
                driver.flush();
                return;
            }
            Some(frame) = inbound.recv() => {
                if let Err(err) = driver.foca.handle_data(&frame, &mut driver.runtime) {
                    debug!(%err, "gossip frame discarded");
                }
            }
            Some(expired) = driver.timers.next() => {
                let timer = expired.into_inner();
                if let Err(err) = driver.foca.handle_timer(timer, &mut driver.runtime) {
                    debug!(%err, "gossip timer");
                }
            }
            Ok(()) = names.changed() => driver.publish(),
            _ = refresh.tick() => driver.publish(),
            _ = reseed.tick() => driver.announce_to_seeds().await,
            () = peers.new_seeds.notified() => driver.announce_to_seeds().await,
        }
        driver.flush();
    }
}

struct Driver {
    foca: Gossip,
    runtime: AccumulatingRuntime<PeerId>,
    timers: DelayQueue<foca::Timer<PeerId>>,
    peers: Arc<Peers>,
    version: u64,
    shared: Arc<Shared>,
}

impl Driver {
    /// Broadcasts the names bound here, as a new version.
    fn publish(&mut self) {
        self.version += 1;
        let mut names = self.shared.bound_names();
        if names.len() > MAX_NAMES {
            warn!(
                names = names.len(),
                "more names bound than one announcement carries; peers learn the first {MAX_NAMES}"
            );
            names.truncate(MAX_NAMES);
        }
        let announcement = Announcement {
            holder: self.foca.identity().clone(),
            version: self.version,
            names,
        };
        let encoded = match postcard::to_allocvec(&announcement) {
            Ok(encoded) => encoded,
            Err(err) => {
                warn!(%err, "could not encode this proxy's names");
                return;
            }
        };
        if let Err(err) = self.foca.add_broadcast(&encoded) {
            warn!(%err, "could not broadcast this proxy's names");
        }
        // Gossip right away rather than at the next probe.
        if let Err(err) = self.foca.gossip(&mut self.runtime) {
            debug!(%err, "gossip");
        }
    }

    /// Announces this proxy to every seed not known to be alive: the `--peer` ones and
    /// those the discovery service named.
    async fn announce_to_seeds(&mut self) {
        let (named, mut addrs) = self.peers.seeds();
        for seed in named {
            match tokio::net::lookup_host(seed.as_str()).await {
                Ok(found) => addrs.extend(found),
                Err(err) => debug!(%seed, %err, "peer seed does not resolve"),
            }
        }
        for addr in addrs {
            if addr == self.peers.advertise() || self.peers.is_alive_at(addr) {
                continue;
            }
            // The seed's real identity is learnt from its answer; foca accepts an
            // announcement addressed to any identity with its address.
            let guess = PeerId { addr, bump: 0 };
            if let Err(err) = self.foca.announce(guess, &mut self.runtime) {
                debug!(%err, %addr, "announcing to a seed");
            }
        }
    }

    /// Carries out what foca asked for: frames to send, timers to set, members that came
    /// and went.
    fn flush(&mut self) {
        while let Some((to, frame)) = self.runtime.to_send() {
            self.peers.send_gossip(to.addr, frame.to_vec());
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timers.insert(timer, after);
        }
        let mut republish = false;
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(id) => {
                    info!(peer = %id.addr, "peer joined");
                    self.peers.member_up(id);
                    republish = true;
                }
                OwnedNotification::MemberDown(id) => {
                    info!(peer = %id.addr, "peer left or stopped answering");
                    self.peers.member_down(&id);
                }
                OwnedNotification::Rename(old, new) => {
                    self.peers.member_down(&old);
                    self.peers.member_up(new);
                    republish = true;
                }
                OwnedNotification::Rejoin(id) => {
                    info!(
                        bump = id.bump,
                        "rejoined the fleet's gossip after being declared down"
                    );
                    republish = true;
                }
                OwnedNotification::Defunct => {
                    warn!("declared down by the fleet; rejoining");
                }
                OwnedNotification::Active | OwnedNotification::Idle => {}
            }
        }
        if republish {
            self.publish();
            // The frames publishing made.
            while let Some((to, frame)) = self.runtime.to_send() {
                self.peers.send_gossip(to.addr, frame.to_vec());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use shroud_discovery::secret::FleetSecret;

    use crate::peers::FleetConfig;

    fn encode(names: &[&str]) -> Vec<u8> {
        let announcement = Announcement {
            holder: PeerId {
                addr: "192.0.2.2:7443".parse().unwrap(),
                bump: 1,
            },
            version: 1,
            names: names.iter().map(|name| name.to_string()).collect(),
        };
        postcard::to_allocvec(&announcement).unwrap()
    }

    #[test]
    fn announcements_carry_only_names_in_normal_form() {
        let good = encode(&["example.test", "www.example.test"]);
        let decoded = Announcement::decode(&good).unwrap();
        assert_eq!(decoded.names, ["example.test", "www.example.test"]);
        for bad in ["Example.test", "example.test.", "a b", ""] {
            assert!(
                matches!(
                    Announcement::decode(&encode(&[bad])),
                    Err(AnnouncementError::BadName)
                ),
                "{bad:?}"
            );
        }
        let many = vec!["a.test"; MAX_NAMES + 1];
        assert!(matches!(
            Announcement::decode(&encode(&many)),
            Err(AnnouncementError::TooMany(_))
        ));
        assert!(matches!(
            Announcement::decode(&good[..good.len() - 1]),
            Err(AnnouncementError::Decode(_))
        ));
    }

    #[test]
    fn frames_that_are_not_foca_packets_change_nothing() {
        let peers = Arc::new(Peers::new(
            FleetConfig {
                advertise: "192.0.2.1:7443".parse().unwrap(),
                seeds: Vec::new(),
                secret: FleetSecret::new("a-fleet-secret-of-sufficient-length".into()).unwrap(),
            },
            64 * 1024,
        ));
        let announcement = encode(&["example.test"]);
        let frames: [&[u8]; 3] = [b"", b"\x00\x01garbage", &announcement];
        assert_eq!(receive_frames(&peers, frames), 0);
        assert_eq!(peers.alive(), 0);
        assert!(!peers.holds("example.test"));
    }
}
