//! The chaos schedule: from a seed, one disruption at a time, each followed by a pause and a
//! restart, then a wait until every tunnel is bound again before the next random gap.
//!
//! One component is down at a time (a proxy, a client or a relay), so at least two proxies
//! and one client, or all three proxies and both clients, always offer a path: the service is
//! meant to stay up throughout. Every step is logged with its time since the start of
//! traffic.

use std::fmt;
use std::fs::File;
use std::io::{LineWriter, Write as _};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use shroud_tests::tornet::{RelayKind, TorNet};
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, DRAIN_SECS};
use crate::procs::{self, Seen};

/// The gap between the end of one event (all tunnels bound again) and the next.
const GAP_SECS: (f64, f64) = (15.0, 45.0);
/// How long a SIGKILLed proxy stays down.
const PROXY_DOWN_SECS: (f64, f64) = (1.0, 15.0);
/// How long a drained proxy stays down.
const TERM_DOWN_SECS: (f64, f64) = (1.0, 10.0);
/// How long a killed relay stays down.
const RELAY_DOWN_SECS: (f64, f64) = (5.0, 40.0);
/// How long a killed client stays down.
const CLIENT_DOWN_SECS: (f64, f64) = (1.0, 15.0);
/// How long an event may take to be over: every tunnel bound again after the restart.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(180);
/// The longest an event lasts, pause and recovery included: no event starts unless this
/// much time is left before the end of the chaos.
const EVENT_BUDGET: Duration = Duration::from_secs(60);
/// Attempts at restarting a killed relay, and the pause between them.
const RELAY_RESTART_ATTEMPTS: usize = 5;
const RELAY_RESTART_RETRY: Duration = Duration::from_secs(2);

/// A small seeded generator (splitmix64): the whole schedule follows from the seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn between(&mut self, (lo, hi): (f64, f64)) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A seconds range as a duration.
    fn pause(&mut self, range: (f64, f64)) -> Duration {
        Duration::from_secs_f64(self.between(range))
    }
}

/// What an event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// SIGKILL a proxy, restart it on its address after a pause.
    ProxyKill,
    /// SIGTERM a proxy (it drains), restart it after a pause.
    ProxyTerm,
    /// SIGKILL a middle or exit relay of the Tor network, restart it after a pause.
    RelayKill,
    /// SIGKILL a client, restart it after a pause.
    ClientKill,
}

impl Kind {
    /// Every kind, in the order the summary lists them.
    pub const ALL: [Kind; 4] = [
        Kind::ProxyKill,
        Kind::ProxyTerm,
        Kind::RelayKill,
        Kind::ClientKill,
    ];

    /// How often each kind is picked, relative to the others.
    fn weight(self) -> usize {
        match self {
            Kind::ProxyKill | Kind::RelayKill => 3,
            Kind::ProxyTerm | Kind::ClientKill => 2,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::ProxyKill => "proxy-kill",
            Kind::ProxyTerm => "proxy-term",
            Kind::RelayKill => "relay-kill",
            Kind::ClientKill => "client-kill",
        })
    }
}

/// One event, as it happened.
#[derive(Debug, Clone)]
pub struct Event {
    /// 1, 2, 3, ... in order.
    pub id: usize,
    /// What it did.
    pub kind: Kind,
    /// What it did it to, for people: `proxy 1 (pid 123)`.
    pub target: String,
    /// The proxy, for proxy events.
    pub proxy: Option<usize>,
    /// The client, for client events.
    pub client: Option<usize>,
    /// When the signal was sent.
    pub at: Instant,
    /// When the process was gone.
    pub gone: Instant,
    /// When its replacement was running (a proxy listening, a relay's tor up, a client's
    /// process started); `None` if it could not be restarted.
    pub restarted: Option<Instant>,
    /// When every tunnel was bound again, if that happened within [`RECOVERY_LIMIT`].
    pub recovered: Option<Instant>,
    /// Anything worth knowing: an unclean exit, a restart that needed retries.
    pub notes: Vec<String>,
}

impl Event {
    /// Event `id`, which did `kind` to `target` at `at`, gone by `gone`, neither restarted nor
    /// recovered from yet, and concerning no proxy or client until the caller says so.
    fn new(id: usize, kind: Kind, target: String, at: Instant, gone: Instant) -> Self {
        Self {
            id,
            kind,
            target,
            proxy: None,
            client: None,
            at,
            gone,
            restarted: None,
            recovered: None,
            notes: Vec::new(),
        }
    }
}

