//! How long to wait before reconnecting to a proxy.
//!
//! Exponential backoff with jitter, so that many clients cut off by one proxy restart do not all
//! come back in the same instant; once a session has stayed up for a while, the next failure
//! starts again from the shortest delay. A go-away (the proxy restarting on purpose) also starts
//! again from the shortest delay, whatever failed before the session it ends.

use std::time::Duration;

use tokio::time::Instant;

/// The first delay, before jitter.
pub const DEFAULT_BASE: Duration = Duration::from_millis(500);
/// The longest delay, before jitter.
pub const DEFAULT_CAP: Duration = Duration::from_secs(60);
/// How long a session must last for the next reconnect to start from [`DEFAULT_BASE`] again.
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(60);

/// Reconnect delays for one proxy: `base * 2^n`, at most `cap`, each drawn uniformly from
/// `[delay / 2, delay]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    stable_after: Duration,
    /// Failed attempts since the last stable session.
    attempt: u32,
    /// Sessions ended by a go-away since the last stable session.
    go_aways: u32,
    connected_at: Option<Instant>,
    rng: fastrand::Rng,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_BASE, DEFAULT_CAP, DEFAULT_STABLE_AFTER)
    }
}

impl Backoff {
    /// Delays that start at `base`, double up to `cap`, and start over after a session that
    /// lasted `stable_after`.
    pub fn new(base: Duration, cap: Duration, stable_after: Duration) -> Self {
        Self {
            base,
            cap,
            stable_after,
            attempt: 0,
            go_aways: 0,
            connected_at: None,
            rng: fastrand::Rng::new(),
        }
    }

