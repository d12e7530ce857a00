//! What a proxy knows of the rest of its fleet: which peers are alive, which names each
//! holds, and the links to them.
//!
//! The gossip task ([`crate::gossip`]) keeps the table up to date; visitors read it
//! ([`Peers::holders`]) to find a peer to forward to ([`crate::forward`]). Links are dialled
//! on first use and kept: one per peer, carrying both its gossip and the visitors forwarded
//! to it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shroud_discovery::secret::FleetSecret;
use shroud_mux::{MuxStream, Session, SessionConfig};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::debug;

use crate::peer_link::{self, LinkError, MAX_LINK_STREAMS};

/// Most peer addresses learnt from the discovery service kept as seeds.
const MAX_LEARNT_SEEDS: usize = 64;
/// How long after a failed dial the same peer is not dialled again.
const REDIAL_AFTER: Duration = Duration::from_secs(1);
/// Gossip frames waiting to go to one peer; more are dropped (gossip tolerates loss).
const GOSSIP_QUEUE: usize = 64;

/// A member of the fleet's gossip: the address its peer link listens on, and a number that
/// grows each time it starts or rejoins, so a restarted proxy replaces its old self.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PeerId {
    /// Where the peer's link listens (`--listen-peer`, or as advertised).
    pub addr: SocketAddr,
    /// Start time in milliseconds, bumped on rejoin.
    pub bump: u64,
}

impl foca::Identity for PeerId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            addr: self.addr,
            bump: self.bump.wrapping_add(1),
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// How a proxy joins its fleet's gossip and links.
#[derive(Debug)]
pub struct FleetConfig {
    /// The address peers reach this proxy's link at.
    pub advertise: SocketAddr,
    /// Peers to announce to at start and whenever they are not known to be alive.
    pub seeds: Vec<String>,
    /// The secret every member holds.
    pub secret: FleetSecret,
}

/// The names one peer said it holds, at one version of its list.
struct Holding {
    id: PeerId,
    version: u64,
    names: Vec<String>,
}

/// One peer's link, dialled on demand.
struct Slot {
    link: tokio::sync::Mutex<LinkState>,
    gossip: mpsc::Sender<Vec<u8>>,
}

#[derive(Default)]
struct LinkState {
    session: Option<Session>,
    failed_at: Option<Instant>,
}

#[derive(Default)]
struct Table {
    /// The latest list of each peer, by link address.
    holdings: HashMap<SocketAddr, Holding>,
    /// Members gossip says are alive.
    alive: HashSet<PeerId>,
    /// Name to the link addresses of the alive peers holding it, rebuilt on every change.
    index: BTreeMap<String, Vec<SocketAddr>>,
}

impl Table {
    fn reindex(&mut self) {
        self.index.clear();
        for holding in self.holdings.values() {
            if !self.alive.contains(&holding.id) {
                continue;
            }
            for name in &holding.names {
                self.index
                    .entry(name.clone())
                    .or_default()
                    .push(holding.id.addr);
            }
        }
    }
}

/// The fleet as this proxy sees it. See the module documentation.
pub struct Peers {
    advertise: SocketAddr,
    seeds: Vec<String>,
    /// Seeds the discovery service named (see [`Peers::learn_seeds`]).
    learnt: Mutex<Vec<SocketAddr>>,
    /// Woken when the discovery service names a seed not known before.
    pub(crate) new_seeds: tokio::sync::Notify,
    pub(crate) secret: FleetSecret,
    tls: Arc<rustls::ClientConfig>,
    session_config: SessionConfig,
    table: Mutex<Table>,
    slots: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    changes: watch::Sender<u64>,
    turn: AtomicUsize,
}

