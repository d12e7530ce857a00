//! Accounting: every failed request is attributed to the event that broke it, or counted as
//! unexplained; corruption is counted apart (in [`crate::report`]) and never excused.
//!
//! A failure is attributed to an event when the request was in flight, at the proxy it had
//! reached, while the event was breaking that proxy's path:
//!
//! - a proxy killed or drained: from the signal until the process was gone;
//! - a client killed, or a relay killed: for each tunnel the event broke (every tunnel of the
//!   killed client; every tunnel whose client reported it lost, or whose proxy closed it, before
//!   the event was over), from the event until its proxy closed it (until then the proxy may
//!   still route visitors into it) or its client noticed, whichever came later; only for
//!   requests that tunnel's client's origin answered, or whose TLS handshake had not shown an
//!   origin yet.
//!
//! Which client holds which tunnel is read from the logs: the proxy's "tunnel bound" and the
//! client's "tunnel up" for that proxy come within a Tor round trip of each other. Each window
//! gets [`SLACK`] at its end for the last bytes of a dying connection. Anything else is
//! unexplained: a request refused by a proxy that was up, one cut on a tunnel no event touched,
//! a timeout with nothing killed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use shroud_tests::load::Record;

use crate::chaos::{Event, Kind};
use crate::fleet::KEEPALIVE_SECS;
use crate::procs::{Note, Seen};

/// Everything the accounting and the summary are made from: what ran and what happened.
pub struct Inputs<'a> {
    /// The seed of the schedule and of the requests' work.
    pub seed: u64,
    /// The traffic duration asked for.
    pub minutes: f64,
    /// When the soak started, by the wall clock.
    pub wall_start: SystemTime,
    /// The soak's clock: every time is given since then (logs and journal too).
    pub epoch: Instant,
    /// When traffic started.
    pub traffic_start: Instant,
    /// When traffic was told to stop.
    pub traffic_end: Instant,
    /// Set if the run ended early, and why.
    pub stopped_early: Option<String>,
    /// How long the Tor network and the fleet took to be ready.
    pub setup: Duration,
    /// The events, in order.
    pub events: &'a [Event],
    /// Every request.
    pub records: &'a [Record],
    /// Every client's notes.
    pub client_notes: &'a [Vec<Note>],
    /// Every proxy's notes.
    pub proxy_notes: &'a [Vec<Note>],
    /// Where the processes' logs are.
    pub log_dir: &'a Path,
    /// The network's shape, for people.
    pub network: String,
    /// The version of the source, for people.
    pub source: String,
}

/// Added to the end of every window of an event.
pub const SLACK: Duration = Duration::from_millis(1000);
/// If no proxy logged a killed client's tunnel closing, the proxy's idle timeout (45 s) bounds
/// how long it could have routed visitors to it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(45);

/// A stretch of time during which an event broke paths through one proxy.
pub struct Window {
    /// Index into the events.
    pub event: usize,
    /// The proxy whose requests it covers.
    pub proxy: usize,
    /// Only requests answered by this client's origin (or by no known origin yet).
    pub client: Option<usize>,
    /// From the event.
    pub from: Instant,
    /// Until the path was repaired (or known dead), [`SLACK`] included.
    pub to: Instant,
}

/// What became of one failed request.
pub enum Verdict {
    /// To this event (an index into the events).
    Attributed(usize),
    /// To nothing.
    Unexplained,
}

/// When the effects of event `i` are over: once every tunnel is bound again (or its process
/// is back, if not every tunnel came back), plus the time a silently dead tunnel takes to be
/// noticed (two keepalives); at the latest when the next event starts.
pub fn event_end(events: &[Event], i: usize) -> Instant {
    let event = &events[i];
    let settled = event
        .recovered
        .or(event.restarted)
        .unwrap_or(event.gone)
        .max(event.gone)
        + Duration::from_secs(2 * KEEPALIVE_SECS)
        + SLACK;
    events
        .get(i + 1)
        .map_or(settled, |next| settled.min(next.at))
}

/// One bound tunnel, as its proxy saw it.
pub struct Tunnel {
    /// Its proxy.
    pub proxy: usize,
    /// The client that holds it, matched by time: the client whose "tunnel up" for this proxy
    /// came right after the proxy's "tunnel bound". `None` if none did.
    pub client: Option<usize>,
    /// When the proxy bound it.
    pub bound: Instant,
    /// When the proxy closed it (stopped routing visitors to it), or its process ended.
    pub closed: Option<Instant>,
}

