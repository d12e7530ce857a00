//! The soak's visitors: three steady loads over the three proxies, each request's work drawn
//! from the seed and its index, every byte checked, every request recorded.
//!
//! - `get`: small HTTPS GETs, a path of their own each (`/soak/get/N`), so an answer meant
//!   for another request would show as a wrong body.
//! - `bulk`: the bulk protocol, 1 KiB to 8 MiB each way (log-uniform, so most are small and
//!   some are large), both directions checked, the visitor's bytes by the origin's SHA-256.
//! - `paced`: long-lived connections, 64 KiB to 1 MiB each way at a walking pace over 20 to
//!   120 s, so that many are open whenever something is killed.

use std::sync::Arc;
use std::time::Duration;

use shroud_tests::load::{Load, LoadSpec, Record, Request, Vary};

use crate::chaos::Rng;
use crate::fleet::{Fleet, HOST};

/// GETs started per second.
const GET_RATE: u32 = 5;
/// One bulk transfer starts this often.
const BULK_EVERY: Duration = Duration::from_secs(2);
/// Bulk sizes, each way.
const BULK_BYTES: (u64, u64) = (1024, 8 << 20);
/// One paced transfer starts this often.
const PACED_EVERY: Duration = Duration::from_secs(10);
/// Paced sizes, each way.
const PACED_BYTES: (u64, u64) = (64 << 10, 1 << 20);
/// How long a paced transfer is meant to take.
const PACED_SECS: (f64, f64) = (20.0, 120.0);
/// A paced transfer sends, and reads, one piece this often.
const PACED_TICK: Duration = Duration::from_millis(250);

/// The kinds of request, in the order the summary lists them.
pub const KINDS: [&str; 3] = ["get", "bulk", "paced"];

/// What the soak's visitors are doing.
pub struct Traffic {
    loads: Vec<Load>,
}

impl Traffic {
    /// Starts the three loads against `fleet`'s proxies, their work drawn from `seed`.
    pub fn start(fleet: &Fleet, seed: u64) -> Self {
        let spec = |request: Request, timeout: Duration, vary: Vary| LoadSpec {
            proxies: fleet.proxy_addrs(),
            host: HOST.to_owned(),
            roots: fleet.pki.ca.root_store(),
            per_second: 1,
            request,
            timeout,
            max_in_flight: 1024,
            every: None,
            vary: Some(vary),
            origins: fleet.origin_certs.clone(),
            keep_records: true,
            think: Duration::ZERO,
        };
        let get = LoadSpec {
            per_second: GET_RATE,
            ..spec(
                Request::Get { path: "/".into() },
                Duration::from_secs(30),
                Vary(Arc::new(|i| Request::Get {
                    path: format!("/soak/get/{i}"),
                })),
            )
        };
        let bulk = LoadSpec {
            every: Some(BULK_EVERY),
            ..spec(
                Request::Bulk { bytes: 0 },
                Duration::from_secs(180),
                Vary(Arc::new(move |i| Request::Bulk {
                    bytes: log_uniform(&mut draw(seed, 1, i), BULK_BYTES),
                })),
            )
        };
        let paced = LoadSpec {
            every: Some(PACED_EVERY),
            ..spec(
                Request::Bulk { bytes: 0 },
                Duration::from_secs(PACED_SECS.1 as u64 * 3),
                Vary(Arc::new(move |i| paced(&mut draw(seed, 2, i)))),
            )
        };
        Self {
            loads: [get, bulk, paced].into_iter().map(Load::start).collect(),
        }
    }

    /// One line of counts so far.
    pub fn progress(&self) -> String {
        let parts: Vec<String> = KINDS
            .iter()
            .zip(&self.loads)
            .map(|(kind, load)| {
                let s = load.snapshot();
                format!(
                    "{kind} ok {} failed {} corrupted {}",
                    s.ok(),
                    s.failed() + s.unreachable - s.corrupted,
                    s.corrupted
                )
            })
            .collect();
        parts.join(", ")
    }

    /// Stops starting requests (all loads at once), waits up to `grace` for those in flight
    /// (each also within its own timeout; `None`: no other limit), ends the rest at once, and
    /// returns every request's record.
    pub async fn stop(self, grace: Option<Duration>) -> Vec<Record> {
        let stopping: Vec<_> = self
            .loads
            .into_iter()
            .map(|load| {
                tokio::spawn(async move {
                    match grace {
                        Some(grace) => load.abort_with_records(grace).await.1,
                        None => load.stop_with_records().await.1,
                    }
                })
            })
            .collect();
        let mut records = Vec::new();
        for stop in stopping {
            match stop.await {
                Ok(done) => records.extend(done),
                Err(err) => tracing::error!(%err, "a load's stop failed; its records are lost"),
            }
        }
        records
    }
}

/// The generator for request `index` of load `salt`: each request's work depends only on the
/// seed and its place, never on timing.
fn draw(seed: u64, salt: u64, index: u64) -> Rng {
    let mut rng = Rng::new(seed ^ salt.wrapping_mul(0xa076_1d64_78bd_642f));
    let skip = Rng::new(index).next_u64();
    Rng::new(rng.next_u64() ^ skip)
}

/// A size in `[lo, hi]`, uniform in its logarithm.
fn log_uniform(rng: &mut Rng, (lo, hi): (u64, u64)) -> u64 {
    let (lo_f, hi_f) = ((lo as f64).ln(), (hi as f64).ln());
    (rng.between((lo_f, hi_f)).exp() as u64).clamp(lo, hi)
}

/// A paced transfer: its size, and a piece per tick such that it lasts its drawn duration.
fn paced(rng: &mut Rng) -> Request {
    let bytes = log_uniform(rng, PACED_BYTES);
    let secs = rng.between(PACED_SECS);
    let ticks = (secs / PACED_TICK.as_secs_f64()).max(1.0);
    let chunk = ((bytes as f64 / ticks).ceil() as usize).max(1);
    Request::PacedBulk {
        bytes,
        chunk,
        tick: PACED_TICK,
    }
}
