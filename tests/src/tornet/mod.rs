//! A private Tor network on 127.0.0.1, built from the system's `tor`.
//!
//! The real Tor network is out of reach in tests, so [`TorNet::start`] builds
//! one: three directory authorities, two middle relays and three exits, each
//! a `tor` daemon with its own data directory, ORPort and DirPort on
//! 127.0.0.1. It returns once every authority serves a consensus that lists
//! every relay, so an Arti client made from [`TorNet::arti_config`] can
//! bootstrap at once and build circuits to any `127.0.0.1` port.
//!
//! How Arti finds this network is the file at [`TorNet::network_file`]: Arti's
//! own TOML configuration with only the `[tor_network]`, `[path_rules]`,
//! `[address_filter]` and `[override_net_params]` (the onion-service time
//! period of a testing network) sections, the same file a user hands shroud's
//! client and proxy as `--tor-network FILE`.
//!
//! A network costs eight processes and 20 to 40 seconds of voting, so a test
//! binary normally shares one: [`TorNet::shared`] starts it on first use and
//! never stops it; each test then gets its own Arti state directory. No tor
//! outlives the test process: each one watches that process
//! (`__OwningControllerProcess`, polled by tor every 15 s), and a small shell
//! watchdog kills them all and removes their directory as soon as the test
//! process's end of a pipe closes, however the process ends.
//!
//! Beside the relays, [`TorNet::start_socks_client`] and
//! [`TorNet::start_onion_service`] start tors that use the network: a C-tor
//! client with a SOCKS port, an onion service's host ([`TorUser`]), with the
//! same configuration and the same cleanup as the relays.
//!
//! [`socket_owner`] and [`tcp_connections_of`] read `/proc` to tell which
//! process holds a TCP connection, so a test can prove that a connection
//! really came out of a Tor exit and not from the client.
//!
//! The exits resolve names with a DNS server of the network's own
//! ([`TorNet::exit_resolver`]), never this machine's resolver, so a test can
//! give a name that only the exits know.
//!
//! The parts: `build` lays out, keys, starts and waits for the network;
//! `config` writes the torrcs and Arti's network file; `resolver` runs the
//! exits' DNS server; `lifetime` starts,
//! watches and stops tor processes by pid; `user` runs the tors that use
//! the network without relaying; `sockets` reads `/proc`.

mod build;
mod config;
mod lifetime;
mod resolver;
mod sockets;
mod user;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use arti_client::TorClientConfig;
use tempfile::TempDir;

use config::load_arti_config;
use lifetime::{is_alive, launch_tor, stop_processes, wait_child, PortTaken};
pub use resolver::ZONE as EXIT_RESOLVER_ZONE;
pub use sockets::{connections_to, socket_owner, tcp_connections_of};
pub use user::{OnionService, TorUser};

/// How many times [`TorNet::start`] picks fresh ports after one was taken.
const START_ATTEMPTS: usize = 3;
/// How long a signalled tor gets to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many lines of each notice log an error message quotes.
const LOG_TAIL_LINES: usize = 15;

/// The first line `tor --version` prints (`Tor version 0.4.8.16`), without its final full
/// stop; `None` if tor does not run.
pub fn tor_version() -> Option<String> {
    let out = std::process::Command::new("tor")
        .arg("--version")
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|line| line.trim().trim_end_matches('.').to_owned())
}

/// What part a relay plays in the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayKind {
    /// A directory authority: votes on the consensus and serves it. Never an
    /// exit.
    Authority,
    /// A relay that is never an exit (`ExitPolicy reject *:*`).
    Middle,
    /// An exit that accepts every address, 127.0.0.0/8 included.
    Exit,
}

impl RelayKind {
    /// The nickname prefix of relays of this kind.
    fn prefix(self) -> &'static str {
        match self {
            RelayKind::Authority => "auth",
            RelayKind::Middle => "middle",
            RelayKind::Exit => "exit",
        }
    }
}

/// One tor daemon of a [`TorNet`].
#[derive(Debug, Clone)]
pub struct Relay {
    /// Its nickname: `auth0`, `middle1`, `exit2`, ...
    pub nick: String,
    /// What it does in the network.
    pub kind: RelayKind,
    /// Its ORPort on 127.0.0.1.
    pub or_port: u16,
    /// Its DirPort on 127.0.0.1.
    pub dir_port: u16,
    /// The daemon's process id, from its `PidFile`.
    pub pid: u32,
    /// Its RSA identity fingerprint: 40 upper-case hex digits.
    pub fingerprint: String,
    /// Its Ed25519 identity, unpadded base64 (as in `fingerprint-ed25519`).
    pub ed_identity: String,
    /// For an authority, its v3 identity (the authority certificate's
    /// fingerprint), the key Arti trusts to sign consensuses.
    pub v3ident: Option<String>,
    /// Its `DataDirectory`, which also holds its `torrc` and `notice.log`.
    pub data_dir: PathBuf,
}