impl Tunnel {
    /// Whether it was bound at `at`.
    fn alive_at(&self, at: Instant) -> bool {
        self.bound <= at && self.closed.is_none_or(|closed| closed >= at)
    }
}

/// How long after its proxy said "tunnel bound" the client may say "tunnel up" (one Tor round
/// trip, on a busy machine).
pub const BIND_MATCH: Duration = Duration::from_secs(3);

/// Every tunnel every proxy bound, with its client.
pub fn tunnels(inputs: &Inputs<'_>) -> Vec<Tunnel> {
    let mut tunnels: Vec<Tunnel> = Vec::new();
    for (proxy, notes) in inputs.proxy_notes.iter().enumerate() {
        // Tunnel numbers start again in each process.
        let mut open: BTreeMap<u64, usize> = BTreeMap::new();
        for note in notes {
            match note.seen {
                Seen::Started | Seen::Stopped => {
                    for (_, index) in std::mem::take(&mut open) {
                        tunnels[index].closed.get_or_insert(note.at);
                    }
                }
                Seen::TunnelBound(id) => {
                    open.insert(id, tunnels.len());
                    tunnels.push(Tunnel {
                        proxy,
                        client: None,
                        bound: note.at,
                        closed: None,
                    });
                }
                Seen::TunnelClosed(id) => {
                    if let Some(index) = open.remove(&id) {
                        tunnels[index].closed = Some(note.at);
                    }
                }
                _ => {}
            }
        }
    }
    // Each client's "tunnel up", matched in order to the nearest unmatched bind before it.
    let mut ups: Vec<(Instant, usize, usize)> = Vec::new();
    for (client, notes) in inputs.client_notes.iter().enumerate() {
        for note in notes {
            if let Seen::TunnelUp(proxy) = note.seen {
                ups.push((note.at, client, proxy));
            }
        }
    }
    ups.sort();
    for (at, client, proxy) in ups {
        let best = tunnels
            .iter_mut()
            .filter(|t| {
                t.proxy == proxy
                    && t.client.is_none()
                    && t.bound <= at
                    && at.saturating_duration_since(t.bound) <= BIND_MATCH
            })
            .max_by_key(|t| t.bound);
        if let Some(tunnel) = best {
            tunnel.client = Some(client);
        }
    }
    tunnels
}

/// Every window of every event.
///
/// A tunnel an event broke carries visitors to their failure until its proxy closes it; the
/// window of such a tunnel runs from the event to that close (or to the client noticing, if
/// later), for requests of its client.
pub fn windows(inputs: &Inputs<'_>) -> Vec<Window> {
    let tunnels = tunnels(inputs);
    let mut windows = Vec::new();
    for (i, event) in inputs.events.iter().enumerate() {
        match event.kind {
            Kind::ProxyKill | Kind::ProxyTerm => {
                if let Some(proxy) = event.proxy {
                    windows.push(Window {
                        event: i,
                        proxy,
                        client: None,
                        from: event.at,
                        to: event.gone + SLACK,
                    });
                }
            }
            Kind::ClientKill | Kind::RelayKill => {
                for broken in broken_tunnels(inputs, &tunnels, i) {
                    windows.push(Window {
                        event: i,
                        proxy: broken.proxy,
                        client: broken.client,
                        from: event.at,
                        to: broken.until + SLACK,
                    });
                }
            }
        }
    }
    windows
}

/// A tunnel that a client or relay kill broke.
pub struct Broken {
    /// Its proxy.
    pub proxy: usize,
    /// Its client, if known.
    pub client: Option<usize>,
    /// When its proxy closed it, if it did.
    pub closed: Option<Instant>,
    /// When its client said it was lost, if it did (not for a killed client).
    pub lost: Option<Instant>,
    /// Until when it may have carried visitors to their failure.
    pub until: Instant,
}