/// Where events are told: stdout and the events log, each line stamped with the seconds since
/// the start of traffic.
#[derive(Clone)]
pub struct Journal {
    epoch: Instant,
    file: Arc<Mutex<LineWriter<File>>>,
}

impl Journal {
    /// A journal writing to `path`, counting time from `epoch`.
    pub fn create(path: &Path, epoch: Instant) -> anyhow::Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            epoch,
            file: Arc::new(Mutex::new(LineWriter::new(file))),
        })
    }

    /// Seconds since the epoch, as the journal prints them (negative before it).
    pub fn stamp(&self, at: Instant) -> String {
        stamp(self.epoch, at)
    }

    /// Logs `msg` as of now.
    pub fn log(&self, msg: impl fmt::Display) {
        let line = format!("[{}] {msg}", self.stamp(Instant::now()));
        println!("{line}");
        let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        // The journal is a convenience copy of stdout; a full disk must not end the soak.
        let _ = writeln!(file, "{line}");
    }
}

/// `at` as `+123.456s` since `epoch` (or `-1.000s` before it).
pub fn stamp(epoch: Instant, at: Instant) -> String {
    match at.checked_duration_since(epoch) {
        Some(after) => format!("+{:.3}s", after.as_secs_f64()),
        None => format!("-{:.3}s", epoch.duration_since(at).as_secs_f64()),
    }
}

/// Runs the schedule until `until` (no event starts unless [`EVENT_BUDGET`] is left) or
/// `cancel`. Returns the events, and the error that stopped the schedule early, if any.
pub async fn run(
    fleet: &mut Fleet,
    net: &Arc<Mutex<TorNet>>,
    rng: &mut Rng,
    until: Instant,
    cancel: &CancellationToken,
    journal: &Journal,
) -> (Vec<Event>, Option<anyhow::Error>) {
    let mut tally = Tally::default();
    loop {
        let gap = rng.pause(GAP_SECS);
        if Instant::now() + gap + EVENT_BUDGET > until {
            break;
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(gap) => {}
        }
        let total: usize = Kind::ALL.iter().map(|k| k.weight()).sum();
        let mut pick = rng.below(total);
        let mut kind = Kind::ALL[0];
        for candidate in Kind::ALL {
            if pick < candidate.weight() {
                kind = candidate;
                break;
            }
            pick -= candidate.weight();
        }
        if kind == Kind::RelayKill {
            if let Some(nick) = tally.relay_down.clone() {
                if restart_relay(net, &nick, journal).await.is_ok() {
                    tally.relay_down = None;
                } else {
                    kind = Kind::ProxyKill;
                }
            }
        }
        let id = tally.events.len() + 1;
        // An event is recorded as soon as its signal is sent, so one cut short by a Ctrl-C
        // still explains the failures it caused.
        let step = one_event(fleet, net, rng, id, kind, journal, &mut tally);
        let done = tokio::select! {
            () = cancel.cancelled() => break,
            done = step => done,
        };
        if let Err(err) = done {
            journal.log(format_args!("event #{id} ({kind}): {err:#}"));
            return (tally.events, Some(err));
        }
    }
    if let Some(nick) = tally.relay_down {
        // Leave the network whole for the rest of the run if we can.
        let _ = restart_relay(net, &nick, journal).await;
    }
    (tally.events, None)
}

/// What the schedule has done so far.
#[derive(Default)]
struct Tally {
    /// Every event, recorded as soon as its signal is sent.
    events: Vec<Event>,
    /// A relay that could not be restarted stays down; no other relay is killed until it is
    /// back.
    relay_down: Option<String>,
}

