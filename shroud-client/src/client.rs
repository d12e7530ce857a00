//! The client as a whole: one tunnel task per proxy, kept in step with where the list of
//! proxies comes from, and what the tunnels report.
//!
//! A fixed list (`--proxy`) starts its tunnels once. A list from discovery or DNS SRV is asked
//! for again before it goes stale; tunnels to proxies that joined are opened, and tunnels to
//! proxies that left are closed.
//!
//! Every tunnel charges its new Tor circuits to one [`CircuitBudget`]. With a list from
//! discovery or DNS SRV, a proxy whose own share of it is spent (its circuits keep failing,
//! or it makes them look as if they did) is reported as churning and left for the next proxy
//! of the list that is not, at once and at each refresh, for as long as its share stays spent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument as _};

use crate::backoff::Backoff;
use crate::circuits::CircuitBudget;
use crate::fleet::{Fleet, FleetError, FleetSource, ProxySource};
use crate::shared::{ClientConfig, ProxyAddr, StateReporter, States, StreamTasks, TunnelState};
use crate::tunnel;

/// Why a client stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No proxy was given.
    #[error("no proxy to connect to")]
    NoProxies,
    /// Every proxy refused in a way that retrying cannot change.
    #[error("no tunnel can succeed: {}", .0.join("; "))]
    AllFailed(Vec<String>),
    /// The list of proxies could not be had, and asking again cannot help.
    #[error("no list of proxies: {0}")]
    Fleet(FleetError),
}

/// A running client: its tunnels' states, and the task that ends when it stops.
pub struct Client {
    states: watch::Receiver<States>,
    task: JoinHandle<Result<(), ClientError>>,
    retry: RetryRefused,
}

/// Tells every tunnel that waits after a refusal by its proxy's policy to ask again now,
/// instead of at the end of its wait: what SIGHUP does to a client.
#[derive(Debug, Clone)]
pub struct RetryRefused(Arc<watch::Sender<u64>>);