/// The tunnels event `i` (a client or relay kill) broke.
///
/// A killed client's: every tunnel of it bound at the kill. A killed relay's: every tunnel
/// bound at the kill that its client reported lost, or its proxy closed, before the event was
/// over (the relay carried its circuit; when the other side of the circuit does not hear of it,
/// the proxy holds the dead tunnel until its idle timeout, and the client until two keepalives
/// pass).
pub fn broken_tunnels(inputs: &Inputs<'_>, tunnels: &[Tunnel], i: usize) -> Vec<Broken> {
    let event = &inputs.events[i];
    let end = event_end(inputs.events, i);
    let mut broken = Vec::new();
    for tunnel in tunnels.iter().filter(|t| t.alive_at(event.at)) {
        let lost = tunnel.client.and_then(|client| {
            first(inputs.client_notes, client, event.at, end, |s| {
                *s == Seen::TunnelLost(tunnel.proxy)
            })
        });
        let closed = tunnel.closed.filter(|at| *at >= event.at);
        let hit = match event.kind {
            Kind::ClientKill => tunnel.client.is_some() && tunnel.client == event.client,
            Kind::RelayKill => lost.is_some() || closed.is_some_and(|at| at <= end),
            Kind::ProxyKill | Kind::ProxyTerm => false,
        };
        if hit {
            // A proxy closes a dead tunnel within its idle timeout at the latest.
            let until = closed
                .unwrap_or(event.gone + IDLE_TIMEOUT)
                .max(lost.unwrap_or(event.at));
            broken.push(Broken {
                proxy: tunnel.proxy,
                client: tunnel.client,
                closed,
                lost,
                until,
            });
        }
    }
    broken
}

/// The first note of slot `index` in `(from, to]` that `wanted` accepts.
pub fn first(
    notes: &[Vec<Note>],
    index: usize,
    from: Instant,
    to: Instant,
    wanted: impl Fn(&Seen) -> bool,
) -> Option<Instant> {
    notes
        .get(index)?
        .iter()
        .filter(|n| n.at > from && n.at <= to && wanted(&n.seen))
        .map(|n| n.at)
        .min()
}

pub fn attribute(record: &Record, windows: &[Window]) -> Verdict {
    let Some(proxy) = record.proxy else {
        return Verdict::Unexplained;
    };
    windows
        .iter()
        .find(|w| {
            w.proxy == proxy
                && (w.client.is_none() || record.origin.is_none() || record.origin == w.client)
                && record.started <= w.to
                && record.ended >= w.from
        })
        .map_or(Verdict::Unexplained, |w| Verdict::Attributed(w.event))
}

/// How an event ended for the tunnels it broke.
pub enum Recovery {
    /// Every one was bound again at this moment.
    Back(Instant),
    /// It broke none.
    Untouched,
    /// Not every one came back.
    Never,
}

pub fn recovery(inputs: &Inputs<'_>, event: &Event) -> Recovery {
    let up_after = |client: usize, proxy: usize, after: Instant| {
        inputs.client_notes.get(client).and_then(|notes| {
            notes
                .iter()
                .filter(|n| n.at >= after && n.seen == Seen::TunnelUp(proxy))
                .map(|n| n.at)
                .min()
        })
    };
    // (client, proxy, after which it must be up)
    let mut needed = Vec::new();
    match event.kind {
        Kind::ProxyKill | Kind::ProxyTerm => {
            let (Some(proxy), Some(restarted)) = (event.proxy, event.restarted) else {
                return Recovery::Never;
            };
            needed.extend((0..inputs.client_notes.len()).map(|c| (c, proxy, restarted)));
        }
        Kind::ClientKill => {
            let (Some(client), Some(restarted)) = (event.client, event.restarted) else {
                return Recovery::Never;
            };
            needed.extend((0..inputs.proxy_notes.len()).map(|p| (client, p, restarted)));
        }
        Kind::RelayKill => {
            let tunnels = tunnels(inputs);
            for broken in broken_tunnels(inputs, &tunnels, event.id - 1) {
                if let (Some(client), Some(lost)) = (broken.client, broken.lost) {
                    needed.push((client, broken.proxy, lost));
                }
            }
            if needed.is_empty() {
                return Recovery::Untouched;
            }
        }
    }
    let mut last = event.at;
    for (client, proxy, after) in needed {
        match up_after(client, proxy, after) {
            Some(at) => last = last.max(at),
            None => return Recovery::Never,
        }
    }
    Recovery::Back(last)
}
