//! The task behind an [`OnionListener`](super::OnionListener): it hands the service's streams
//! over, logs its state, checks it through Tor and relaunches it when Tor clients cannot reach
//! it.
//!
//! Timings, from the probe interval `I` ([`DEFAULT_PROBE_INTERVAL`] unless told otherwise):
//! - the first check comes `I` after the service says it has published its descriptor (or,
//!   if it never says so, `5 I` after the launch, at least a minute, at most ten);
//! - a healthy service is checked every `I`; after a failed check the next comes `I / 4`
//!   later (at least 5 s, at most `I`), so that a dead service is noticed in about `1.5 I`;
//! - each check gets `I` to finish, at least 20 s and at most 60 s (a first connection to an
//!   onion service takes a few seconds on the real network);
//! - [`PROBE_FAILURES_TO_RELAUNCH`] failed checks in a row relaunch the service; a relaunch that
//!   did not help is followed by the next no sooner than `2 I` later, then `4 I`, and so on up
//!   to an hour, so a broken network (or a broken Tor client) does not make it relaunch in a
//!   loop. A check that succeeds resets all of it.
//!
//! A relaunch drops Arti's handle of the service (streams already open stay open), waits for
//! Arti to let go of the service's state, deletes its record of the introduction points
//! (`state/hss/NICKNAME/ipts.json`: otherwise the new launch would load them and retry the same
//! dead relays), and launches again with the same nickname: the same key, the same address,
//! new introduction points and a new descriptor. The old introduction points' keys are deleted
//! by Arti itself once nothing refers to them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arti_client::config::BoolOrAuto;
use arti_client::{ErrorKind, HasKind as _, IsolationToken, StreamPrefs};
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tor_hsservice::status::{OnionServiceStatus, State};
use tor_hsservice::{HsNickname, StreamRequest};
use tor_persist::state_dir::StateDirectory;
use tracing::{debug, info, warn};

use super::{launch_service, reject, requested_port, Launched, OnionConnection, OnionHealth};
use super::{OnionOptions, TorError};
use crate::Tor;

/// How often a service checks itself unless told otherwise.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(120);
/// Failed self-checks in a row that relaunch the service.
pub const PROBE_FAILURES_TO_RELAUNCH: u32 = 3;
/// The longest a check may take.
const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(60);
/// The shortest deadline a check gets, however short the interval.
const PROBE_TIMEOUT_MIN: Duration = Duration::from_secs(20);
/// The shortest wait before checking again after a failed check: failures a moment apart
/// often share one cause (a dead relay on a path), not the service's.
const RETRY_MIN: Duration = Duration::from_secs(5);
/// The longest wait between relaunches that did not help.
const MAX_RELAUNCH_BACKOFF: Duration = Duration::from_secs(3600);
/// How long Arti may take to let go of a stopped service's state.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// Arti's record of a service's introduction points, in its state directory.
const IPT_RECORD: &str = "ipts";

/// When the next check comes, and when a relaunch is due.
#[derive(Debug)]
pub(super) struct Schedule {
    interval: Duration,
    /// Failed checks since the last success or relaunch.
    failures: u32,
    /// Relaunches since the last successful check.
    relaunches: u32,
    last_relaunch: Option<Instant>,
}

/// What to do after a failed check.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Check again then.
    CheckAt(Instant),
    /// Relaunch the service now.
    Relaunch,
}

