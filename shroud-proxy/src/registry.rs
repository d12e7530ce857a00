//! Which tunnels serve which hostnames.
//!
//! Several tunnels may bind one hostname (the same service run from two machines, or a
//! reconnect overlapping the old tunnel); new visitor connections are spread across them in
//! turn. A tunnel's bindings leave with it.
//!
//! A draining tunnel (the proxy is shutting down and has sent go-away) stays routable until it
//! closes, but only as a last resort: a visitor that arrived before the drain began and is
//! routed during it still reaches the service.
//!
//! A name with no tunnel is often about to have one again: the proxy has just restarted and
//! its clients are reconnecting, or a client lost its tunnel and is coming back. For such names
//! [`Registry::route_or_wait`] holds the visitor until a tunnel binds or the wait runs out,
//! instead of refusing at once; names never seen recently are refused without waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use shroud_mux::Session;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Hostnames;

/// For this long after the proxy starts, any name may be about to be bound again: visitors
/// for unbound names wait for a tunnel.
pub const STARTUP_GRACE: Duration = Duration::from_secs(60);
/// For this long after a name loses its last tunnel, visitors for it wait for a new one.
pub const RECENT_GRACE: Duration = Duration::from_secs(60);
/// Most names remembered as recently unbound; beyond this, the oldest are forgotten.
const MAX_RECENT: usize = 10_000;

/// A tunnel's identity within this proxy process.
pub type TunnelId = u64;

#[derive(Clone)]
struct Binding {
    tunnel: TunnelId,
    session: Session,
    http: bool,
    draining: bool,
}

/// Where a visitor connection should go.
pub enum Route {
    /// Open a stream on this session.
    Tunnel(Session),
    /// Bound, but no tunnel serves plain HTTP for the name: redirect to HTTPS.
    RedirectToHttps,
    /// No tunnel serves the name.
    Unknown,
}

/// The live bindings of a proxy.
pub struct Registry {
    state: Mutex<State>,
    /// Bumped on every bind, so waiting visitors look again.
    bound: watch::Sender<u64>,
    /// Bumped whenever the set of [`Registry::bound_names`] may have changed.
    names: watch::Sender<u64>,
    started: Instant,
    next_tunnel: AtomicU64,
    turn: AtomicUsize,
    /// The per-hostname metrics, told under the lock when a name gains its first tunnel and
    /// loses its last, so that the two never cross.
    hostnames: Hostnames,
}

#[derive(Default)]
struct State {
    bindings: HashMap<String, Vec<Binding>>,
    /// Names whose last tunnel left, and when.
    recently_unbound: HashMap<String, Instant>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::with_hostnames(Hostnames::new(crate::metrics::HOSTNAME_SERIES))
    }
}

impl Registry {
    /// An empty registry that keeps `hostnames` in step with the names bound.
    pub fn with_hostnames(hostnames: Hostnames) -> Self {
        Self {
            state: Mutex::default(),
            bound: watch::Sender::new(0),
            names: watch::Sender::new(0),
            started: Instant::now(),
            next_tunnel: AtomicU64::new(0),
            turn: AtomicUsize::new(0),
            hostnames,
        }
    }