impl RetryRefused {
    pub(crate) fn new() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }

    /// Asks every waiting tunnel to try its proxy again now.
    pub fn now(&self) {
        self.0.send_modify(|asked| *asked += 1);
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

impl Client {
    /// Starts the client on the current runtime, holding tunnels to the proxies `source`
    /// names. It runs until `shutdown` is cancelled, until every proxy of a fixed list has
    /// refused for good, or until its list of proxies cannot be had at all.
    pub fn spawn(
        config: impl Into<Arc<ClientConfig>>,
        source: ProxySource,
        shutdown: CancellationToken,
    ) -> Result<Client, ClientError> {
        if matches!(&source, ProxySource::Static(list) if list.is_empty()) {
            return Err(ClientError::NoProxies);
        }
        let (states_tx, states) = watch::channel(States::new());
        let retry = RetryRefused::new();
        let task = tokio::spawn(supervise(
            config.into(),
            source,
            states_tx,
            shutdown,
            retry.clone(),
        ));
        Ok(Client {
            states,
            task,
            retry,
        })
    }

    /// What tells the tunnels that wait after a policy refusal to ask again now.
    pub fn retry_refused(&self) -> RetryRefused {
        self.retry.clone()
    }

    /// The current state of each tunnel.
    pub fn states(&self) -> Vec<(ProxyAddr, TunnelState)> {
        self.states
            .borrow()
            .iter()
            .map(|(proxy, state)| (proxy.clone(), state.clone()))
            .collect()
    }

    /// A receiver of every tunnel's state, which changes as they do.
    pub fn watch_states(&self) -> watch::Receiver<States> {
        self.states.clone()
    }

    /// Waits until at least `count` tunnels are bound.
    pub async fn wait_bound(&mut self, count: usize) {
        let _ = self
            .states
            .wait_for(|states| {
                states
                    .values()
                    .filter(|s| **s == TunnelState::Bound)
                    .count()
                    >= count
            })
            .await;
    }

    /// Waits until the tunnel to the `index`-th proxy (in name order) reaches a state that
    /// `pred` accepts.
    pub async fn wait_for(&mut self, index: usize, pred: impl Fn(&TunnelState) -> bool) {
        let _ = self
            .states
            .wait_for(|states| states.values().nth(index).is_some_and(&pred))
            .await;
    }

    /// Waits until the set of proxies with a tunnel (in any state) satisfies `pred`.
    pub async fn wait_for_proxies(&mut self, pred: impl Fn(&[ProxyAddr]) -> bool) {
        let _ = self
            .states
            .wait_for(|states| pred(&states.keys().cloned().collect::<Vec<_>>()))
            .await;
    }

    /// Waits for the client to stop, and says why it did.
    pub async fn join(self) -> Result<(), ClientError> {
        match self.task.await {
            Ok(result) => result,
            Err(err) => Err(ClientError::AllFailed(vec![format!("client task: {err}")])),
        }
    }
}

struct Running {
    stop: CancellationToken,
    retired: Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<Option<String>>,
}

/// The tunnels of a client, kept in step with a list of proxies.
struct Tunnels {
    config: Arc<ClientConfig>,
    states: watch::Sender<States>,
    shutdown: CancellationToken,
    streams: TaskTracker,
    running: HashMap<ProxyAddr, Running>,
    retry: RetryRefused,
    circuits: Arc<CircuitBudget>,
}

impl Tunnels {
    /// Opens tunnels to proxies that joined and closes those to proxies that left.
    fn reconcile(&mut self, wanted: &[ProxyAddr]) {
        let gone: Vec<ProxyAddr> = self
            .running
            .keys()
            .filter(|p| !wanted.contains(p))
            .cloned()
            .collect();
        for proxy in gone {
            if let Some(running) = self.running.remove(&proxy) {
                info!(proxy = %proxy, "proxy left the list; closing its tunnel");
                running.stop.cancel();
                // Under the map's lock, so no report of the tunnel can land after the removal.
                self.states.send_modify(|states| {
                    running
                        .retired
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    states.remove(&proxy);
                });
            }
        }
        self.circuits.forget_idle_except(wanted);
        for proxy in wanted {
            if self.running.contains_key(proxy) {
                continue;
            }
            let stop = self.shutdown.child_token();
            let (reporter, retired) = StateReporter::new(self.states.clone(), proxy.clone());
            reporter.send_replace(TunnelState::Connecting);
            let span = tracing::info_span!("tunnel", proxy = %proxy);
            let tasks = StreamTasks {
                tracker: self.streams.clone(),
                shutdown: self.shutdown.clone(),
            };
            let task = tokio::spawn(
                tunnel::hold(
                    proxy.clone(),
                    self.config.clone(),
                    reporter,
                    stop.clone(),
                    tasks,
                    self.retry.subscribe(),
                    self.circuits.clone(),
                )
                .instrument(span),
            );
            self.running.insert(
                proxy.clone(),
                Running {
                    stop,
                    retired,
                    task,
                },
            );
        }
    }

    /// Waits for every tunnel task to end; returns the reasons of those that gave up.
    async fn join_all(&mut self) -> Vec<String> {
        let mut failures = Vec::new();
        let mut running: Vec<_> = self.running.drain().collect();
        running.sort_by(|a, b| a.0.cmp(&b.0));
        for (proxy, tunnel) in running {
            if let Ok(Some(reason)) = tunnel.task.await {
                failures.push(format!("{proxy}: {reason}"));
            }
        }
        failures
    }
}

async fn supervise(
    config: Arc<ClientConfig>,
    source: ProxySource,
    states: watch::Sender<States>,
    shutdown: CancellationToken,
    retry: RetryRefused,
) -> Result<(), ClientError> {
    let mut tunnels = Tunnels {
        config: config.clone(),
        states,
        shutdown: shutdown.clone(),
        streams: TaskTracker::new(),
        running: HashMap::new(),
        retry,
        circuits: Arc::new(CircuitBudget::new(
            config.timing.circuits_per_proxy,
            config.timing.circuits_total,
        )),
    };
    if config.transport.circuit().is_some() {
        config.metrics.count_circuits(tunnels.circuits.clone());
    }
    let result = match source {
        ProxySource::Static(list) => {
            info!(
                hostname = %config.hostname,
                proxies = list.len(),
                transport = config.transport.name(),
                "client started"
            );
            tunnels.reconcile(&list);
            let failures = tunnels.join_all().await;
            if !list.is_empty() && failures.len() == list.len() {
                Err(ClientError::AllFailed(failures))
            } else {
                Ok(())
            }
        }
        ProxySource::Dynamic(source) => follow(source, &mut tunnels, &config, &shutdown).await,
    };
    shutdown.cancel();
    tunnels.join_all().await;
    tunnels.streams.close();
    // Visitor streams end with their sessions; this wait is short.
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnels.streams.wait()).await;
    result
}