/// Runs one event of `kind`, then waits until every tunnel is bound again.
async fn one_event(
    fleet: &mut Fleet,
    net: &Arc<Mutex<TorNet>>,
    rng: &mut Rng,
    id: usize,
    kind: Kind,
    journal: &Journal,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    match kind {
        Kind::ProxyKill | Kind::ProxyTerm => {
            proxy_event(fleet, rng, id, kind, journal, &mut tally.events).await?;
        }
        Kind::ClientKill => client_event(fleet, rng, id, journal, &mut tally.events).await?,
        Kind::RelayKill => relay_event(fleet, net, rng, id, journal, tally).await?,
    }
    let event = tally
        .events
        .last_mut()
        .context("the event was not recorded")?;
    // The pairs this event broke on purpose must come up again after its restart.
    let fresh = fresh_pairs(fleet, event);
    event.recovered = fleet
        .wait_all_bound(&fresh, RECOVERY_LIMIT)
        .await
        .with_context(|| format!("the fleet broke after event #{id}"))?;
    match event.recovered {
        Some(when) => journal.log(format_args!(
            "event #{id}: every tunnel bound again, {:.1} s after the event",
            when.saturating_duration_since(event.at).as_secs_f64()
        )),
        None => journal.log(format_args!(
            "event #{id}: NOT every tunnel bound again within {RECOVERY_LIMIT:?}"
        )),
    }
    Ok(())
}

/// The (client, proxy) pairs `event` broke on purpose, each with the moment after which its
/// tunnel must have come up again.
fn fresh_pairs(fleet: &Fleet, event: &Event) -> Vec<(usize, usize, Instant)> {
    let Some(restarted) = event.restarted else {
        return Vec::new();
    };
    match (event.proxy, event.client) {
        (Some(proxy), _) => (0..fleet.clients.len())
            .map(|client| (client, proxy, restarted))
            .collect(),
        (None, Some(client)) => (0..fleet.proxies.len())
            .map(|proxy| (client, proxy, restarted))
            .collect(),
        (None, None) => Vec::new(),
    }
}

/// Kills (SIGKILL) or drains (SIGTERM) a random proxy, pauses, restarts it.
async fn proxy_event(
    fleet: &mut Fleet,
    rng: &mut Rng,
    id: usize,
    kind: Kind,
    journal: &Journal,
    events: &mut Vec<Event>,
) -> anyhow::Result<()> {
    let index = rng.below(fleet.proxies.len());
    let pause = rng.pause(if kind == Kind::ProxyKill {
        PROXY_DOWN_SECS
    } else {
        TERM_DOWN_SECS
    });
    let slot = &mut fleet.proxies[index];
    let mut proc = slot.proc.take().context("the proxy is not running")?;
    let target = format!("proxy {index} {} (pid {})", slot.addr, proc.pid());
    let at = Instant::now();
    let limit = Duration::from_secs(DRAIN_SECS + 10);
    // Recorded before the drain, with the longest it may take, in case the run is cut short
    // during it; corrected once the process is gone.
    events.push(Event {
        proxy: Some(index),
        ..Event::new(id, kind, target.clone(), at, at + limit)
    });
    let gone = if kind == Kind::ProxyKill {
        journal.log(format_args!("event #{id}: kill -9 {target}"));
        proc.kill()
    } else {
        journal.log(format_args!(
            "event #{id}: SIGTERM {target} (drain up to {DRAIN_SECS} s)"
        ));
        proc.terminate();
        match proc.wait_exit(limit).await {
            Some(status) if status.success() => Instant::now(),
            Some(status) => {
                note(events, format!("exited with {status} on SIGTERM"));
                Instant::now()
            }
            None => {
                note(
                    events,
                    format!("still running {limit:?} after SIGTERM; killed"),
                );
                proc.kill()
            }
        }
    };
    if let Some(event) = events.last_mut() {
        event.gone = gone;
    }
    procs::note(&slot.history, Seen::Stopped);
    drop(proc);
    journal.log(format_args!(
        "event #{id}: {target} gone after {:.3} s; down for {:.1} s",
        gone.duration_since(at).as_secs_f64(),
        pause.as_secs_f64()
    ));
    tokio::time::sleep(pause).await;
    let restarted = fleet.start_proxy(index).await?;
    let pid = fleet.proxies[index].proc.as_ref().map_or(0, |p| p.pid());
    journal.log(format_args!(
        "event #{id}: proxy {index} restarted (pid {pid}), listening again"
    ));
    restarted_at(events, restarted);
    Ok(())
}

/// Records when the last event's process was running again.
fn restarted_at(events: &mut [Event], at: Instant) {
    if let Some(event) = events.last_mut() {
        event.restarted = Some(at);
    }
}

