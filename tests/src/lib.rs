//! The harness behind shroud's end-to-end tests.
//!
//! An end-to-end test plays all four parts of a real deployment on loopback:
//! a visitor talks to a shroud proxy, which routes the connection by TLS SNI
//! (or HTTP `Host`) over the yamux tunnel held by a shroud client, which
//! connects it to a hidden origin. This crate supplies the parts that are not
//! shroud, so each test only wires them together and asserts on what the
//! visitor sees:
//!
//! - [`pki`]: a per-test certificate authority ([`TestCa`]) and the leaf
//!   certificates ([`Leaf`]) origins present. Visitors trust only that CA,
//!   so a verified handshake proves TLS passed through the proxy untouched.
//! - [`origin`]: servers on `127.0.0.1:0` that the client publishes: echo
//!   (with half-close), a minimal HTTP/1.1 server, a bulk-transfer peer, and
//!   one that never answers. Each counts its connections and stops on drop.
//! - [`visitor`]: TLS connect with full verification, HTTP(S) GET and raw
//!   requests with a small response parser, and the bulk-transfer client.
//! - [`bulk`]: the bulk-transfer protocol both ends speak and the
//!   deterministic byte generator ([`PatternGen`]) they share.
//! - [`load`]: steady visitor load at a fixed rate over several proxies,
//!   trying the next proxy when one refuses (as a browser does with several
//!   addresses), counting successes and failures per proxy and by cause.
//! - [`scale`]: descriptor limits, process memory (RSS), visitors from
//!   chosen loopback source addresses, a real ClientHello to dribble, and
//!   latency percentiles, for the load and slow-peer measurements.
//! - [`stack`]: shroud's own parts, started for a test: proxies and clients
//!   in-process or as the real binaries, with the keys, certificates and
//!   arguments they need.
//! - [`metrics`]: scraping a binary's `--metrics-listen` endpoint, with a strict parser of
//!   the OpenMetrics text it serves.
//! - [`ports`]: ports free on 127.0.0.1, for programs that must be told one.
//! - [`pebble`]: Debian's pebble, a test ACME CA, with its DNS answering
//!   127.0.0.1 for every name, so its validator reaches a proxy on loopback.
//! - [`nginx`]: Debian's nginx as an origin that expects a PROXY protocol
//!   header and logs the visitor's address it names.
//! - [`process`]: programs started by PID and killed on drop, their output
//!   read line by line, kept and echoed or written to a log file.
//! - [`dns`]: a real DNS server on `127.0.0.1:0` (UDP and TCP on one port)
//!   serving an in-memory zone that tests change while it runs
//!   ([`dns::TestDns`]), and counting the queries that reach it.
//! - [`tornet`]: a private Tor network on 127.0.0.1 built from the system's
//!   `tor` ([`tornet::TorNet`], one shared per test binary), the Arti
//!   configuration that reaches it, and `/proc` helpers that tell which
//!   process holds a TCP connection.
//! - [`onion`]: a proxy hosting its tunnel listener as an onion service on
//!   that network, and the checks its tests share (key files private, who
//!   holds each TCP connection).
//! - [`tool`]: what the harness's command-line tools share (flags, `main`,
//!   dates).
//!
//! Call [`init`] first in every test, and wrap every await that could hang
//! in [`within`], so a broken tunnel fails the test instead of stalling CI.
//! Nothing here uses fixed ports or sleeps for readiness: servers are bound
//! before their handles are returned.

#![forbid(unsafe_code)]

pub mod bulk;
pub mod dns;
pub mod hostile;
pub mod load;
pub mod metrics;
pub mod nginx;
pub mod onion;
pub mod origin;
pub mod pebble;
pub mod pki;
pub mod ports;
pub mod process;
pub mod scale;
pub mod stack;
pub mod tool;
pub mod tornet;
pub mod visitor;

use std::future::{Future, IntoFuture};
use std::panic::Location;
use std::sync::Once;
use std::time::Duration;

pub use bulk::{BulkError, Direction, PatternGen};
pub use origin::{BulkOrigin, EchoOrigin, HttpOrigin, SilentOrigin};
pub use pki::{Leaf, TestCa};
pub use visitor::{
    bulk_transfer, client_config, http_exchange, http_get, https_get, https_get_retrying, raw_http,
    tls_connect, tls_connect_with, HttpResponse,
};

/// Per-process setup; cheap and safe to call from every test.
///
/// Installs aws-lc-rs as rustls's process-wide default provider (for code
/// under test that relies on the default) and a tracing subscriber that
/// writes through the test harness's capture, filtered by `RUST_LOG`.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means some provider is already installed, which is all we need.
        let _already = rustls::crypto::aws_lc_rs::default_provider().install_default();
        // Err means another subscriber was set first; keep that one.
        let _already = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    });
}

/// Awaits `fut`, panicking if it takes longer than `secs` seconds.
///
/// The panic names the caller's source location, so a hung step is easy to
/// find: `within(10, https_get(..)).await?`.
#[track_caller]
pub fn within<F: IntoFuture>(secs: u64, fut: F) -> impl Future<Output = F::Output> {
    let caller = Location::caller();
    let fut = fut.into_future();
    async move {
        match tokio::time::timeout(Duration::from_secs(secs), fut).await {
            Ok(output) => output,
            Err(_) => panic!("timed out: the step at {caller} did not finish within {secs}s"),
        }
    }
}
