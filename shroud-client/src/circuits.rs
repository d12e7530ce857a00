//! The churn budget: how many new Tor circuits the client may build for its tunnels.
//!
//! A proxy sees every tunnel arrive from a Tor exit and can end it whenever it likes. If each
//! reconnect built a new circuit, a proxy that drops its tunnel once a minute would make the
//! client pick about 60 new middle relays an hour; an adversary who also runs middle relays
//! would soon sit next to the client's guard and learn it (guard discovery). So a tunnel keeps
//! its circuit across reconnects for as long as the circuit works (see [`crate::tor`]), and
//! every new circuit is charged here first: at most `per_proxy` in any hour for one proxy's
//! tunnel, and `total` in any hour for all of them together.
//!
//! Each limit is paced, not only counted: the first half of it (rounded up) may go at once,
//! and each charge after that comes at least an hour divided by the limit after the one
//! before (10 minutes for the default 6). A burst of failures (Tor unreachable for half a
//! minute, a proxy restarting) would otherwise spend an hour's share in seconds, the backoff
//! being seconds, and leave the tunnel waiting up to an hour after the cause had gone; paced,
//! it tries again within one interval, and after failures that last the better part of an
//! hour, within half an hour. A tunnel whose charge is refused waits until the charge
//! would be allowed; the other tunnels carry on. With a changing
//! list of proxies (discovery, DNS SRV) a proxy whose own share is spent is "churning", and
//! the client holds a tunnel to another proxy of the list instead while it is (see
//! [`crate::client`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::shared::ProxyAddr;

/// New circuits one proxy's tunnel may cost in any hour, unless told otherwise.
pub const DEFAULT_PER_PROXY: u32 = 6;
/// New circuits all tunnels together may cost in any hour, unless told otherwise.
pub const DEFAULT_TOTAL: u32 = 24;
/// The window the limits count over.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// Which limit refused a new circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The proxy's own share (`--max-circuits-per-proxy-per-hour`).
    PerProxy,
    /// The share of all tunnels together (`--max-circuits-per-hour`).
    Total,
}

/// A new circuit refused: which limit, and when one may be had again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    /// The limit that is spent.
    pub limit: Limit,
    /// How many circuits that limit allows in an hour.
    pub allowed: u32,
    /// How many it charged in the last hour.
    pub charged: u32,
    /// When the next charge against that limit is allowed: the oldest leaves the window, or
    /// the pacing interval after the last has passed.
    pub until: Instant,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.limit {
            Limit::PerProxy => write!(
                f,
                "this proxy's tunnel already needed {} new Tor circuits in the last hour, of \
                 {} allowed and paced over the hour (--max-circuits-per-proxy-per-hour)",
                self.charged, self.allowed
            ),
            Limit::Total => write!(
                f,
                "the tunnels already needed {} new Tor circuits in the last hour, of {} \
                 allowed and paced over the hour (--max-circuits-per-hour)",
                self.charged, self.allowed
            ),
        }
    }
}

/// What one proxy's tunnel has cost.
#[derive(Debug, Default)]
struct ProxyRecord {
    /// When each circuit charged in the window was.
    recent: VecDeque<Instant>,
    /// Circuits charged since the client started.
    built: u64,
    /// Times its tunnel had to wait for the budget.
    waits: u64,
}

#[derive(Debug, Default)]
struct Inner {
    all: VecDeque<Instant>,
    proxies: BTreeMap<ProxyAddr, ProxyRecord>,
}

/// One proxy's counts, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyCounts {
    /// The proxy, as `NAME:PORT`.
    pub proxy: String,
    /// New circuits built for its tunnel since the client started.
    pub built: u64,
    /// Times its tunnel waited because a limit was spent.
    pub waits: u64,
}

/// The churn budget of one client; see the [module docs](self).
#[derive(Debug)]
pub struct CircuitBudget {
    per_proxy: u32,
    total: u32,
    inner: Mutex<Inner>,
    /// Bumped whenever a proxy's own share is found spent, for the supervisor to choose
    /// another proxy.
    churning: watch::Sender<u64>,
}

impl Default for CircuitBudget {
    fn default() -> Self {
        Self::new(DEFAULT_PER_PROXY, DEFAULT_TOTAL)
    }
}