/// Kills (SIGKILL) a random client, pauses, restarts it.
async fn client_event(
    fleet: &mut Fleet,
    rng: &mut Rng,
    id: usize,
    journal: &Journal,
    events: &mut Vec<Event>,
) -> anyhow::Result<()> {
    let index = rng.below(fleet.clients.len());
    let pause = rng.pause(CLIENT_DOWN_SECS);
    let slot = &mut fleet.clients[index];
    let mut proc = slot.proc.take().context("the client is not running")?;
    let target = format!("client {index} (pid {})", proc.pid());
    journal.log(format_args!("event #{id}: kill -9 {target}"));
    let at = Instant::now();
    let gone = proc.kill();
    procs::note(&slot.history, Seen::Stopped);
    drop(proc);
    journal.log(format_args!(
        "event #{id}: {target} gone; down for {:.1} s",
        pause.as_secs_f64()
    ));
    events.push(Event {
        client: Some(index),
        ..Event::new(id, Kind::ClientKill, target, at, gone)
    });
    tokio::time::sleep(pause).await;
    let restarted = fleet.start_client(index)?;
    let pid = fleet.clients[index].proc.as_ref().map_or(0, |p| p.pid());
    journal.log(format_args!(
        "event #{id}: client {index} restarted (pid {pid})"
    ));
    restarted_at(events, restarted);
    Ok(())
}

/// Kills (SIGKILL) a random middle or exit relay, pauses, restarts it. Authorities are never
/// killed: the network needs all three to keep voting.
async fn relay_event(
    fleet: &mut Fleet,
    net: &Arc<Mutex<TorNet>>,
    rng: &mut Rng,
    id: usize,
    journal: &Journal,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let events = &mut tally.events;
    let candidates: Vec<(String, u32)> = {
        let net = net.lock().unwrap_or_else(PoisonError::into_inner);
        net.relays()
            .iter()
            .filter(|relay| relay.kind != RelayKind::Authority)
            .map(|relay| (relay.nick.clone(), relay.pid))
            .collect()
    };
    let (nick, pid) = candidates[rng.below(candidates.len())].clone();
    let pause = rng.pause(RELAY_DOWN_SECS);
    let target = format!("relay {nick} (pid {pid})");
    journal.log(format_args!("event #{id}: kill -9 {target}"));
    let at = Instant::now();
    let killer = net.clone();
    tokio::task::spawn_blocking(move || {
        killer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .kill(pid);
    })
    .await
    .context("killing the relay")?;
    let gone = Instant::now();
    journal.log(format_args!(
        "event #{id}: {target} gone; down for {:.1} s",
        pause.as_secs_f64()
    ));
    events.push(Event::new(id, Kind::RelayKill, target, at, gone));
    tokio::time::sleep(pause).await;
    fleet.check_alive()?;
    match restart_relay(net, &nick, journal).await {
        Ok((at, attempts)) => {
            restarted_at(events, at);
            if attempts > 1 {
                note(events, format!("restarted at attempt {attempts}"));
            }
        }
        Err(err) => {
            note(events, format!("could not be restarted: {err:#}"));
            tally.relay_down = Some(nick.clone());
        }
    }
    Ok(())
}

/// Adds a note to the last event.
fn note(events: &mut [Event], text: String) {
    if let Some(event) = events.last_mut() {
        event.notes.push(text);
    }
}

/// Restarts relay `nick`, trying a few times (a port of its may be taken for a moment).
/// Returns when it was up, and after how many attempts.
async fn restart_relay(
    net: &Arc<Mutex<TorNet>>,
    nick: &str,
    journal: &Journal,
) -> anyhow::Result<(Instant, usize)> {
    let mut last = None;
    for attempt in 1..=RELAY_RESTART_ATTEMPTS {
        let (net, name) = (net.clone(), nick.to_owned());
        let started = tokio::task::spawn_blocking(move || {
            net.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .restart(&name)
        })
        .await
        .context("restarting the relay")?;
        match started {
            Ok(pid) => {
                journal.log(format_args!("relay {nick} restarted (pid {pid})"));
                return Ok((Instant::now(), attempt));
            }
            Err(err) => {
                journal.log(format_args!(
                    "relay {nick}: restart attempt {attempt} failed: {err:#}"
                ));
                last = Some(err);
                tokio::time::sleep(RELAY_RESTART_RETRY).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
}