    /// A fresh id for a new tunnel.
    pub fn new_tunnel_id(&self) -> TunnelId {
        self.next_tunnel.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `tunnel` as a server of `hostname`.
    pub fn bind(&self, hostname: &str, tunnel: TunnelId, session: Session, http: bool) {
        let mut state = self.lock();
        state.recently_unbound.remove(hostname);
        if !state.bindings.contains_key(hostname) {
            self.hostnames.bound(hostname);
        }
        state
            .bindings
            .entry(hostname.to_owned())
            .or_default()
            .push(Binding {
                tunnel,
                session,
                http,
                draining: false,
            });
        drop(state);
        self.bound.send_modify(|generation| *generation += 1);
        self.names_changed();
    }

    /// Tells whoever watches [`Registry::watch_names`] to look again.
    fn names_changed(&self) {
        self.names.send_modify(|generation| *generation += 1);
    }

    /// A receiver that sees a change whenever the set of [`Registry::bound_names`] may have
    /// changed: a bind, an unbind, a tunnel starting to drain.
    pub fn watch_names(&self) -> watch::Receiver<u64> {
        self.names.subscribe()
    }

    /// Marks every binding of `tunnel` as draining: routable only when no other tunnel is.
    pub fn mark_draining(&self, tunnel: TunnelId) {
        let mut state = self.lock();
        for binding in state.bindings.values_mut().flatten() {
            if binding.tunnel == tunnel {
                binding.draining = true;
            }
        }
        drop(state);
        self.names_changed();
    }

    /// Removes every binding of `tunnel`.
    pub fn unbind_tunnel(&self, tunnel: TunnelId) {
        let mut state = self.lock();
        let mut emptied = Vec::new();
        state.bindings.retain(|name, list| {
            let before = list.len();
            list.retain(|b| b.tunnel != tunnel);
            if list.is_empty() && before > 0 {
                emptied.push(name.clone());
            }
            !list.is_empty()
        });
        for name in emptied {
            self.hostnames.unbound(&name);
            state.remember_unbound(name);
        }
        drop(state);
        self.names_changed();
    }

    /// Removes one name's binding to `tunnel`, leaving its other names. The name was taken
    /// away (its authorization withdrawn), so visitors for it are not held waiting for it.
    pub fn unbind_name(&self, tunnel: TunnelId, hostname: &str) {
        let mut state = self.lock();
        if let Some(list) = state.bindings.get_mut(hostname) {
            list.retain(|b| b.tunnel != tunnel);
            if list.is_empty() {
                state.bindings.remove(hostname);
                self.hostnames.unbound(hostname);
            }
        }
        drop(state);
        self.names_changed();
    }

    /// Chooses where a visitor for `hostname` goes. `http` is true for plain-HTTP visitors,
    /// which only tunnels that serve HTTP may take.
    pub fn route(&self, hostname: &str, http: bool) -> Route {
        let state = self.lock();
        let Some(list) = state.bindings.get(hostname) else {
            return Route::Unknown;
        };
        // Of the tunnels that are open and may take this visitor, the best ranked, by (most
        // important first): not draining; responsive (an unresponsive one lately failed to
        // acknowledge a stream: its client may be dead while its connection lingers, as a
        // Tor circuit can); not full (a full one refuses the visitor, clearly).
        let rank = |b: &Binding| (b.draining, b.session.is_unresponsive(), b.session.is_full());
        let usable: Vec<&Binding> = list
            .iter()
            .filter(|b| !b.session.is_closed() && (b.http || !http))
            .collect();
        let best = usable.iter().map(|b| rank(b)).min();
        let live: Vec<&Binding> = usable
            .into_iter()
            .filter(|b| Some(rank(b)) == best)
            .collect();
        if live.is_empty() {
            return if http && list.iter().any(|b| !b.session.is_closed()) {
                Route::RedirectToHttps
            } else {
                Route::Unknown
            };
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        Route::Tunnel(live[turn % live.len()].session.clone())
    }

    /// Whether a tunnel other than `session` could take a visitor for `hostname` now.
    pub fn has_alternative(&self, hostname: &str, http: bool, session: &Session) -> bool {
        let state = self.lock();
        state.bindings.get(hostname).is_some_and(|list| {
            list.iter().any(|b| {
                !b.session.same_session(session)
                    && !b.session.is_closed()
                    && !b.session.is_unresponsive()
                    && (b.http || !http)
            })
        })
    }

    /// Like [`Registry::route`], but a name that is likely to be bound again soon (see the
    /// module documentation) is waited for, up to `wait`, instead of being refused at once.
    /// `bindable` says whether any client may bind the name here at all: just after startup,
    /// only such names are waited for.
    pub async fn route_or_wait(
        &self,
        hostname: &str,
        http: bool,
        wait: Duration,
        bindable: bool,
    ) -> Route {
        let deadline = Instant::now() + wait;
        // Subscribe before looking, so a bind between the look and the wait is not missed.
        let mut bound = self.bound.subscribe();
        loop {
            let route = self.route(hostname, http);
            if !matches!(route, Route::Unknown) || !self.expects(hostname, bindable) {
                return route;
            }
            match tokio::time::timeout_at(deadline, bound.changed()).await {
                Ok(Ok(())) => {}
                // The deadline passed, or the registry is gone: one last look.
                Ok(Err(_)) | Err(_) => return self.route(hostname, http),
            }
        }
    }

    /// Whether `hostname` may be bound again soon: the proxy has just started (and the name is
    /// `bindable`), or the name's last tunnel left a moment ago.
    fn expects(&self, hostname: &str, bindable: bool) -> bool {
        if bindable && self.started.elapsed() < STARTUP_GRACE {
            return true;
        }
        let state = self.lock();
        state
            .recently_unbound
            .get(hostname)
            .is_some_and(|at| at.elapsed() < RECENT_GRACE)
    }

    /// The hostnames a visitor can reach here now: those with a tunnel that is open and not
    /// draining, in name order.
    pub fn bound_names(&self) -> Vec<String> {
        let state = self.lock();
        let mut names: Vec<String> = state
            .bindings
            .iter()
            .filter(|(_, list)| list.iter().any(|b| !b.draining && !b.session.is_closed()))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// How many hostnames have at least one binding.
    pub fn hostname_count(&self) -> usize {
        self.lock().bindings.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps inconsistent (every update is a
        // single insert, remove or retain), so a poisoned lock is still safe to use.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    fn remember_unbound(&mut self, name: String) {
        if self.recently_unbound.len() >= MAX_RECENT {
            self.recently_unbound
                .retain(|_, at| at.elapsed() < RECENT_GRACE);
        }
        if self.recently_unbound.len() < MAX_RECENT {
            self.recently_unbound.insert(name, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use shroud_mux::{Role, SessionConfig};

    use super::*;

    /// A session over an in-memory pipe; the far end is returned so it stays open.
    fn session() -> (Session, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(1024);
        let (session, _incoming) = Session::spawn(near, Role::Proxy, SessionConfig::default());
        (session, far)
    }

    fn routes_to(route: Route, session: &Session) -> bool {
        matches!(route, Route::Tunnel(s) if s.same_session(session))
    }

    #[tokio::test]
    async fn a_draining_tunnel_is_used_only_when_no_other_is() {
        let registry = Registry::default();
        let (old, _far_old) = session();
        let (new, _far_new) = session();
        registry.bind("a.test", 1, old.clone(), false);
        registry.mark_draining(1);
        assert!(routes_to(registry.route("a.test", false), &old));
        registry.bind("a.test", 2, new.clone(), false);
        for _ in 0..4 {
            assert!(routes_to(registry.route("a.test", false), &new));
        }
        registry.unbind_tunnel(2);
        assert!(routes_to(registry.route("a.test", false), &old));
    }

    #[tokio::test]
    async fn a_full_tunnel_is_passed_over_while_another_has_room() {
        let registry = Registry::default();
        let config = SessionConfig {
            max_streams: 1,
            ..SessionConfig::default()
        };
        let (near, _far) = tokio::io::duplex(1024);
        let (full, _incoming) = Session::spawn(near, Role::Proxy, config);
        let (roomy, _far_roomy) = session();
        registry.bind("a.test", 1, full.clone(), false);
        registry.bind("a.test", 2, roomy.clone(), false);
        let _stream = full.open().await.unwrap();
        assert!(full.is_full());
        for _ in 0..4 {
            assert!(routes_to(registry.route("a.test", false), &roomy));
        }
        // With no other choice, the full one is named: opening on it refuses the visitor.
        registry.unbind_tunnel(2);
        assert!(routes_to(registry.route("a.test", false), &full));
    }

    #[tokio::test]
    async fn an_unresponsive_tunnel_is_avoided_until_it_answers_again() {
        let registry = Registry::default();
        let (dead, _far_dead) = session();
        let (alive, _far_alive) = session();
        registry.bind("a.test", 1, dead.clone(), false);
        registry.bind("a.test", 2, alive.clone(), false);
        assert!(registry.has_alternative("a.test", false, &dead));
        dead.set_unresponsive(true);
        assert!(!registry.has_alternative("a.test", false, &alive));
        for _ in 0..4 {
            assert!(routes_to(registry.route("a.test", false), &alive));
        }
        dead.set_unresponsive(false);
        let picks: Vec<bool> = (0..4)
            .map(|_| routes_to(registry.route("a.test", false), &dead))
            .collect();
        assert_eq!(picks.iter().filter(|&&d| d).count(), 2, "{picks:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_restart_visitors_wait_for_the_tunnel_to_come_back() {
        let registry = Arc::new(Registry::default());
        let (session, _far) = session();
        let waiting = {
            let registry = registry.clone();
            tokio::spawn(async move {
                registry
                    .route_or_wait("a.test", false, Duration::from_secs(10), true)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        registry.bind("a.test", 1, session.clone(), false);
        let route = waiting.await.unwrap();
        assert!(routes_to(route, &session));
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_is_bounded_and_only_for_names_expected_back() {
        let registry = Registry::default();
        let started = Instant::now();
        let route = registry
            .route_or_wait("never.test", false, Duration::from_secs(10), true)
            .await;
        assert!(matches!(route, Route::Unknown));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // Names nobody may bind here are never waited for.
        let started = Instant::now();
        let route = registry
            .route_or_wait("stranger.test", false, Duration::from_secs(10), false)
            .await;
        assert!(matches!(route, Route::Unknown));
        assert_eq!(started.elapsed(), Duration::ZERO);

        tokio::time::advance(STARTUP_GRACE).await;
        let (session, _far) = session();
        registry.bind("gone.test", 1, session, false);
        registry.unbind_tunnel(1);

        // Long after startup, a name never bound here is refused at once...
        let started = Instant::now();
        let route = registry
            .route_or_wait("never.test", false, Duration::from_secs(10), true)
            .await;
        assert!(matches!(route, Route::Unknown));
        assert_eq!(started.elapsed(), Duration::ZERO);
        // ...a name that just lost its tunnel is waited for...
        let started = Instant::now();
        let route = registry
            .route_or_wait("gone.test", false, Duration::from_secs(10), true)
            .await;
        assert!(matches!(route, Route::Unknown));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // ...but not forever after.
        tokio::time::advance(RECENT_GRACE).await;
        let started = Instant::now();
        let route = registry
            .route_or_wait("gone.test", false, Duration::from_secs(10), true)
            .await;
        assert!(matches!(route, Route::Unknown));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