impl Schedule {
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            failures: 0,
            relaunches: 0,
            last_relaunch: None,
        }
    }

    /// The first check after a launch at `launched`: an interval after the service said it
    /// had published its descriptor (at `published`), since checks before the descriptor is
    /// out would fail for nothing; but a service that never says so is checked too.
    fn first_check(&self, launched: Instant, published: Option<Instant>) -> Instant {
        match published {
            Some(at) => at.max(launched) + self.interval,
            None => {
                let grace = (self.interval * 5)
                    .max(Duration::from_secs(60))
                    .min(Duration::from_secs(600));
                (launched + self.interval).max(launched + grace)
            }
        }
    }

    /// How long a check may take.
    fn timeout(&self) -> Duration {
        self.interval.clamp(PROBE_TIMEOUT_MIN, PROBE_TIMEOUT_MAX)
    }

    /// A check reached the service: the next comes a whole interval later.
    pub(super) fn succeeded(&mut self, now: Instant) -> Instant {
        self.failures = 0;
        self.relaunches = 0;
        now + self.interval
    }

    /// A check failed.
    pub(super) fn failed(&mut self, now: Instant) -> Verdict {
        self.failures += 1;
        let backoff_over = match self.last_relaunch {
            None => true,
            Some(last) => now >= last + self.backoff(),
        };
        if self.failures >= PROBE_FAILURES_TO_RELAUNCH && backoff_over {
            return Verdict::Relaunch;
        }
        let retry = (self.interval / 4).max(RETRY_MIN).min(self.interval);
        Verdict::CheckAt(now + retry)
    }

    /// The service has published its descriptor: earlier failures do not count.
    pub(super) fn descriptor_out(&mut self) {
        self.failures = 0;
    }

    /// The service was relaunched at `now`.
    pub(super) fn relaunched(&mut self, now: Instant) {
        self.failures = 0;
        self.relaunches += 1;
        self.last_relaunch = Some(now);
    }

    /// Failed checks in a row.
    pub(super) fn failures(&self) -> u32 {
        self.failures
    }

    /// How long after the last relaunch the next may come.
    fn backoff(&self) -> Duration {
        let doublings = self.relaunches.min(16);
        self.interval
            .saturating_mul(1 << doublings)
            .min(MAX_RELAUNCH_BACKOFF)
    }
}

/// How one launch of the service ended.
enum Ended {
    /// The listener was dropped: stop.
    Stopped,
    /// Tor clients cannot reach it (or Arti stopped it): launch it again.
    Relaunch,
}

/// Serves, checks and relaunches one onion service.
pub(super) struct Keeper {
    client: Arc<Tor>,
    nickname: HsNickname,
    address: String,
    ports: Vec<u16>,
    /// The port checks ask for: one the service does not serve, so it refuses them.
    probe_port: u16,
    schedule: Option<Schedule>,
    state: StateDirectory,
    sender: mpsc::Sender<OnionConnection>,
    health: Arc<OnionHealth>,
}

impl Keeper {
    pub(super) fn new(
        client: Arc<Tor>,
        nickname: HsNickname,
        options: &OnionOptions,
        address: String,
        sender: mpsc::Sender<OnionConnection>,
        health: Arc<OnionHealth>,
    ) -> Result<Self, TorError> {
        // Arti's own default permission checks (`ARTI_FS_DISABLE_PERMISSION_CHECKS` included):
        // the directory is the one Arti has just launched the service in.
        let config = arti_client::TorClientConfig::default();
        let state = StateDirectory::new(options.tor_dir.join("state"), config.fs_mistrust())
            .map_err(|err| TorError::OnionService(format!("Arti's state directory: {err}")))?;
        let probe_port = (1..=u16::MAX)
            .find(|port| !options.ports.contains(port))
            .unwrap_or(1);
        Ok(Self {
            client,
            nickname,
            address,
            ports: options.ports.clone(),
            probe_port,
            schedule: options.probe_interval.map(Schedule::new),
            state,
            sender,
            health,
        })
    }

    /// Serves `service`, and every relaunch of it, until the listener is dropped.
    pub(super) async fn run(mut self, mut service: Launched) {
        loop {
            if let Ended::Stopped = self.serve(service).await {
                debug!("onion service stopped");
                return;
            }
            service = match self.relaunch().await {
                Some(service) => service,
                None => return,
            };
        }
    }

