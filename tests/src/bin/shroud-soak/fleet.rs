//! What the soak runs: three `shroud-proxy` processes, two `shroud` clients publishing the same
//! hostname (as two machines would) through Tor on the private network, and one origin per
//! client; and what their logs say about the tunnels between them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use rustls::pki_types::CertificateDer;
use shroud_tests::origin::MixedOrigin;
use shroud_tests::stack::{log_addr, make_key, proxy_args, Pki};

use crate::procs::{self, wait_note, Classify, History, Note, Proc, Seen, Watchdog};

/// The hostname both clients publish, and every visitor's SNI.
pub const HOST: &str = "www.soak.test";
/// Proxies in the fleet.
pub const PROXIES: usize = 3;
/// Clients publishing [`HOST`].
pub const CLIENTS: usize = 2;
/// The clients' `--keepalive-secs`: a silently dead tunnel is given up after twice this.
pub const KEEPALIVE_SECS: u64 = 3;
/// The clients' `--max-backoff-secs`: a client tries a proxy that is back within this long.
pub const MAX_BACKOFF_SECS: u64 = 2;
/// The clients' `--connect-timeout-secs` (a Tor circuit included).
const CONNECT_TIMEOUT_SECS: u64 = 30;
/// The clients' `--max-circuits-per-proxy-per-hour`: the soak kills relays far more often
/// than a real network loses them, and each kill costs the tunnels through the relay new
/// circuits (some of them through the dead relay, still listed), which the default of 6 would
/// soon make wait for an hour.
const CIRCUITS_PER_PROXY_PER_HOUR: u32 = 120;
/// The proxies' `--drain-timeout-secs`: on SIGTERM, streams in flight get this long.
pub const DRAIN_SECS: u64 = 10;
/// How long a proxy may take to bind its listener.
const PROXY_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How many times a proxy is started again when its address cannot be bound yet.
const PROXY_START_ATTEMPTS: usize = 10;
/// The pause between those attempts.
const PROXY_START_RETRY: Duration = Duration::from_secs(1);
/// How often tunnel states are looked at while waiting for them.
const POLL: Duration = Duration::from_millis(50);

/// Where the binaries under test are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `shroud-proxy`.
    pub proxy: PathBuf,
    /// `shroud`.
    pub client: PathBuf,
}

impl Bins {
    /// The binaries in `dir`, which must exist.
    pub fn in_dir(dir: &Path) -> anyhow::Result<Self> {
        let bins = Self {
            proxy: dir.join("shroud-proxy"),
            client: dir.join("shroud"),
        };
        for bin in [&bins.proxy, &bins.client] {
            ensure!(
                bin.exists(),
                "{} is not built; run `cargo build --release --workspace --bins` first (or give \
                 --bin-dir)",
                bin.display()
            );
        }
        Ok(bins)
    }
}

/// One proxy: its fixed name and address, and its current process.
pub struct ProxySlot {
    /// Its tunnel name.
    pub name: String,
    /// Its public TLS address, kept across restarts. Each proxy has its own loopback address
    /// (127.0.0.2, .3, ...), so no outgoing connection's port can take its port while it is down.
    pub addr: SocketAddr,
    /// Its arguments, less `--listen-https`.
    args: Vec<String>,
    /// Its process, unless it is down.
    pub proc: Option<Proc>,
    /// What its logs said, over every process.
    pub history: History,
    log: PathBuf,
}

/// One client: its arguments (its own key, state directory and origin), and its current process.
pub struct ClientSlot {
    args: Vec<String>,
    /// Its process, unless it is down.
    pub proc: Option<Proc>,
    /// What its logs said, over every process.
    pub history: History,
    log: PathBuf,
}

