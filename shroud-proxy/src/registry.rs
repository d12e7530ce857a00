//! Which tunnels serve which hostnames.
//!
//! Several tunnels may bind one hostname (the same service run from two machines, or a
//! reconnect overlapping the old tunnel); new visitor connections are spread across them in
//! turn. A tunnel's bindings leave with it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use shroud_mux::Session;

/// A tunnel's identity within this proxy process.
pub type TunnelId = u64;

#[derive(Clone)]
struct Binding {
    tunnel: TunnelId,
    session: Session,
    http: bool,
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
#[derive(Default)]
pub struct Registry {
    bindings: Mutex<HashMap<String, Vec<Binding>>>,
    next_tunnel: AtomicU64,
    turn: AtomicUsize,
}

impl Registry {
    /// A fresh id for a new tunnel.
    pub fn new_tunnel_id(&self) -> TunnelId {
        self.next_tunnel.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `tunnel` as a server of `hostname`.
    pub fn bind(&self, hostname: &str, tunnel: TunnelId, session: Session, http: bool) {
        let mut bindings = self.lock();
        bindings
            .entry(hostname.to_owned())
            .or_default()
            .push(Binding {
                tunnel,
                session,
                http,
            });
    }

    /// Removes every binding of `tunnel`.
    pub fn unbind_tunnel(&self, tunnel: TunnelId) {
        let mut bindings = self.lock();
        bindings.retain(|_, list| {
            list.retain(|b| b.tunnel != tunnel);
            !list.is_empty()
        });
    }

    /// Removes one name's binding to `tunnel`, leaving its other names.
    pub fn unbind_name(&self, tunnel: TunnelId, hostname: &str) {
        let mut bindings = self.lock();
        if let Some(list) = bindings.get_mut(hostname) {
            list.retain(|b| b.tunnel != tunnel);
            if list.is_empty() {
                bindings.remove(hostname);
            }
        }
    }

    /// Chooses where a visitor for `hostname` goes. `http` is true for plain-HTTP visitors,
    /// which only tunnels that serve HTTP may take.
    pub fn route(&self, hostname: &str, http: bool) -> Route {
        let bindings = self.lock();
        let Some(list) = bindings.get(hostname) else {
            return Route::Unknown;
        };
        let live: Vec<&Binding> = list
            .iter()
            .filter(|b| !b.session.is_closed() && (b.http || !http))
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

    /// How many hostnames have at least one binding.
    pub fn hostname_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Binding>>> {
        // A panic while holding this lock cannot leave the map inconsistent (every update is a
        // single insert or retain), so a poisoned lock is still safe to use.
        self.bindings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