    /// Serves one launch until the listener is dropped or it must be relaunched.
    async fn serve(&mut self, service: Launched) -> Ended {
        let Launched {
            running,
            mut requests,
        } = service;
        let mut status = running.status_events();
        let launched = Instant::now();
        let (mut published, mut last_state) = (None, None);
        let mut probe: Option<Probe> = None;
        let mut next_check = None;
        loop {
            let check_at = match (&self.schedule, next_check) {
                (None, _) => None,
                (Some(_), Some(at)) => Some(at),
                (Some(schedule), None) => Some(schedule.first_check(launched, published)),
            };
            // A disabled branch's future is still made: give it a time that never comes.
            let wake =
                check_at.unwrap_or_else(|| launched + Duration::from_secs(100 * 365 * 86400));
            tokio::select! {
                () = self.sender.closed() => return Ended::Stopped,
                next = requests.next() => {
                    let Some(request) = next else {
                        warn!(onion = %self.address, "the onion service stopped taking visitors");
                        return self.after_stop().await;
                    };
                    if !self.dispatch(request).await {
                        return Ended::Stopped;
                    }
                }
                Some(now) = status.next() => {
                    let was_out = published.is_some();
                    self.note_status(&now, &mut last_state, &mut published);
                    if !was_out && published.is_some() {
                        // Checks that failed before the descriptor was out say nothing of it:
                        // start counting afresh, an interval from now.
                        if let Some(schedule) = self.schedule.as_mut() {
                            schedule.descriptor_out();
                        }
                        next_check = None;
                    }
                }
                () = tokio::time::sleep_until(wake), if check_at.is_some() && probe.is_none() => {
                    let timeout = self.schedule.as_ref().map_or(PROBE_TIMEOUT_MIN, Schedule::timeout);
                    let (client, address) = (self.client.clone(), self.address.clone());
                    let port = self.probe_port;
                    probe = Some(Probe(tokio::spawn(async move {
                        match tokio::time::timeout(timeout, check(&client, &address, port)).await {
                            Ok(result) => result,
                            Err(_) => Err(format!("no answer within {timeout:?}")),
                        }
                    })));
                }
                result = finished(&mut probe) => {
                    probe = None;
                    let result = result.unwrap_or_else(|err| Err(format!("the check failed: {err}")));
                    match self.checked(result) {
                        Some(at) => next_check = Some(at),
                        None => return Ended::Relaunch,
                    }
                }
            }
        }
    }

    /// What follows Arti's end of the service's stream requests (it stopped the service on
    /// its own): with checks on, a relaunch, one interval later so that a service Arti stops
    /// at once is not relaunched in a loop; without, the end.
    async fn after_stop(&self) -> Ended {
        let Some(schedule) = &self.schedule else {
            return Ended::Stopped;
        };
        tokio::select! {
            () = self.sender.closed() => Ended::Stopped,
            () = tokio::time::sleep(schedule.interval) => Ended::Relaunch,
        }
    }

    /// Hands a stream for a served port to the listener, refusing any other; `false` once the
    /// listener is gone.
    async fn dispatch(&self, request: StreamRequest) -> bool {
        match requested_port(&request) {
            Some(port) if self.ports.contains(&port) => self
                .sender
                .send(OnionConnection { request, port })
                .await
                .is_ok(),
            port => {
                debug!(
                    ?port,
                    "refusing an onion stream to a port this service does not serve"
                );
                tokio::spawn(reject(request));
                true
            }
        }
    }

    /// Counts and logs a check's result; returns when to check next, or `None` to relaunch.
    fn checked(&mut self, result: Result<(), String>) -> Option<Instant> {
        let schedule = self.schedule.as_mut()?;
        let now = Instant::now();
        match result {
            Ok(()) => {
                self.health.probes_ok.fetch_add(1, Ordering::Relaxed);
                if schedule.failures() > 0 {
                    info!(onion = %self.address, "onion service reachable through Tor again");
                } else {
                    debug!("onion service self-check reached the service");
                }
                Some(schedule.succeeded(now))
            }
            Err(reason) => {
                self.health.probes_failed.fetch_add(1, Ordering::Relaxed);
                match schedule.failed(now) {
                    Verdict::CheckAt(at) => {
                        info!(
                            onion = %self.address,
                            failures = schedule.failures(),
                            %reason,
                            "onion service self-check failed: Tor clients may not reach it"
                        );
                        Some(at)
                    }
                    Verdict::Relaunch => {
                        warn!(
                            onion = %self.address,
                            failures = schedule.failures(),
                            %reason,
                            "onion service unreachable through Tor: relaunching it with new \
                             introduction points"
                        );
                        schedule.relaunched(now);
                        None
                    }
                }
            }
        }
    }