    /// How long to wait before the next attempt; each call counts as one more attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let floor = delay / 2;
        let spread = u64::try_from((delay - floor).as_nanos()).unwrap_or(u64::MAX);
        floor + Duration::from_nanos(self.rng.u64(0..=spread))
    }

    /// Notes that a session came up at `at`.
    pub fn record_connected(&mut self, at: Instant) {
        self.connected_at = Some(at);
    }

    /// Notes that the session that came up last went down at `at`. If it lasted at least
    /// `stable_after`, delays start from `base` again.
    pub fn record_disconnected(&mut self, at: Instant) {
        if self.ended_stable(at) {
            self.attempt = 0;
            self.go_aways = 0;
        }
    }

    /// Notes that the proxy said at `at` that it is draining the session that came up last.
    ///
    /// The proxy is restarting on purpose, and the attempts that failed before this session
    /// led to a bound tunnel: they say nothing about now. So delays start from `base` again:
    /// the restarting proxy refuses the first attempts, each refusal doubles the delay as usual,
    /// and the client is back within `cap` of the proxy, at a jittered moment. Only go-aways
    /// add up, until a session lasts `stable_after`: a proxy that says go-away soon after every
    /// bind gets growing delays, as a failing one does, rather than a reconnect every `base`.
    pub fn record_go_away(&mut self, at: Instant) {
        if self.ended_stable(at) {
            self.go_aways = 0;
        }
        self.attempt = self.go_aways;
        self.go_aways = self.go_aways.saturating_add(1);
    }

    /// Attempts counted since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Whether the session that came up last, ending at `at`, lasted `stable_after`.
    fn ended_stable(&mut self, at: Instant) -> bool {
        self.connected_at.take().is_some_and(|connected_at| {
            at.saturating_duration_since(connected_at) >= self.stable_after
        })
    }

    /// The delay for the current attempt before jitter: `base * 2^attempt`, at most `cap`.
    fn ceiling(&self) -> Duration {
        2u32.checked_pow(self.attempt)
            .and_then(|factor| self.base.checked_mul(factor))
            .map_or(self.cap, |delay| delay.min(self.cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The next delay, checked against its jitter range `[ceiling / 2, ceiling]`.
    fn next_within(backoff: &mut Backoff, ceiling: Duration) -> Duration {
        let delay = backoff.next_delay();
        assert!(
            delay >= ceiling / 2 && delay <= ceiling,
            "{delay:?} outside [{:?}, {ceiling:?}]",
            ceiling / 2
        );
        delay
    }

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let mut backoff = Backoff::default();
        for ceiling in [
            500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000,
        ] {
            next_within(&mut backoff, ms(ceiling));
        }
        // Far past the point where 2^n overflows, still the cap.
        for _ in 0..100 {
            next_within(&mut backoff, DEFAULT_CAP);
        }
        assert_eq!(backoff.attempts(), 109);
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let mut lowest = Duration::MAX;
        let mut highest = Duration::ZERO;
        for _ in 0..1_000 {
            let mut backoff = Backoff::new(ms(1_000), ms(10_000), ms(1_000));
            let delay = next_within(&mut backoff, ms(1_000));
            lowest = lowest.min(delay);
            highest = highest.max(delay);
        }
        // 1,000 uniform draws from [500 ms, 1 s] all landing in one half has odds of 2^-999.
        assert!(lowest < ms(750), "{lowest:?}");
        assert!(highest > ms(750), "{highest:?}");
    }

    #[test]
    fn a_cap_below_the_base_wins() {
        let mut backoff = Backoff::new(ms(500), ms(100), ms(1_000));
        next_within(&mut backoff, ms(100));
        next_within(&mut backoff, ms(100));
    }

    #[tokio::test(start_paused = true)]
    async fn resets_after_a_stable_session() {
        let mut backoff = Backoff::default();
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.record_connected(Instant::now());
        tokio::time::advance(DEFAULT_STABLE_AFTER).await;
        backoff.record_disconnected(Instant::now());
        assert_eq!(backoff.attempts(), 0);
        next_within(&mut backoff, DEFAULT_BASE);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_growing_after_a_short_session() {
        let mut backoff = Backoff::default();
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.record_connected(Instant::now());
        tokio::time::advance(DEFAULT_STABLE_AFTER - ms(1)).await;
        backoff.record_disconnected(Instant::now());
        assert_eq!(backoff.attempts(), 5);
        next_within(&mut backoff, ms(16_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_go_away_starts_again_from_the_base_whatever_failed_before() {
        let mut backoff = Backoff::default();
        for _ in 0..10 {
            backoff.next_delay();
        }
        next_within(&mut backoff, DEFAULT_CAP);
        // A short session: a loss would keep the grown delays; a go-away does not.
        backoff.record_connected(Instant::now());
        tokio::time::advance(ms(5_000)).await;
        backoff.record_go_away(Instant::now());
        assert_eq!(backoff.attempts(), 0);
        for ceiling in [500, 1_000, 2_000, 4_000] {
            next_within(&mut backoff, ms(ceiling));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn go_aways_after_short_sessions_add_up_until_a_stable_session() {
        let mut backoff = Backoff::default();
        let short_session_then_go_away = |backoff: &mut Backoff| {
            backoff.record_connected(Instant::now());
            backoff.record_go_away(Instant::now());
        };
        for ceiling in [500, 1_000, 2_000, 4_000] {
            short_session_then_go_away(&mut backoff);
            // Failed attempts in between do not change where the next go-away starts.
            next_within(&mut backoff, ms(ceiling));
            next_within(&mut backoff, ms(ceiling * 2));
        }
        // A stable session, even one that ends in a loss, clears the count.
        backoff.record_connected(Instant::now());
        tokio::time::advance(DEFAULT_STABLE_AFTER).await;
        backoff.record_disconnected(Instant::now());
        short_session_then_go_away(&mut backoff);
        next_within(&mut backoff, DEFAULT_BASE);
        // And so does a go-away that ends a stable session.
        short_session_then_go_away(&mut backoff);
        next_within(&mut backoff, ms(1_000));
        backoff.record_connected(Instant::now());
        tokio::time::advance(DEFAULT_STABLE_AFTER).await;
        backoff.record_go_away(Instant::now());
        next_within(&mut backoff, DEFAULT_BASE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnect_without_a_connect_changes_nothing() {
        let mut backoff = Backoff::default();
        backoff.next_delay();
        backoff.next_delay();
        tokio::time::advance(DEFAULT_STABLE_AFTER * 2).await;
        backoff.record_disconnected(Instant::now());
        assert_eq!(backoff.attempts(), 2);
    }
}
