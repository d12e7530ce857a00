//! `shroud-junk ADDR RATE SECS`: a flood of junk connections, for the abuse tests.
//!
//! Opens RATE connections a second to ADDR for SECS seconds, from the loopback addresses
//! 127.26.x.y (a thousand connections each, as from many hosts), writes a few bytes that are
//! neither a TLS record nor an HTTP request on each, and waits up to 2 s for the server to
//! close it. Prints `made N closed M` (closed: by the server, within the 2 s) and exits.
//!
//! A process of its own, so that a test can run it at a lower priority (`nice`): the flood's
//! own CPU is an attacker's, on another machine, not the proxy's.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shroud_tests::scale::{connect_from, spread_source};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Tasks making connections; each paces itself to its share of the rate.
const WORKERS: usize = 64;
/// What each connection sends.
const JUNK: &[u8] = b"\x00\x01\x02junk\xff\xfe not a ClientHello\r\n\r\n";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [addr, rate, secs] => addr
            .parse::<SocketAddr>()
            .ok()
            .zip(rate.parse::<u64>().ok().filter(|r| *r > 0))
            .zip(secs.parse::<u64>().ok()),
        _ => None,
    };
    let Some(((target, rate), secs)) = parsed else {
        eprintln!("usage: shroud-junk ADDR RATE SECS");
        return ExitCode::from(2);
    };
    let (made, closed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (made, closed) = (made.clone(), closed.clone());
        workers.push(tokio::spawn(async move {
            let period = Duration::from_nanos(1_000_000_000 * WORKERS as u64 / rate);
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut n = 0usize;
            while Instant::now() < deadline {
                ticks.tick().await;
                n += 1;
                let source = spread_source(26, w * 1_000_000 + n, 1000);
                let Ok(mut conn) = connect_from(source, target).await else {
                    continue;
                };
                made.fetch_add(1, Ordering::Relaxed);
                let _ = conn.write_all(JUNK).await;
                let mut sink = [0u8; 64];
                let read = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut sink));
                if let Ok(Ok(0)) = read.await {
                    closed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for worker in workers {
        let _ = worker.await;
    }
    println!(
        "made {} closed {}",
        made.load(Ordering::Relaxed),
        closed.load(Ordering::Relaxed)
    );
    ExitCode::SUCCESS
}
