//! Per-address request rate limiting: a token bucket per client address, in a bounded table.
//!
//! IPv6 addresses are grouped by their /64, since one host usually holds a whole /64. When the
//! table is full, buckets that have refilled completely (which say nothing a fresh bucket would
//! not) are dropped; if it is still full, new addresses are refused until room appears, so an
//! attacker with many addresses costs bounded memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// The rate limit's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Requests an address may make at once after being quiet.
    pub burst: u32,
    /// Requests per second an address may make in the long run.
    pub per_second: f64,
    /// Most addresses tracked at once.
    pub max_addresses: usize,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            burst: 20,
            per_second: 5.0,
            max_addresses: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by client address.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateConfig,
    buckets: HashMap<IpAddr, Bucket>,
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new(config: RateConfig) -> Self {
        Self {
            config,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `addr` at `now`; `false` means the request should be refused.
    pub fn allow(&mut self, addr: IpAddr, now: Instant) -> bool {
        let key = bucket_key(addr);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.config.max_addresses {
            self.prune(now);
            if self.buckets.len() >= self.config.max_addresses {
                return false;
            }
        }
        let burst = f64::from(self.config.burst);
        let per_second = self.config.per_second;
        let bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * per_second).min(burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that would be full by `now`: forgetting them changes nothing.
    pub fn prune(&mut self, now: Instant) {
        let burst = f64::from(self.config.burst);
        let per_second = self.config.per_second;
        self.buckets.retain(|_, bucket| {
            let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
            bucket.tokens + elapsed * per_second < burst
        });
    }

    /// How many addresses are tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no address is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// How long until a full bucket, after a burst, has refilled (for callers sizing a
    /// pruning interval).
    pub fn refill_time(&self) -> Duration {
        if self.config.per_second > 0.0 {
            Duration::from_secs_f64(f64::from(self.config.burst) / self.config.per_second)
        } else {
            Duration::MAX
        }
    }
}

/// IPv4 addresses stand alone; IPv6 addresses are grouped by /64.
fn bucket_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max_addresses: usize) -> RateLimiter {
        RateLimiter::new(RateConfig {
            burst: 3,
            per_second: 1.0,
            max_addresses,
        })
    }

    #[test]
    fn burst_then_steady_rate() {
        let mut limiter = limiter(10);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.allow(a, t0)));
        assert!(!limiter.allow(a, t0));
        assert!(limiter.allow(b, t0), "other addresses are unaffected");
        assert!(!limiter.allow(a, t0 + Duration::from_millis(900)));
        assert!(limiter.allow(a, t0 + Duration::from_millis(1900)));
        assert!(!limiter.allow(a, t0 + Duration::from_millis(1950)));
        // Quiet for long: the bucket is full again, not fuller.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| limiter.allow(a, later)));
        assert!(!limiter.allow(a, later));
    }

    #[test]
    fn ipv6_is_grouped_by_slash_64() {
        let mut limiter = limiter(10);
        let t0 = Instant::now();
        for i in 1..=3 {
            let addr: IpAddr = format!("2001:db8::{i}").parse().unwrap();
            assert!(limiter.allow(addr, t0));
        }
        assert!(!limiter.allow("2001:db8::ffff".parse().unwrap(), t0));
        assert!(limiter.allow("2001:db8:0:1::1".parse().unwrap(), t0));
    }

    #[test]
    fn table_is_bounded_and_pruned() {
        let mut limiter = limiter(2);
        let t0 = Instant::now();
        let addr = |i: u8| IpAddr::from([198, 51, 100, i]);
        assert!(limiter.allow(addr(1), t0));
        assert!(limiter.allow(addr(2), t0));
        assert!(!limiter.allow(addr(3), t0), "table full of active buckets");
        assert_eq!(limiter.len(), 2);
        // Once the first buckets have refilled they make room.
        let later = t0 + limiter.refill_time();
        assert!(limiter.allow(addr(3), later));
        assert_eq!(limiter.len(), 1);
    }
}
