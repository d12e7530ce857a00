//! The exits' DNS resolver: a [`TestDns`] that every exit of a network, and nothing else, asks.
//!
//! An exit resolves the names clients send it in `BEGIN` cells with its own resolver. Left to
//! the machine's `/etc/resolv.conf`, the exits would ask a server tests cannot control (or none,
//! with no network). Instead each exit's torrc names this server (`ServerDNSResolvConfFile`, a
//! file whose `nameserver` line carries the port, as libevent's resolver reads it), so a test
//! can add a name under [`ZONE`] that only the exits can resolve: a client that reaches it by
//! that name has had its name resolved by an exit, since this machine's resolver has never heard
//! of it. The exits ask it for every name, `localhost` included: tor's lookups go to the
//! nameservers (libevent reads `/etc/hosts` only for `evdns_getaddrinfo`, which tor's exit
//! lookups do not use), so `localhost` resolves at an exit only if its DNS server answers it,
//! and this one does not.
//!
//! The server runs on a runtime of its own (one worker thread), so it serves as long as the
//! network lives, whichever test's runtime comes and goes.

use std::fs;
use std::path::Path;

use anyhow::Context as _;

use crate::dns::TestDns;

/// The zone the exits' resolver serves. Every other name gets REFUSED, which exits report as
/// a failed resolution.
pub const ZONE: &str = "tornet.test";

/// The exits' DNS server and the runtime it runs on.
pub struct ExitResolver {
    dns: TestDns,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ExitResolver {
    /// Starts the server and writes, at `resolv_conf`, the resolver configuration that names
    /// it. Blocking; safe to call from inside a runtime's blocking thread.
    pub(super) fn start(resolv_conf: &Path) -> anyhow::Result<Self> {
        // A runtime cannot be started from a thread that is already inside one.
        let resolver = std::thread::spawn(|| -> anyhow::Result<Self> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("tornet-dns")
                .enable_all()
                .build()
                .context("starting the exits' resolver's runtime")?;
            let dns = runtime
                .block_on(TestDns::start(ZONE))
                .context("starting the exits' DNS server")?;
            Ok(Self {
                dns,
                runtime: Some(runtime),
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the exits' resolver's thread panicked"))??;
        // libevent reads `IP:PORT` in a nameserver line; nothing else is asked.
        fs::write(
            resolv_conf,
            format!(
                "# The exits' resolver: shroud-tests' TestDns for {ZONE}.\nnameserver {}\n",
                resolver.dns.addr
            ),
        )
        .with_context(|| format!("writing {}", resolv_conf.display()))?;
        Ok(resolver)
    }

    /// The server: add the names the exits should resolve (under [`ZONE`]), and count the
    /// queries that reached it.
    pub fn dns(&self) -> &TestDns {
        &self.dns
    }
}

impl std::fmt::Debug for ExitResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitResolver")
            .field("dns", &self.dns)
            .finish_non_exhaustive()
    }
}

impl Drop for ExitResolver {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime: let it go instead.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