/// Everything the soak started, bar the Tor network.
pub struct Fleet {
    /// The CA of proxies and origins.
    pub pki: Pki,
    /// The proxies, in the order visitors try them.
    pub proxies: Vec<ProxySlot>,
    /// The clients.
    pub clients: Vec<ClientSlot>,
    /// Client i's origin's certificate is `origin_certs[i]`: visitors tell them apart by it.
    pub origin_certs: Vec<CertificateDer<'static>>,
    /// Kept running for the whole soak.
    _origins: Vec<MixedOrigin>,
    bins: Bins,
    watchdog: Arc<Watchdog>,
    /// The soak's clock: log lines are stamped with seconds since this.
    epoch: Instant,
}

impl Fleet {
    /// Starts the origins, the proxies and the clients (through the Tor network described by
    /// `network_file`), and waits until every client has a tunnel bound at every proxy.
    pub async fn start(
        bins: Bins,
        network_file: &Path,
        log_dir: &Path,
        epoch: Instant,
        watchdog: Arc<Watchdog>,
    ) -> anyhow::Result<Self> {
        let pki = Pki::new()?;
        let mut keys = Vec::new();
        for index in 0..CLIENTS {
            let path = pki.dir().join(format!("client{index}.key"));
            keys.push((path.clone(), make_key(&path)?));
        }
        let authorized: String = keys
            .iter()
            .map(|(_, public)| format!("{HOST} {public}\n"))
            .collect();

        let mut origins = Vec::new();
        let mut origin_certs = Vec::new();
        for _ in 0..CLIENTS {
            // Each origin its own certificate for HOST, so visitors can tell which one answered.
            let leaf = pki.ca.issue(&[HOST]);
            origins.push(MixedOrigin::tls(leaf.server_config(&[])).await?);
            origin_certs.push(leaf.cert_der.clone());
        }

        let mut fleet = Self {
            pki,
            proxies: Vec::new(),
            clients: Vec::new(),
            origin_certs,
            _origins: Vec::new(),
            bins,
            watchdog,
            epoch,
        };
        for index in 0..PROXIES {
            let name = proxy_name(index);
            let mut args = proxy_args(&fleet.pki, &name, &authorized)?;
            args.extend(["--drain-timeout-secs".into(), DRAIN_SECS.to_string()]);
            let ip = Ipv4Addr::new(127, 0, 0, 2 + index as u8);
            fleet.proxies.push(ProxySlot {
                name,
                addr: SocketAddr::from((ip, 0)),
                args,
                proc: None,
                history: History::default(),
                log: log_dir.join(format!("proxy{index}.log")),
            });
            fleet.start_proxy(index).await?;
        }

        for (index, (key, _)) in keys.iter().enumerate() {
            let state = fleet.pki.dir().join(format!("client{index}-state"));
            let mut args = vec![
                HOST.to_owned(),
                origins[index].addr().to_string(),
                "--proxy-ca".into(),
                fleet.pki.ca_path.display().to_string(),
                "--key".into(),
                key.display().to_string(),
                "--state-dir".into(),
                state.display().to_string(),
                "--tor-network".into(),
                network_file.display().to_string(),
                "--keepalive-secs".into(),
                KEEPALIVE_SECS.to_string(),
                "--max-backoff-secs".into(),
                MAX_BACKOFF_SECS.to_string(),
                "--connect-timeout-secs".into(),
                CONNECT_TIMEOUT_SECS.to_string(),
                "--max-circuits-per-proxy-per-hour".into(),
                CIRCUITS_PER_PROXY_PER_HOUR.to_string(),
                "--max-circuits-per-hour".into(),
                (CIRCUITS_PER_PROXY_PER_HOUR * PROXIES as u32).to_string(),
            ];
            for proxy in &fleet.proxies {
                let port = proxy.addr.port();
                args.extend([
                    "--proxy".into(),
                    format!("{}:{port}", proxy.name),
                    "--resolve".into(),
                    format!("{}:{port}:{}", proxy.name, proxy.addr.ip()),
                ]);
            }
            fleet.clients.push(ClientSlot {
                args,
                proc: None,
                history: History::default(),
                log: log_dir.join(format!("client{index}.log")),
            });
            fleet.start_client(index)?;
        }
        fleet._origins = origins;
        Ok(fleet)
    }