impl Peers {
    /// The fleet state of a proxy joining with `config`, nothing known yet. `stream_buffer`
    /// is the per-stream buffer of its links (see [`crate::shared::Limits::stream_buffer`]).
    pub fn new(config: FleetConfig, stream_buffer: usize) -> Self {
        Self {
            advertise: config.advertise,
            seeds: config.seeds,
            learnt: Mutex::new(Vec::new()),
            new_seeds: tokio::sync::Notify::new(),
            secret: config.secret,
            tls: peer_link::client_config(),
            session_config: SessionConfig {
                max_streams: MAX_LINK_STREAMS,
                accept_backlog: 1024,
                stream_buffer,
            },
            table: Mutex::new(Table::default()),
            slots: Mutex::new(HashMap::new()),
            changes: watch::Sender::new(0),
            turn: AtomicUsize::new(0),
        }
    }

    /// The address peers reach this proxy's link at.
    pub fn advertise(&self) -> SocketAddr {
        self.advertise
    }

    /// Takes peer addresses the discovery service knows as seeds besides `--peer`: the
    /// latest answer replaces the one before, so members that left are forgotten. A seed not
    /// known before is announced to at once.
    pub fn learn_seeds(&self, found: &[SocketAddr]) {
        let found: Vec<SocketAddr> = found
            .iter()
            .copied()
            .filter(|addr| *addr != self.advertise)
            .take(MAX_LEARNT_SEEDS)
            .collect();
        let mut learnt = self
            .learnt
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let news = found.iter().any(|addr| !learnt.contains(addr));
        *learnt = found;
        drop(learnt);
        if news {
            self.new_seeds.notify_one();
        }
    }

    /// Every seed to announce to: the `--peer` ones (to be resolved) and those learnt.
    pub(crate) fn seeds(&self) -> (Vec<String>, Vec<SocketAddr>) {
        let learnt = self
            .learnt
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        (self.seeds.clone(), learnt)
    }

    /// The link session configuration, for links accepted as for those dialled.
    pub(crate) fn session_config(&self) -> SessionConfig {
        self.session_config.clone()
    }

    /// The link addresses of the alive peers holding `hostname`, starting with a different
    /// one each call so visitors spread over them.
    pub fn holders(&self, hostname: &str) -> Vec<SocketAddr> {
        let table = self.lock();
        let Some(list) = table.index.get(hostname) else {
            return Vec::new();
        };
        let mut list = list.clone();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        let len = list.len();
        list.rotate_left(turn % len);
        list
    }

    /// Whether some alive peer holds `hostname`.
    pub fn holds(&self, hostname: &str) -> bool {
        self.lock().index.contains_key(hostname)
    }

    /// How many peers gossip says are alive.
    pub fn alive(&self) -> usize {
        self.lock().alive.len()
    }

    /// How many hostnames alive peers hold: the names this proxy can forward visitors of.
    pub fn held_names(&self) -> usize {
        self.lock().index.len()
    }

    /// Whether the member at `addr` is known to be alive.
    pub(crate) fn is_alive_at(&self, addr: SocketAddr) -> bool {
        self.lock().alive.iter().any(|id| id.addr == addr)
    }

    /// A receiver that sees a change whenever [`Peers::holders`] may have changed.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records `names` as what `id` holds at `version`. Returns whether that is news: a list
    /// newer than the one known for its address.
    pub(crate) fn record_holding(&self, id: PeerId, version: u64, names: Vec<String>) -> bool {
        if id.addr == self.advertise {
            return false;
        }
        let mut table = self.lock();
        if let Some(known) = table.holdings.get(&id.addr) {
            if (known.id.bump, known.version) >= (id.bump, version) {
                return false;
            }
        }
        table
            .holdings
            .insert(id.addr, Holding { id, version, names });
        table.reindex();
        drop(table);
        self.changed();
        true
    }

    /// Gossip says `id` is alive.
    pub(crate) fn member_up(&self, id: PeerId) {
        let mut table = self.lock();
        table.alive.retain(|known| known.addr != id.addr);
        table.alive.insert(id);
        table.reindex();
        drop(table);
        self.changed();
    }