impl Relay {
    /// Its notice-level log file.
    pub fn notice_log(&self) -> PathBuf {
        self.data_dir.join("notice.log")
    }

    /// Its log of onion-service events at info level: a relay that became an introduction
    /// point logs `Received an ESTABLISH_INTRO request` there.
    pub fn rend_log(&self) -> PathBuf {
        self.data_dir.join("rend.log")
    }

    /// Its ORPort address.
    pub fn or_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.or_port))
    }

    /// Its DirPort address.
    pub fn dir_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.dir_port))
    }

    fn torrc(&self) -> PathBuf {
        self.data_dir.join("torrc")
    }
}

/// A running private Tor network; see the [module docs](self).
///
/// Dropping an owned network stops every tor (SIGTERM, then SIGKILL) and
/// waits for each to exit, then removes its directory.
#[derive(Debug)]
pub struct TorNet {
    /// Holds every relay's data directory and the network file.
    dir: TempDir,
    /// Arti's TOML configuration for this network: `[tor_network]`
    /// (authorities and fallback caches), `[path_rules]`, `[address_filter]`
    /// and `[override_net_params]`. Parses as a `TorClientConfigBuilder`.
    pub network_file: PathBuf,
    /// Every relay started so far (all of them, once `start` returns).
    relays: Vec<Relay>,
    /// Pids stopped through [`TorNet::kill`].
    killed: Mutex<HashSet<u32>>,
    /// The shell that cleans up if this process dies first.
    watchdog: Option<Child>,
    /// How long `start` took, keys and voting included.
    startup_time: Duration,
    /// The DNS server the exits resolve names with.
    resolver: resolver::ExitResolver,
}

impl TorNet {
    /// Builds a network and waits until it is usable.
    ///
    /// Blocking, for up to a few minutes in the worst case: call it from a
    /// plain thread or through `tokio::task::spawn_blocking`. If a port picked
    /// for a relay is taken before tor binds it, starts over with new ports
    /// (up to three times).
    ///
    /// # Errors
    /// If a tool is missing or fails, or the authorities do not publish a
    /// consensus listing every relay within 120 s; the message then quotes
    /// the end of every tor's notice log.
    pub fn start() -> anyhow::Result<TorNet> {
        Self::start_with_middles(build::MIDDLES)
    }