    /// Logs the service's state as it changes (published and reachable, degraded, broken,
    /// with Arti's reason), and the first time, per launch, that its descriptor is out.
    fn note_status(
        &self,
        status: &OnionServiceStatus,
        last: &mut Option<State>,
        published: &mut Option<Instant>,
    ) {
        let state = status.state();
        let problem = status.current_problem().map(|p| format!("{p:?}"));
        // Arti publishes for the current time period and for the one next to it, which needs
        // the network's shared random values; a network younger than one shared-random round
        // (a private one) has none yet, and Arti calls that "unreachable" with no problem.
        // Visitors of this period find the service all the same.
        let out = state.is_fully_reachable()
            || (state == State::DegradedUnreachable && problem.is_none());
        if out && published.is_none() {
            *published = Some(Instant::now());
            info!(
                onion = %self.address,
                "onion service published its descriptor: visitors can reach it"
            );
        }
        if *last == Some(state) {
            return;
        }
        *last = Some(state);
        let address = &self.address;
        match (state, problem) {
            (State::Running, _) => info!(onion = %address, "onion service reachable"),
            (State::DegradedReachable, problem) => {
                info!(onion = %address, ?problem, "onion service reachable, degraded");
            }
            (State::DegradedUnreachable, None) => info!(
                onion = %address,
                "onion service reachable (descriptor published for the current time period \
                 only)"
            ),
            (State::Bootstrapping, _) => debug!(onion = %address, "onion service starting"),
            (State::Recovering, problem) => {
                info!(onion = %address, ?problem, "onion service recovering");
            }
            (State::Shutdown, _) => debug!(onion = %address, "onion service stopped"),
            (state, problem) => {
                warn!(onion = %address, ?state, ?problem, "onion service unreachable");
            }
        }
    }