    /// The proxies' public addresses, in order.
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.proxies.iter().map(|p| p.addr).collect()
    }

    /// Starts proxy `index` on its address (port 0 the first time), retrying for a while if
    /// the address cannot be bound yet. Returns when its listener is bound.
    pub async fn start_proxy(&mut self, index: usize) -> anyhow::Result<Instant> {
        let mut failures = Vec::new();
        for _ in 0..PROXY_START_ATTEMPTS {
            match self.try_start_proxy(index).await {
                Ok(at) => return Ok(at),
                Err(err) => {
                    failures.push(format!("{err:#}"));
                    tokio::time::sleep(PROXY_START_RETRY).await;
                }
            }
        }
        bail!(
            "proxy {index} did not start in {PROXY_START_ATTEMPTS} attempts: {}",
            failures.join("; ")
        )
    }

    async fn try_start_proxy(&mut self, index: usize) -> anyhow::Result<Instant> {
        let slot = &mut self.proxies[index];
        let mut args = vec!["--listen-https".to_owned(), slot.addr.to_string()];
        args.extend(slot.args.iter().cloned());
        let mut proc = Proc::spawn(
            &self.bins.proxy,
            &args,
            &slot.log,
            self.epoch,
            &slot.history,
            classify_proxy(),
            &self.watchdog,
        )?;
        let started = proc.started;
        let (at, addr) = wait_note(
            &slot.history,
            &mut proc,
            started,
            PROXY_START_TIMEOUT,
            |seen| match seen {
                Seen::Listening(addr) => Some(*addr),
                _ => None,
            },
        )
        .await?;
        if slot.addr.port() != 0 && addr != slot.addr {
            bail!("proxy {index} listens on {addr}, not {}", slot.addr);
        }
        slot.addr = addr;
        slot.proc = Some(proc);
        Ok(at)
    }

    /// Starts client `index`. Returns when the process was started.
    pub fn start_client(&mut self, index: usize) -> anyhow::Result<Instant> {
        let names: Vec<String> = self.proxies.iter().map(|p| p.name.clone()).collect();
        let slot = &mut self.clients[index];
        let proc = Proc::spawn(
            &self.bins.client,
            &slot.args,
            &slot.log,
            self.epoch,
            &slot.history,
            classify_client(names),
            &self.watchdog,
        )?;
        let started = proc.started;
        slot.proc = Some(proc);
        Ok(started)
    }

    /// Whether client `client` has a tunnel bound at proxy `proxy` now, going by its log: its
    /// last word on that proxy since its process started is "tunnel up". Returns since when.
    pub fn bound_since(&self, client: usize, proxy: usize) -> Option<Instant> {
        let slot = &self.clients[client];
        slot.proc.as_ref()?;
        let notes = procs::notes(&slot.history);
        let mut up = None;
        for note in notes {
            match note.seen {
                Seen::Started | Seen::Stopped => up = None,
                Seen::TunnelUp(p) if p == proxy => up = Some(note.at),
                Seen::TunnelLost(p) | Seen::Draining(p) | Seen::GaveUp(p) if p == proxy => {
                    up = None;
                }
                _ => {}
            }
        }
        up
    }

    /// Waits up to `limit` until every running client has a tunnel bound at every running
    /// proxy, each of the `fresh` (client, proxy) pairs one that came up after the moment
    /// given with it. Returns when the last of them came up, or `None` if `limit` passed.
    pub async fn wait_all_bound(
        &mut self,
        fresh: &[(usize, usize, Instant)],
        limit: Duration,
    ) -> anyhow::Result<Option<Instant>> {
        let deadline = Instant::now() + limit;
        loop {
            self.check_alive()?;
            let mut last = Some(self.epoch);
            for client in 0..self.clients.len() {
                if self.clients[client].proc.is_none() {
                    continue;
                }
                for proxy in 0..self.proxies.len() {
                    if self.proxies[proxy].proc.is_none() {
                        continue;
                    }
                    let since = self.bound_since(client, proxy);
                    let after = fresh
                        .iter()
                        .filter(|(c, p, _)| (*c, *p) == (client, proxy))
                        .map(|(_, _, at)| *at)
                        .max();
                    last = match (last, since) {
                        (Some(last), Some(since)) if after.is_none_or(|a| since >= a) => {
                            Some(last.max(since))
                        }
                        _ => None,
                    };
                }
            }
            if last.is_some() {
                return Ok(last);
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Fails if a process the soak did not stop has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        let procs = self
            .proxies
            .iter_mut()
            .map(|slot| (&mut slot.proc, "proxy"))
            .chain(
                self.clients
                    .iter_mut()
                    .map(|slot| (&mut slot.proc, "client")),
            );
        for (proc, what) in procs {
            if let Some(proc) = proc {
                if let Some(status) = proc.exited() {
                    bail!(
                        "a {what} (pid {}) exited by itself ({status}); see {}",
                        proc.pid(),
                        proc.log.display()
                    );
                }
            }
        }
        Ok(())
    }

    /// Every note of every client, by client.
    pub fn client_notes(&self) -> Vec<Vec<Note>> {
        self.clients
            .iter()
            .map(|slot| procs::notes(&slot.history))
            .collect()
    }

    /// Every note of every proxy, by proxy.
    pub fn proxy_notes(&self) -> Vec<Vec<Note>> {
        self.proxies
            .iter()
            .map(|slot| procs::notes(&slot.history))
            .collect()
    }

    /// Stops every process: SIGTERM, then SIGKILL after `limit`; clients first, so that the
    /// proxies see their tunnels close.
    pub async fn stop(&mut self, limit: Duration) {
        let slots = self
            .clients
            .iter_mut()
            .map(|slot| (&mut slot.proc, &slot.history))
            .chain(
                self.proxies
                    .iter_mut()
                    .map(|slot| (&mut slot.proc, &slot.history)),
            );
        for (proc, history) in slots {
            if let Some(mut running) = proc.take() {
                running.terminate();
                if running.wait_exit(limit).await.is_none() {
                    running.kill();
                }
                procs::note(history, Seen::Stopped);
            }
        }
    }
}

/// Proxy `index`'s tunnel name.
fn proxy_name(index: usize) -> String {
    format!("p{index}.proxy.soak.test")
}

/// Reads a proxy's log lines.
fn classify_proxy() -> Classify {
    Arc::new(|line: &str| {
        if line.contains(" listening ") && line.contains("listener=\"https\"") {
            return log_addr(line).ok().map(Seen::Listening);
        }
        // `tunnel bound tunnel=3 peer=...`, `tunnel closed tunnel=3`.
        let tunnel = || {
            line.split_once(" tunnel=")
                .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        };
        if line.contains("tunnel bound") {
            return tunnel().map(Seen::TunnelBound);
        }
        if line.contains("tunnel closed") {
            return tunnel().map(Seen::TunnelClosed);
        }
        if line.contains("drain deadline passed") {
            return Some(Seen::DrainDeadline);
        }
        None
    })
}

/// Reads a client's log lines; `names` are the proxies' tunnel names, in fleet order.
fn classify_client(names: Vec<String>) -> Classify {
    Arc::new(move |line: &str| {
        if line.contains("Tor bootstrapped") {
            return Some(Seen::Bootstrapped);
        }
        // Tunnel lines carry their span's field: `tunnel{proxy=NAME:PORT}: ...`.
        let proxy = line
            .split_once("proxy=")
            .map(|(_, rest)| rest.split([':', '}', ' ']).next().unwrap_or_default())
            .and_then(|name| names.iter().position(|n| n == name))?;
        let message = line.split_once("shroud_client::tunnel: ")?.1;
        if message.starts_with("tunnel up") {
            Some(Seen::TunnelUp(proxy))
        } else if message.starts_with("tunnel lost") {
            Some(Seen::TunnelLost(proxy))
        } else if message.starts_with("proxy is draining") {
            Some(Seen::Draining(proxy))
        } else if message.starts_with("giving up") {
            Some(Seen::GaveUp(proxy))
        } else {
            None
        }
    })
}