    /// [`TorNet::start`] with `middles` middle relays instead of two: for a test that kills
    /// several relays and needs the survivors to still make paths that avoid the dead ones
    /// (the consensus keeps listing a killed relay, and Tor clients keep picking it).
    ///
    /// # Errors
    /// As [`TorNet::start`].
    pub fn start_with_middles(middles: usize) -> anyhow::Result<TorNet> {
        let began = Instant::now();
        let mut attempt = 1;
        loop {
            match Self::try_start(began, middles) {
                Err(err) if err.is::<PortTaken>() && attempt < START_ATTEMPTS => {
                    tracing::warn!(%err, attempt, "a relay port was taken; retrying with new ports");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// The network shared by every test in this process, started on first
    /// use. Concurrent first callers wait for the same start; if it failed,
    /// every caller gets its error.
    ///
    /// Blocking like [`TorNet::start`]. The network is never dropped: its
    /// tors end with the test process (see the [module docs](self)). Tests
    /// sharing it must not disturb each other: use [`TorNet::kill`] only on
    /// a network of your own.
    ///
    /// # Errors
    /// The error [`TorNet::start`] returned, as text.
    pub fn shared() -> anyhow::Result<&'static TorNet> {
        static SHARED: OnceLock<Result<TorNet, String>> = OnceLock::new();
        match SHARED.get_or_init(|| TorNet::start().map_err(|err| format!("{err:#}"))) {
            Ok(net) => Ok(net),
            Err(msg) => Err(anyhow!(
                "the shared private Tor network did not start: {msg}"
            )),
        }
    }

    /// An Arti configuration for this network, loaded from
    /// [`network_file`](TorNet::network_file) exactly as a user's file
    /// would be, with its cache and state directories under `state_root`.
    ///
    /// # Errors
    /// If the file cannot be read or parsed, or the configuration does not
    /// build.
    pub fn arti_config(&self, state_root: &Path) -> anyhow::Result<TorClientConfig> {
        load_arti_config(&self.network_file, state_root)
    }

    /// A new, empty directory for one Arti client's state and cache, to
    /// pass to [`TorNet::arti_config`]. It lives as long as the network
    /// (for the shared one, until the process exits), so Arti can still
    /// flush its state while a test's runtime shuts down.
    ///
    /// # Errors
    /// If the directory cannot be created.
    pub fn new_state_root(&self) -> anyhow::Result<PathBuf> {
        Ok(tempfile::Builder::new()
            .prefix("arti-")
            .tempdir_in(self.dir.path())
            .context("creating an Arti state directory")?
            .keep())
    }

    /// The DNS server every exit, and nothing else, resolves names with: names a test adds
    /// under [`EXIT_RESOLVER_ZONE`] resolve at the exits and nowhere else. Its query count
    /// says whether an exit asked.
    pub fn exit_resolver(&self) -> &crate::dns::TestDns {
        self.resolver.dns()
    }

    /// Every relay, authorities first, then middles, then exits.
    pub fn relays(&self) -> &[Relay] {
        &self.relays
    }

    /// The exits, killed ones included.
    pub fn exits(&self) -> Vec<&Relay> {
        self.relays
            .iter()
            .filter(|relay| relay.kind == RelayKind::Exit)
            .collect()
    }

    /// The relay whose daemon has process id `pid`.
    pub fn relay_by_pid(&self, pid: u32) -> Option<&Relay> {
        self.relays.iter().find(|relay| relay.pid == pid)
    }

    /// The process ids of the tors not stopped through [`TorNet::kill`].
    pub fn tor_pids(&self) -> Vec<u32> {
        let killed = self.killed.lock().unwrap_or_else(PoisonError::into_inner);
        self.relays
            .iter()
            .map(|relay| relay.pid)
            .filter(|pid| !killed.contains(pid))
            .collect()
    }

    /// How long [`TorNet::start`] took, from nothing to a consensus listing
    /// every relay.
    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// Kills the relay with process id `pid` (SIGKILL, no goodbye to its
    /// peers) and waits until it is gone. Circuits through it break; the
    /// consensus keeps listing it.
    ///
    /// # Panics
    /// If `pid` is not one of this network's tors, or it does not exit
    /// within 10 s.
    pub fn kill(&self, pid: u32) {
        let relay = self
            .relay_by_pid(pid)
            .unwrap_or_else(|| panic!("pid {pid} is not a tor of this network"));
        self.killed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid);
        if let Err(err) = stop_processes(&[pid], "KILL") {
            panic!("could not kill {} (pid {pid}): {err:#}", relay.nick);
        }
    }

    /// Starts again the relay `nick`, stopped through [`TorNet::kill`], from its data
    /// directory: the same keys, ports and torrc, so the consensus still describes it and
    /// clients may use it again. Returns its new process id, which [`TorNet::tor_pids`] and
    /// dropping the network then cover.
    ///
    /// Blocking, for up to 30 s.
    ///
    /// # Errors
    /// If `nick` names no relay of this network or one that was not killed, or its tor does
    /// not start (say, a port of its was taken while it was down: try again later).
    pub fn restart(&mut self, nick: &str) -> anyhow::Result<u32> {
        let index = self
            .relays
            .iter()
            .position(|relay| relay.nick == nick)
            .with_context(|| format!("no relay named {nick} in this network"))?;
        let relay = self.relays[index].clone();
        let was_killed = self
            .killed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&relay.pid);
        if !was_killed || is_alive(relay.pid) {
            bail!("{nick} (pid {}) was not killed", relay.pid);
        }
        let pid = launch_tor(&relay.nick, &relay.data_dir)?;
        self.relays[index].pid = pid;
        tracing::info!(nick, pid, "relay restarted");
        Ok(pid)
    }
}

impl Drop for TorNet {
    fn drop(&mut self) {
        let pids = self.tor_pids();
        if let Err(err) = stop_processes(&pids, "TERM") {
            tracing::warn!(err = %format!("{err:#}"), "tors ignored SIGTERM; sending SIGKILL");
            if let Err(err) = stop_processes(&pids, "KILL") {
                tracing::error!(err = %format!("{err:#}"), "tors left running");
            }
        }
        // Then let the watchdog do its part: it also finds a tor whose pid
        // we never learned (a start that failed half way) by its PidFile.
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take());
            if let Err(err) = wait_child(&mut watchdog, Instant::now() + STOP_TIMEOUT) {
                tracing::warn!(err = %format!("{err:#}"), "the tor network's watchdog hung");
            }
        }
    }
}