impl CircuitBudget {
    /// A budget of `per_proxy` new circuits an hour for each proxy's tunnel and `total` for
    /// all together (each at least 1).
    pub fn new(per_proxy: u32, total: u32) -> Self {
        Self {
            per_proxy: per_proxy.max(1),
            total: total.max(1),
            inner: Mutex::new(Inner::default()),
            churning: watch::Sender::new(0),
        }
    }

    /// The limits: per proxy, and in all, per hour.
    pub fn limits(&self) -> (u32, u32) {
        (self.per_proxy, self.total)
    }

    /// Charges one new circuit to `proxy`'s tunnel, now, if both limits allow it.
    ///
    /// # Errors
    /// [`Exhausted`] says which limit is spent and when it frees; nothing is charged. A
    /// refusal by the proxy's own limit also counts as a wait and tells
    /// [`CircuitBudget::watch_churning`]'s receivers.
    pub fn charge(&self, proxy: &ProxyAddr) -> Result<(), Exhausted> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Inner { all, proxies } = &mut *inner;
        expire(all, now);
        let record = proxies.entry(proxy.clone()).or_default();
        expire(&mut record.recent, now);
        let refused = next_allowed(&record.recent, self.per_proxy, now)
            .map(|until| (Limit::PerProxy, self.per_proxy, record.recent.len(), until))
            .or_else(|| {
                next_allowed(all, self.total, now)
                    .map(|until| (Limit::Total, self.total, all.len(), until))
            });
        if let Some((limit, allowed, charged, until)) = refused {
            record.waits += 1;
            drop(inner);
            if limit == Limit::PerProxy {
                self.churning.send_modify(|n| *n += 1);
            }
            return Err(Exhausted {
                limit,
                allowed,
                charged: u32::try_from(charged).unwrap_or(u32::MAX),
                until,
            });
        }
        record.recent.push_back(now);
        record.built += 1;
        all.push_back(now);
        Ok(())
    }

    /// Whether `proxy`'s own share for the hour is spent: the next new circuit for its tunnel
    /// would be refused.
    pub fn churning(&self, proxy: &ProxyAddr) -> bool {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.proxies.get_mut(proxy).is_some_and(|record| {
            expire(&mut record.recent, now);
            next_allowed(&record.recent, self.per_proxy, now).is_some()
        })
    }

    /// A receiver that sees a change each time a proxy's own share is found spent.
    pub fn watch_churning(&self) -> watch::Receiver<u64> {
        self.churning.subscribe()
    }

    /// Forgets the proxies other than `held` that have nothing left in the window: their
    /// tunnels are gone, and their series leave the metrics. One with charges in the window is
    /// kept, so a proxy that leaves the list and comes back finds its share as it left it.
    pub fn forget_idle_except(&self, held: &[ProxyAddr]) {
        let now = Instant::now();
        self.lock().proxies.retain(|proxy, record| {
            expire(&mut record.recent, now);
            held.contains(proxy) || !record.recent.is_empty()
        });
    }

    /// Each proxy's counts, in name order.
    pub fn counts(&self) -> Vec<ProxyCounts> {
        self.lock()
            .proxies
            .iter()
            .map(|(proxy, record)| ProxyCounts {
                proxy: proxy.to_string(),
                built: record.built,
                waits: record.waits,
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// When the next charge against a limit of `allowed` an hour with `charges` in the window
/// (expired ones dropped) may be made, if not now: once the oldest leaves the window when all
/// are spent, else, past the first half, an hour divided by `allowed` after the last.
fn next_allowed(charges: &VecDeque<Instant>, allowed: u32, now: Instant) -> Option<Instant> {
    let (Some(oldest), Some(last)) = (charges.front(), charges.back()) else {
        return None;
    };
    let allowed_now = allowed as usize;
    if charges.len() >= allowed_now {
        return Some(*oldest + WINDOW);
    }
    let burst = allowed_now.div_ceil(2);
    let paced = *last + WINDOW / allowed;
    (charges.len() >= burst && now < paced).then_some(paced)
}

/// Drops the charges that have left the window.
fn expire(charges: &mut VecDeque<Instant>, now: Instant) {
    while charges
        .front()
        .is_some_and(|at| now.saturating_duration_since(*at) >= WINDOW)
    {
        charges.pop_front();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn proxy(name: &str) -> ProxyAddr {
        ProxyAddr::new(name.to_owned(), 443)
    }

    #[tokio::test(start_paused = true)]
    async fn a_proxys_share_is_spent_then_frees_an_hour_after_each_charge() {
        let budget = CircuitBudget::new(2, 10);
        let p = proxy("p.example");
        let start = Instant::now();
        budget.charge(&p).unwrap();
        // The second of two is paced: half an hour after the first.
        tokio::time::advance(Duration::from_secs(600)).await;
        let err = budget.charge(&p).unwrap_err();
        assert_eq!(err.until, start + WINDOW / 2);
        tokio::time::advance(Duration::from_secs(1200)).await;
        budget.charge(&p).unwrap();
        assert!(budget.churning(&p));
        let err = budget.charge(&p).unwrap_err();
        assert_eq!(
            (err.limit, err.allowed, err.charged),
            (Limit::PerProxy, 2, 2)
        );
        assert_eq!(err.until, start + WINDOW);
        assert!(err
            .to_string()
            .contains("--max-circuits-per-proxy-per-hour"));
        // Just before the first charge leaves the window: still spent.
        tokio::time::advance(WINDOW / 2 - Duration::from_secs(1)).await;
        assert!(budget.charge(&p).is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!budget.churning(&p));
        budget.charge(&p).unwrap();
        assert!(budget.charge(&p).is_err());
        let counts = budget.counts();
        assert_eq!(
            counts,
            vec![ProxyCounts {
                proxy: "p.example:443".into(),
                built: 3,
                waits: 4,
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_failures_spends_half_the_share_and_the_rest_comes_paced() {
        // A tunnel that fails every second for two hours, as it would with Tor unreachable:
        // never more than 6 new circuits in any hour, 3 at once, then one every 10 minutes,
        // so after a short outage it waits 10 minutes at the most once the cause has gone.
        let budget = CircuitBudget::default();
        let p = proxy("p.example");
        let start = Instant::now();
        let mut charged = Vec::new();
        for _ in 0..7200 {
            if budget.charge(&p).is_ok() {
                charged.push(Instant::now() - start);
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let secs: Vec<u64> = charged.iter().map(Duration::as_secs).collect();
        assert_eq!(&secs[..6], [0, 1, 2, 602, 1202, 1802], "{secs:?}");
        for (i, at) in charged.iter().enumerate() {
            let in_hour = charged[i..]
                .iter()
                .take_while(|later| **later - *at < WINDOW)
                .count();
            assert!(in_hour <= 6, "{in_hour} within an hour of {at:?}: {secs:?}");
        }
        // Once the hour's six are spent, the next waits for the first to leave the window:
        // half an hour at the most, never the whole hour.
        for pair in charged.windows(2) {
            assert!(pair[1] - pair[0] <= WINDOW / 2, "{secs:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_binds_across_proxies_and_one_proxy_does_not_spend_anothers_share() {
        let budget = CircuitBudget::new(4, 6);
        let (a, b, c) = (proxy("a.example"), proxy("b.example"), proxy("c.example"));
        let mut churning = budget.watch_churning();
        churning.borrow_and_update();
        budget.charge(&a).unwrap();
        budget.charge(&a).unwrap();
        assert_eq!(budget.charge(&a).unwrap_err().limit, Limit::PerProxy);
        assert!(churning.has_changed().unwrap());
        // a's spent share leaves b its own.
        budget.charge(&b).unwrap();
        churning.borrow_and_update();
        let err = budget.charge(&c).unwrap_err();
        assert_eq!(err.limit, Limit::Total);
        assert!(err.to_string().contains("--max-circuits-per-hour"));
        // The total being spent says nothing about c itself.
        assert!(!churning.has_changed().unwrap());
        assert!(!budget.churning(&c));
        tokio::time::advance(WINDOW).await;
        budget.charge(&c).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_proxy_is_forgotten_only_once_its_charges_age_out() {
        let budget = CircuitBudget::new(2, 3);
        let a = proxy("a.example");
        let b = proxy("b.example");
        budget.charge(&a).unwrap();
        budget.charge(&b).unwrap();
        budget.forget_idle_except(&[]);
        assert_eq!(budget.counts().len(), 2);
        tokio::time::advance(WINDOW).await;
        budget.forget_idle_except(std::slice::from_ref(&b));
        let left: Vec<String> = budget.counts().into_iter().map(|c| c.proxy).collect();
        assert_eq!(left, ["b.example:443"]);
    }
}