    /// Gossip says `id` is down: it leaves routing at once, and its link is closed.
    pub(crate) fn member_down(&self, id: &PeerId) {
        let mut table = self.lock();
        table.alive.remove(id);
        if table.holdings.get(&id.addr).is_some_and(|h| h.id == *id) {
            table.holdings.remove(&id.addr);
        }
        table.reindex();
        drop(table);
        self.changed();
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&id.addr);
        if let Some(slot) = slot {
            if let Ok(state) = slot.link.try_lock() {
                if let Some(session) = &state.session {
                    session.close();
                }
            }
        }
    }

    /// Queues a gossip frame for the peer at `addr`, dialling it if need be. Never waits: a
    /// frame that finds the queue full is dropped, as a datagram would be.
    pub(crate) fn send_gossip(self: &Arc<Self>, addr: SocketAddr, frame: Vec<u8>) {
        let slot = self.slot(addr);
        if slot.gossip.try_send(frame).is_err() {
            debug!(peer = %addr, "gossip queue full; frame dropped");
        }
    }

    /// The link to the peer at `addr`, dialled now if there is none.
    pub(crate) async fn link(self: &Arc<Self>, addr: SocketAddr) -> Result<Session, LinkError> {
        let slot = self.slot(addr);
        let mut state = slot.link.lock().await;
        if let Some(session) = &state.session {
            if !session.is_closed() {
                return Ok(session.clone());
            }
        }
        if state
            .failed_at
            .is_some_and(|at| at.elapsed() < REDIAL_AFTER)
        {
            return Err(LinkError::Backoff);
        }
        match peer_link::dial(addr, self.tls.clone(), &self.secret, self.session_config()).await {
            Ok((session, incoming)) => {
                // The dialled end opens every stream; any the other end opens are reset.
                drop(incoming);
                state.session = Some(session.clone());
                state.failed_at = None;
                Ok(session)
            }
            Err(err) => {
                debug!(peer = %addr, %err, "could not link to peer");
                state.failed_at = Some(Instant::now());
                Err(err)
            }
        }
    }

    /// Whether a link to the peer at `addr` is up now.
    pub fn linked(&self, addr: SocketAddr) -> bool {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&addr)
            .cloned();
        slot.is_some_and(|slot| {
            slot.link
                .try_lock()
                .is_ok_and(|state| state.session.as_ref().is_some_and(|s| !s.is_closed()))
        })
    }

    fn slot(self: &Arc<Self>, addr: SocketAddr) -> Arc<Slot> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(slot) = slots.get(&addr) {
            return slot.clone();
        }
        let (gossip, frames) = mpsc::channel(GOSSIP_QUEUE);
        let slot = Arc::new(Slot {
            link: tokio::sync::Mutex::new(LinkState::default()),
            gossip,
        });
        slots.insert(addr, slot.clone());
        tokio::spawn(send_gossip(Arc::downgrade(self), addr, frames));
        slot
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Writes the frames queued for the peer at `addr` onto the gossip stream of its link,
/// opening the stream (and the link) again after a failure. Ends when the slot is dropped.
async fn send_gossip(
    peers: std::sync::Weak<Peers>,
    addr: SocketAddr,
    mut frames: mpsc::Receiver<Vec<u8>>,
) {
    let mut stream: Option<(Session, MuxStream)> = None;
    while let Some(frame) = frames.recv().await {
        if stream.as_ref().is_none_or(|(s, _)| s.is_closed()) {
            let Some(peers) = peers.upgrade() else { return };
            stream = open_gossip(&peers, addr).await;
        }
        let Some((_, writer)) = stream.as_mut() else {
            continue;
        };
        if let Err(err) = shroud_mux::peer::write_frame(writer, &frame).await {
            debug!(peer = %addr, %err, "gossip stream failed");
            stream = None;
        }
    }
}

async fn open_gossip(peers: &Arc<Peers>, addr: SocketAddr) -> Option<(Session, MuxStream)> {
    let session = peers.link(addr).await.ok()?;
    let mut stream = tokio::time::timeout(peer_link::LINK_TIMEOUT, session.open())
        .await
        .ok()?
        .ok()?;
    let kind = [shroud_mux::peer::StreamKind::Gossip.byte()];
    tokio::io::AsyncWriteExt::write_all(&mut stream, &kind)
        .await
        .ok()?;
    Some((session, stream))
}