    /// Launches the service again with new introduction points, retrying (with backoff) until
    /// it works; `None` if the listener is dropped meanwhile.
    async fn relaunch(&mut self) -> Option<Launched> {
        self.health.relaunches.fetch_add(1, Ordering::Relaxed);
        let mut delay = self
            .schedule
            .as_ref()
            .map_or(Duration::from_secs(10), |s| s.interval);
        for attempt in 1u32.. {
            match self.forget_and_launch().await {
                Ok(service) => {
                    info!(
                        onion = %self.address,
                        "onion service relaunched: publishing a descriptor with new \
                         introduction points"
                    );
                    return Some(service);
                }
                Err(err) => warn!(
                    onion = %self.address,
                    %err,
                    attempt,
                    retry_in = ?delay,
                    "relaunching the onion service failed"
                ),
            }
            tokio::select! {
                () = self.sender.closed() => return None,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(MAX_RELAUNCH_BACKOFF);
        }
        None
    }

    /// Waits until Arti has let go of the stopped service's state, deletes its record of the
    /// introduction points, and launches the service again.
    async fn forget_and_launch(&self) -> Result<Launched, TorError> {
        let state_error = |err| TorError::OnionService(format!("the service's state: {err}"));
        let deadline = Instant::now() + RELEASE_TIMEOUT;
        loop {
            // The same lock Arti takes for the service: held until the old launch's tasks end.
            match self.state.acquire_instance(&self.nickname) {
                Ok(instance) => {
                    let mut record = instance
                        .storage_handle::<serde_json::Value>(IPT_RECORD)
                        .map_err(state_error)?;
                    // Deleting a record that is not there is an error.
                    if record.load().map_err(state_error)?.is_some() {
                        record.delete().map_err(state_error)?;
                    }
                    break;
                }
                Err(err)
                    if matches!(err.source(), tor_persist::ErrorSource::AlreadyLocked)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => return Err(state_error(err)),
            }
        }
        launch_service(&self.client, &self.nickname)
    }
}

/// A check under way; dropping it (when its launch of the service ends) stops it.
struct Probe(JoinHandle<Result<(), String>>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The result of the check in `probe`, once it has one; never, without a check.
async fn finished(probe: &mut Option<Probe>) -> Result<Result<(), String>, tokio::task::JoinError> {
    match probe {
        Some(Probe(handle)) => handle.await,
        None => std::future::pending().await,
    }
}

/// Opens a stream to `address`:`port` through `client`, on circuits of its own: `Ok` once the
/// service has answered, which it does to `port` with an `END` (`DONE`).
async fn check(client: &Tor, address: &str, port: u16) -> Result<(), String> {
    let mut prefs = StreamPrefs::new();
    prefs.connect_to_onion_services(BoolOrAuto::Explicit(true));
    // A new isolation: a new descriptor fetch, new introduction and rendezvous circuits,
    // never a descriptor cached by an earlier check.
    prefs.set_isolation(IsolationToken::new());
    match client.connect_with_prefs((address, port), &prefs).await {
        Ok(_stream) => Ok(()),
        // Only the service can have sent it, over the rendezvous circuit.
        Err(err) if err.kind() == ErrorKind::RemoteStreamClosed => Ok(()),
        Err(err) => Err(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: Duration = Duration::from_secs(120);

    #[test]
    fn three_failures_in_a_row_relaunch_and_a_success_resets_the_count() {
        let mut schedule = Schedule::new(I);
        let t0 = Instant::now();
        assert_eq!(schedule.failed(t0), Verdict::CheckAt(t0 + I / 4));
        assert_eq!(schedule.succeeded(t0), t0 + I);
        let t1 = t0 + I;
        assert_eq!(schedule.failed(t1), Verdict::CheckAt(t1 + I / 4));
        assert_eq!(schedule.failed(t1 + I / 4), Verdict::CheckAt(t1 + I / 2));
        assert_eq!(schedule.failed(t1 + I / 2), Verdict::Relaunch);
    }

    #[test]
    fn relaunches_that_do_not_help_back_off_doubling_up_to_an_hour() {
        let mut schedule = Schedule::new(I);
        let mut now = Instant::now();
        let mut relaunched_at = Vec::new();
        // Every check fails, for a day, one every I / 4.
        for _ in 0..(24 * 3600 / 30) {
            if schedule.failed(now) == Verdict::Relaunch {
                schedule.relaunched(now);
                relaunched_at.push(now);
            }
            now += I / 4;
        }
        let gaps: Vec<u64> = relaunched_at
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs())
            .collect();
        assert_eq!(&gaps[..5], &[240, 480, 960, 1920, 3600], "{gaps:?}");
        assert!(gaps[5..].iter().all(|gap| *gap == 3600), "{gaps:?}");
        // A success resets the backoff: three failures relaunch at once again.
        schedule.succeeded(now);
        assert_ne!(schedule.failed(now), Verdict::Relaunch);
        assert_ne!(schedule.failed(now), Verdict::Relaunch);
        assert_eq!(schedule.failed(now), Verdict::Relaunch);
    }

    #[test]
    fn the_first_check_comes_an_interval_after_the_descriptor_is_out() {
        let t0 = Instant::now();
        let published = t0 + Duration::from_secs(30);
        let schedule = Schedule::new(I);
        assert_eq!(schedule.first_check(t0, Some(published)), published + I);
        assert_eq!(
            schedule.first_check(t0, None),
            t0 + Duration::from_secs(600)
        );
        let two = Duration::from_secs(2);
        let short = Schedule::new(two);
        assert_eq!(short.first_check(t0, Some(published)), published + two);
        assert_eq!(short.first_check(t0, None), t0 + Duration::from_secs(60));
        assert_eq!(short.timeout(), PROBE_TIMEOUT_MIN);
        assert_eq!(schedule.timeout(), PROBE_TIMEOUT_MAX);
        // After a failure: a quarter of the interval, at least 5 s, at most the interval.
        let mut short = short;
        assert_eq!(short.failed(t0), Verdict::CheckAt(t0 + two));
        let mut ten = Schedule::new(Duration::from_secs(10));
        assert_eq!(
            ten.failed(t0),
            Verdict::CheckAt(t0 + Duration::from_secs(5))
        );
    }
}