/// Keeps the tunnels in step with a changing list until shutdown.
async fn follow(
    mut source: Box<dyn FleetSource>,
    tunnels: &mut Tunnels,
    config: &ClientConfig,
    shutdown: &CancellationToken,
) -> Result<(), ClientError> {
    info!(
        hostname = %config.hostname,
        source = %source.describe(),
        transport = config.transport.name(),
        "client started"
    );
    let timing = &config.timing;
    let mut backoff = Backoff::new(timing.backoff_base, timing.backoff_cap, timing.stable_after);
    let mut have_list = false;
    let mut last: Option<Fleet> = None;
    let mut churning = tunnels.circuits.watch_churning();
    loop {
        let fetched = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            fetched = source.fetch(config.transport.as_ref()) => fetched,
        };
        let wait = match fetched {
            Ok(fleet) => {
                have_list = true;
                backoff =
                    Backoff::new(timing.backoff_base, timing.backoff_cap, timing.stable_after);
                let names: Vec<String> = fleet.proxies.iter().map(ToString::to_string).collect();
                info!(proxies = ?names, spares = fleet.spares.len(), "list of proxies");
                tunnels.reconcile(&choose(&fleet, &tunnels.circuits));
                let refresh = fleet.refresh_after;
                last = Some(fleet);
                refresh
            }
            Err(err) if err.permanent && !have_list => return Err(ClientError::Fleet(err)),
            Err(err) => {
                // Keep the tunnels we have: they are still good connections.
                warn!(%err, "could not refresh the list of proxies; keeping the current tunnels");
                backoff.next_delay()
            }
        };
        let refresh = tokio::time::sleep(wait);
        tokio::pin!(refresh);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = &mut refresh => break,
                // A proxy's share was found spent: hold a tunnel to a spare instead, now.
                Ok(()) = churning.changed() => {
                    if let Some(fleet) = &last {
                        tunnels.reconcile(&choose(fleet, &tunnels.circuits));
                    }
                }
            }
        }
    }
}

/// The proxies of `fleet` to hold tunnels to: as many as it lists to hold, skipping those
/// whose share of the circuit budget is spent for the first spares that are not. A churning
/// proxy is kept only when too few others are left.
fn choose(fleet: &Fleet, circuits: &CircuitBudget) -> Vec<ProxyAddr> {
    let hold = fleet.proxies.len();
    let mut chosen: Vec<ProxyAddr> = fleet
        .proxies
        .iter()
        .chain(&fleet.spares)
        .filter(|proxy| !circuits.churning(proxy))
        .take(hold)
        .cloned()
        .collect();
    for proxy in &fleet.proxies {
        if chosen.contains(proxy) {
            continue;
        }
        if chosen.len() < hold {
            chosen.push(proxy.clone());
        } else {
            warn!(
                proxy = %proxy,
                "this proxy's tunnel keeps needing new Tor circuits (its share of the circuit \
                 budget is spent): holding a tunnel to another proxy of the list instead"
            );
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn proxies(names: &[&str]) -> Vec<ProxyAddr> {
        names
            .iter()
            .map(|name| ProxyAddr::new((*name).to_owned(), 443))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_churning_proxy_is_replaced_by_the_first_spare_that_is_not() {
        let circuits = CircuitBudget::new(1, 100);
        let fleet = Fleet {
            proxies: proxies(&["a", "b"]),
            spares: proxies(&["c", "d"]),
            refresh_after: Duration::from_secs(60),
        };
        assert_eq!(choose(&fleet, &circuits), proxies(&["a", "b"]));
        // a's share spent, and c's: d stands in for a.
        for name in ["a", "c"] {
            let proxy = ProxyAddr::new(name.to_owned(), 443);
            circuits.charge(&proxy).unwrap();
            assert!(circuits.charge(&proxy).is_err());
        }
        assert_eq!(choose(&fleet, &circuits), proxies(&["b", "d"]));
        // With no spare left, the churning proxy is kept rather than hold fewer tunnels.
        let short = Fleet {
            spares: proxies(&["c"]),
            ..fleet.clone()
        };
        assert_eq!(choose(&short, &circuits), proxies(&["b", "a"]));
        // An hour on, a is back.
        tokio::time::advance(crate::circuits::WINDOW).await;
        assert_eq!(choose(&fleet, &circuits), proxies(&["a", "b"]));
    }
}
