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
//! own TOML configuration with only the `[tor_network]`, `[path_rules]` and
//! `[address_filter]` sections, the same file a user hands shroud's client as
//! `--tor-network FILE`.
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

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::DirBuilderExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use arti_client::config::{CfgPath, TorClientConfigBuilder};
use arti_client::TorClientConfig;
use tempfile::TempDir;

/// How many relays of each kind a network has. Three exits, so a test can
/// kill one and still have a choice of two.
const SHAPE: [(RelayKind, usize); 3] = [
    (RelayKind::Authority, 3),
    (RelayKind::Middle, 2),
    (RelayKind::Exit, 3),
];
/// How long the authorities get to publish a consensus listing every relay.
const CONSENSUS_DEADLINE: Duration = Duration::from_secs(120);
/// How often the authorities' DirPorts are asked for their consensus.
const CONSENSUS_POLL: Duration = Duration::from_millis(250);
/// Connect, read and write timeout of one DirPort request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest consensus read from a DirPort (ours are a few KiB).
const MAX_CONSENSUS: u64 = 4 * 1024 * 1024;
/// How long key generation (`tor-gencert`, `tor --list-fingerprint`) may take.
const KEYGEN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `tor` may take to bind its ports and detach.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a signalled tor gets to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waited-for process is looked at.
const PROCESS_POLL: Duration = Duration::from_millis(10);
/// How many times [`TorNet::start`] picks fresh ports after one was taken.
const START_ATTEMPTS: usize = 3;
/// How many lines of each notice log an error message quotes.
const LOG_TAIL_LINES: usize = 15;

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

    fn pid_file(&self) -> PathBuf {
        self.data_dir.join("tor.pid")
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
    /// (authorities and fallback caches), `[path_rules]` and
    /// `[address_filter]`. Parses as a `TorClientConfigBuilder`.
    pub network_file: PathBuf,
    /// Every relay started so far (all of them, once `start` returns).
    relays: Vec<Relay>,
    /// Pids stopped through [`TorNet::kill`].
    killed: Mutex<HashSet<u32>>,
    /// The shell that cleans up if this process dies first.
    watchdog: Option<Child>,
    /// How long `start` took, keys and voting included.
    startup_time: Duration,
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
        let began = Instant::now();
        let mut attempt = 1;
        loop {
            match Self::try_start(began) {
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
        // The killed daemon's PidFile must not be mistaken for the new one's.
        let _absent = fs::remove_file(relay.pid_file());
        let pid = await_tor(&relay, spawn_tor(&relay)?)?;
        self.relays[index].pid = pid;
        tracing::info!(nick, pid, "relay restarted");
        Ok(pid)
    }

    /// One attempt at [`TorNet::start`], with fresh ports.
    fn try_start(began: Instant) -> anyhow::Result<TorNet> {
        let dir = tempfile::Builder::new()
            .prefix("shroud-tornet-")
            .tempdir()
            .context("creating the network's directory")?;
        let watchdog = spawn_watchdog(dir.path())?;
        let network_file = dir.path().join("tor-network.toml");
        let mut net = TorNet {
            dir,
            network_file,
            relays: Vec::new(),
            killed: Mutex::new(HashSet::new()),
            watchdog: Some(watchdog),
            startup_time: Duration::ZERO,
        };

        let mut planned = plan(net.dir.path())?;
        generate_keys(&mut planned)?;
        fs::write(&net.network_file, network_toml(&planned))
            .with_context(|| format!("writing {}", net.network_file.display()))?;
        // Fail here, not in the first test, if Arti would reject the file.
        load_arti_config(&net.network_file, &net.dir.path().join("arti-check"))
            .context("Arti rejects the generated network file")?;
        let owner = std::process::id();
        for relay in &planned {
            fs::write(relay.torrc(), torrc(relay, &planned, owner))
                .with_context(|| format!("writing the torrc of {}", relay.nick))?;
        }
        let keys_done = began.elapsed();

        // Authorities first, so the relays' first descriptor uploads find
        // them listening; each group all at once.
        let (authorities, others) = planned
            .into_iter()
            .partition(|relay| relay.kind == RelayKind::Authority);
        for group in [authorities, others] {
            net.launch(group)?;
        }
        let launched = began.elapsed();

        net.wait_for_consensus()?;
        net.startup_time = began.elapsed();
        tracing::info!(
            ?keys_done,
            ?launched,
            ready = ?net.startup_time,
            dir = %net.dir.path().display(),
            "private Tor network ready"
        );
        Ok(net)
    }

    /// Starts the tors of `group` together and records each one that came
    /// up; fails with the first failure once all have been waited for.
    fn launch(&mut self, group: Vec<Relay>) -> anyhow::Result<()> {
        let mut spawned = Vec::new();
        let mut failure = None;
        for relay in group {
            match spawn_tor(&relay) {
                Ok(child) => spawned.push((relay, child)),
                Err(err) => failure = failure.or(Some(err)),
            }
        }
        for (relay, child) in spawned {
            match await_tor(&relay, child) {
                Ok(pid) => self.relays.push(Relay { pid, ..relay }),
                // A taken port is worth a retry only if nothing else failed.
                Err(err) if failure.as_ref().is_some_and(|f| f.is::<PortTaken>()) => {
                    failure = Some(err);
                }
                Err(err) => failure = failure.or(Some(err)),
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Waits until every authority serves a consensus listing every relay.
    fn wait_for_consensus(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + CONSENSUS_DEADLINE;
        let authorities: Vec<&Relay> = self
            .relays
            .iter()
            .filter(|relay| relay.kind == RelayKind::Authority)
            .collect();
        let want = self.relays.len();
        let mut seen = vec![String::from("not asked yet"); authorities.len()];
        loop {
            let mut all_ready = true;
            for (auth, seen) in authorities.iter().zip(&mut seen) {
                match consensus_relay_count(auth.dir_addr()) {
                    Ok(count) => {
                        all_ready &= count == want;
                        *seen = format!("lists {count} of {want} relays");
                    }
                    Err(err) => {
                        all_ready = false;
                        *seen = format!("{err:#}");
                    }
                }
            }
            if all_ready {
                return Ok(());
            }
            if let Some(dead) = self.relays.iter().find(|relay| !is_alive(relay.pid)) {
                bail!(
                    "{} (pid {}) exited while waiting for the consensus\n{}",
                    dead.nick,
                    dead.pid,
                    self.log_tails()
                );
            }
            if Instant::now() >= deadline {
                let mut report = String::new();
                for (auth, seen) in authorities.iter().zip(&seen) {
                    let _ = writeln!(report, "  {}: {seen}", auth.nick);
                }
                bail!(
                    "no consensus listing all {want} relays within {CONSENSUS_DEADLINE:?}:\n\
                     {report}{}",
                    self.log_tails()
                );
            }
            thread::sleep(CONSENSUS_POLL);
        }
    }

    /// The last lines of every relay's notice log, for error messages.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        for relay in &self.relays {
            let _ = writeln!(
                out,
                "--- {} (pid {}), {}:\n{}",
                relay.nick,
                relay.pid,
                relay.notice_log().display(),
                tail(&relay.notice_log(), LOG_TAIL_LINES)
            );
        }
        out
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

/// Lays out the relays of one network under `root`: nicknames, free ports,
/// data directories. Pids and identities are filled in later.
fn plan(root: &Path) -> anyhow::Result<Vec<Relay>> {
    let count: usize = SHAPE.iter().map(|(_, n)| n).sum();
    let mut ports = free_ports(2 * count)?.into_iter();
    let mut relays = Vec::with_capacity(count);
    for (kind, n) in SHAPE {
        for i in 0..n {
            let nick = format!("{}{i}", kind.prefix());
            let data_dir = root.join(&nick);
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            let (Some(or_port), Some(dir_port)) = (ports.next(), ports.next()) else {
                bail!("ran out of ports");
            };
            relays.push(Relay {
                nick,
                kind,
                or_port,
                dir_port,
                pid: 0,
                fingerprint: String::new(),
                ed_identity: String::new(),
                v3ident: None,
                data_dir,
            });
        }
    }
    Ok(relays)
}

/// `n` distinct ports that were free a moment ago on 127.0.0.1.
///
/// They are released before tor binds them, so another process may take
/// one first; [`launch`] reports that as [`PortTaken`].
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    // Hold every listener until all are bound, so the ports are distinct.
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("binding 127.0.0.1:0 to find free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Creates every relay's identity keys (and the authorities' v3 keys), all
/// at once, and records the identities in `relays`.
fn generate_keys(relays: &mut [Relay]) -> anyhow::Result<()> {
    let mut jobs = Vec::new();
    for relay in relays.iter() {
        let log = |name: &str| -> anyhow::Result<Stdio> {
            let path = relay.data_dir.join(name);
            Ok(fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?
                .into())
        };
        if relay.kind == RelayKind::Authority {
            let keys = relay.data_dir.join("keys");
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&keys)
                .with_context(|| format!("creating {}", keys.display()))?;
            let mut cmd = Command::new("tor-gencert");
            cmd.current_dir(&keys)
                .args(["--create-identity-key", "--passphrase-fd", "0", "-m", "12"])
                .arg("-a")
                .arg(relay.dir_addr().to_string())
                // An empty passphrase: stdin at EOF.
                .stdin(Stdio::null())
                .stdout(log("gencert.log")?)
                .stderr(log("gencert.err")?);
            jobs.push((format!("tor-gencert for {}", relay.nick), cmd));
        }
        let mut cmd = Command::new("tor");
        cmd.args(["--list-fingerprint", "--orport", "1", "--datadirectory"])
            .arg(&relay.data_dir)
            .stdin(Stdio::null())
            .stdout(log("fingerprint.log")?)
            .stderr(log("fingerprint.err")?);
        jobs.push((format!("tor --list-fingerprint for {}", relay.nick), cmd));
    }

    let mut children = Vec::new();
    for (what, mut cmd) in jobs {
        let child = cmd
            .spawn()
            .with_context(|| format!("running {what} (is tor installed?)"))?;
        children.push((what, child));
    }
    let deadline = Instant::now() + KEYGEN_TIMEOUT;
    let mut failure = None;
    for (what, mut child) in children {
        match wait_child(&mut child, deadline) {
            Ok(status) if status.success() => {}
            Ok(status) => failure = failure.or(Some(anyhow!("{what} failed: {status}"))),
            Err(err) => failure = failure.or(Some(err.context(what))),
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }

    for relay in relays.iter_mut() {
        relay.fingerprint = second_word(&relay.data_dir.join("fingerprint"))?;
        relay.ed_identity = second_word(&relay.data_dir.join("fingerprint-ed25519"))?;
        if relay.kind == RelayKind::Authority {
            let cert_path = relay.data_dir.join("keys/authority_certificate");
            let cert = fs::read_to_string(&cert_path)
                .with_context(|| format!("reading {}", cert_path.display()))?;
            let v3ident = cert
                .lines()
                .find_map(|line| line.strip_prefix("fingerprint "))
                .with_context(|| format!("no fingerprint line in {}", cert_path.display()))?;
            relay.v3ident = Some(v3ident.trim().to_owned());
        }
    }
    Ok(())
}

/// The second whitespace-separated word of a `NICK VALUE` file.
fn second_word(path: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("{} is not `NICK VALUE`", path.display()))
}

/// Arti's TOML configuration for a network of `relays`.
fn network_toml(relays: &[Relay]) -> String {
    let authorities: Vec<&Relay> = relays
        .iter()
        .filter(|relay| relay.kind == RelayKind::Authority)
        .collect();
    let quoted = |items: Vec<String>| -> String {
        let items: Vec<String> = items.into_iter().map(|s| format!("\"{s}\"")).collect();
        items.join(", ")
    };
    let dir_ports = || -> String {
        let lists: Vec<String> = authorities
            .iter()
            .map(|auth| format!("[\"{}\"]", auth.dir_addr()))
            .collect();
        lists.join(", ")
    };

    let mut out = String::from(
        "# Arti configuration for a private Tor network on 127.0.0.1, made by\n\
         # shroud-tests' tornet module. Load it as Arti's own TOML configuration\n\
         # (a TorClientConfigBuilder), then set storage.cache_dir and state_dir.\n\n",
    );
    let v3idents = authorities
        .iter()
        .filter_map(|auth| auth.v3ident.clone())
        .collect();
    let _ = writeln!(out, "[tor_network.authorities]");
    let _ = writeln!(out, "v3idents = [{}]", quoted(v3idents));
    for field in ["uploads", "downloads", "votes"] {
        let _ = writeln!(out, "{field} = [{}]", dir_ports());
    }
    for auth in &authorities {
        let _ = write!(
            out,
            "\n[[tor_network.fallback_caches]]\n\
             rsa_identity = \"{}\"\n\
             ed_identity = \"{}\"\n\
             orports = [\"{}\"]\n",
            auth.fingerprint,
            auth.ed_identity,
            auth.or_addr()
        );
    }
    out.push_str(
        "\n# Every relay is on 127.0.0.1: without these, all count as one family.\n\
         [path_rules]\n\
         ipv4_subnet_family_prefix = 33\n\
         ipv6_subnet_family_prefix = 129\n\
         \n\
         [address_filter]\n\
         allow_local_addrs = true\n",
    );
    out
}

/// Reads an Arti network file as Arti's own configuration and gives it
/// fresh storage under `state_root`.
fn load_arti_config(network_file: &Path, state_root: &Path) -> anyhow::Result<TorClientConfig> {
    let text = fs::read_to_string(network_file)
        .with_context(|| format!("reading {}", network_file.display()))?;
    let mut builder: TorClientConfigBuilder = toml::from_str(&text)
        .with_context(|| format!("parsing {} as Arti config", network_file.display()))?;
    builder
        .storage()
        .cache_dir(CfgPath::new_literal(state_root.join("cache")))
        .state_dir(CfgPath::new_literal(state_root.join("state")));
    builder
        .build()
        .with_context(|| format!("building an Arti config from {}", network_file.display()))
}

/// The torrc of `relay` in a network of `all`, owned by process `owner`.
fn torrc(relay: &Relay, all: &[Relay], owner: u32) -> String {
    let dir = relay.data_dir.display();
    // Only non-exits are voted Guard, as exits, being scarce, seldom are on the real network.
    // That keeps each exit in the one position: killing the exit of one tunnel's circuit
    // then touches no other circuit.
    let guards = all
        .iter()
        .filter(|r| r.kind != RelayKind::Exit)
        .map(|r| r.nick.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut rc = format!(
        "Nickname {nick}\n\
         DataDirectory {dir}\n\
         RunAsDaemon 1\n\
         PidFile {pid_file}\n\
         Log notice file {log}\n\
         SafeLogging 0\n\
         __OwningControllerProcess {owner}\n\
         TestingTorNetwork 1\n\
         PathsNeededToBuildCircuits 0.67\n\
         TestingDirAuthVoteExit *\n\
         TestingDirAuthVoteHSDir *\n\
         TestingDirAuthVoteGuard {guards}\n\
         TestingMinExitFlagThreshold 0\n\
         V3AuthNIntervalsValid 2\n\
         SocksPort 0\n\
         ORPort 127.0.0.1:{or_port}\n\
         DirPort 127.0.0.1:{dir_port}\n\
         Address 127.0.0.1\n\
         AssumeReachable 1\n\
         ServerDNSDetectHijacking 0\n\
         ServerDNSTestAddresses\n",
        nick = relay.nick,
        guards = guards,
        pid_file = relay.pid_file().display(),
        log = relay.notice_log().display(),
        or_port = relay.or_port,
        dir_port = relay.dir_port,
    );
    for auth in all.iter().filter(|r| r.kind == RelayKind::Authority) {
        let _ = writeln!(
            rc,
            "DirAuthority {} orport={} no-v2 v3ident={} 127.0.0.1:{} {}",
            auth.nick,
            auth.or_port,
            auth.v3ident.as_deref().unwrap_or_default(),
            auth.dir_port,
            auth.fingerprint
        );
    }
    match relay.kind {
        RelayKind::Authority => rc.push_str(
            "ExitPolicy reject *:*\n\
             AuthoritativeDirectory 1\n\
             V3AuthoritativeDirectory 1\n\
             V3AuthVotingInterval 20\n\
             V3AuthVoteDelay 4\n\
             V3AuthDistDelay 4\n\
             TestingV3AuthInitialVotingInterval 20\n\
             TestingV3AuthInitialVoteDelay 4\n\
             TestingV3AuthInitialDistDelay 4\n\
             TestingV3AuthVotingStartOffset 0\n",
        ),
        RelayKind::Middle => rc.push_str("ExitPolicy reject *:*\n"),
        // A policy accepting only private addresses looks reject-all to
        // clients (summaries ignore private ranges), hence `accept *:*`.
        RelayKind::Exit => rc.push_str(
            "ExitRelay 1\n\
             RefuseUnknownExits 0\n\
             ExitPolicyRejectPrivate 0\n\
             ExitPolicyRejectLocalInterfaces 0\n\
             ExitPolicy accept 127.0.0.0/8:*\n\
             ExitPolicy accept *:*\n",
        ),
    }
    rc
}

/// A port tor could not bind because someone took it after [`free_ports`].
#[derive(Debug)]
struct PortTaken(String);

impl std::fmt::Display for PortTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for PortTaken {}

/// Starts `relay`'s tor. The process we spawn forks the daemon and exits:
/// with `RunAsDaemon 1` it exits only once the daemon has bound its ports,
/// with status 0, or 1 if it failed; see [`await_tor`].
fn spawn_tor(relay: &Relay) -> anyhow::Result<Child> {
    let out_path = relay.data_dir.join("launch.log");
    let out =
        fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let err = out.try_clone().context("duplicating a file handle")?;
    Command::new("tor")
        .arg("-f")
        .arg(relay.torrc())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("running tor (is it installed?)")
}

/// Waits for the launcher [`spawn_tor`] started and returns the daemon's
/// pid, read from its `PidFile`.
fn await_tor(relay: &Relay, mut child: Child) -> anyhow::Result<u32> {
    let out_path = relay.data_dir.join("launch.log");
    let status = wait_child(&mut child, Instant::now() + LAUNCH_TIMEOUT)
        .with_context(|| format!("starting {}", relay.nick))?;
    if !status.success() {
        let output = tail(&out_path, LOG_TAIL_LINES);
        let msg = format!(
            "tor for {} failed to start ({status}):\n{output}",
            relay.nick
        );
        if output.contains("Could not bind") || output.contains("Address already in use") {
            return Err(PortTaken(msg).into());
        }
        bail!(msg);
    }
    // The daemon may write its PidFile just after the launcher exits.
    let deadline = Instant::now() + LAUNCH_TIMEOUT;
    loop {
        let pid_text = fs::read_to_string(relay.pid_file()).unwrap_or_default();
        if let Ok(pid) = pid_text.trim().parse() {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            bail!(
                "tor for {} wrote no pid to {} within {LAUNCH_TIMEOUT:?} (it has {pid_text:?})",
                relay.nick,
                relay.pid_file().display()
            );
        }
        thread::sleep(PROCESS_POLL);
    }
}

/// Starts the shell that kills this network's tors and deletes `root` once
/// this process is gone (the write end of its stdin closes when this
/// process exits, however it exits). It runs in its own process group, so a
/// Ctrl-C meant for the tests does not stop it before it has cleaned up.
fn spawn_watchdog(root: &Path) -> anyhow::Result<Child> {
    // Only builtins until the kill, and all pids in one kill, so the tors
    // are gone within milliseconds of the test process. A pid is signalled
    // only if it is still a `tor`.
    const SCRIPT: &str = r#"
trap '' INT HUP
read -r _ignored
pids=
for f in "$1"/*/tor.pid; do
    [ -f "$f" ] || continue
    pid= comm=
    { read -r pid < "$f"; read -r comm < "/proc/$pid/comm"; } 2>/dev/null
    [ "$comm" = tor ] && pids="$pids $pid"
done
[ -n "$pids" ] && kill -9 $pids 2>/dev/null
i=0
while [ $i -lt 100 ]; do
    alive=
    for pid in $pids; do
        state=$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)
        [ -n "$state" ] && [ "$state" != Z ] && alive=1
    done
    [ -z "$alive" ] && break
    sleep 0.05
    i=$((i + 1))
done
rm -rf "$1"
"#;
    Command::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("shroud-tornet-watchdog")
        .arg(root)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the tor network's watchdog shell")
}

/// Waits for `child` until `deadline`, killing it if it is still running.
fn wait_child(child: &mut Child, deadline: Instant) -> anyhow::Result<std::process::ExitStatus> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            // Best effort: it is our own child, and we are failing anyway.
            let _killed = child.kill();
            let _reaped = child.wait();
            bail!("pid {} did not finish in time; killed it", child.id());
        }
        thread::sleep(PROCESS_POLL);
    }
}

/// Sends `signal` (a `kill -SIGNAL` name) to each of `pids` that is still a
/// live tor, and waits up to [`STOP_TIMEOUT`] for all of them to be gone.
fn stop_processes(pids: &[u32], signal: &str) -> anyhow::Result<()> {
    for &pid in pids {
        if !is_alive(pid) || !is_tor(pid) {
            continue;
        }
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running kill")?;
        // Failure means it exited meanwhile; the wait below checks anyway.
        tracing::debug!(pid, signal, %status, "signalled tor");
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|&pid| is_alive(pid)).collect();
        if alive.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("pids {alive:?} still running {STOP_TIMEOUT:?} after SIG{signal}");
        }
        thread::sleep(PROCESS_POLL);
    }
}

/// Whether `pid` is a running process (a zombie counts as gone: tor's
/// daemons are not our children, and whoever reaps them may take a while).
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `PID (COMM) STATE ...`; COMM may contain anything, so split at the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

/// Whether `pid` is a process named `tor` (guards against signalling a
/// recycled pid).
fn is_tor(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "tor")
}

/// How many relays the microdesc consensus served at `dir` lists.
fn consensus_relay_count(dir: SocketAddr) -> anyhow::Result<usize> {
    let mut stream = TcpStream::connect_timeout(&dir, HTTP_TIMEOUT).context("connecting")?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    stream.write_all(
        b"GET /tor/status-vote/current/consensus-microdesc HTTP/1.0\r\n\
          Host: 127.0.0.1\r\n\r\n",
    )?;
    let mut response = Vec::new();
    stream
        .take(MAX_CONSENSUS)
        .read_to_end(&mut response)
        .context("reading the response")?;
    let text = String::from_utf8_lossy(&response);
    let status = text.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("no consensus yet ({})", status.trim());
    }
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    Ok(body.lines().filter(|line| line.starts_with("r ")).count())
}

/// The last `n` lines of the file at `path`, or why it could not be read.
fn tail(path: &Path, n: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug)]
struct TcpSocket {
    local: SocketAddr,
    remote: SocketAddr,
    established: bool,
    inode: u64,
}

/// Every TCP socket of this network namespace, IPv4 and IPv6.
fn tcp_sockets() -> Vec<TcpSocket> {
    let mut sockets = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        // No tcp6 table means no IPv6; nothing to list.
        let Ok(table) = fs::read_to_string(path) else {
            continue;
        };
        sockets.extend(
            table
                .lines()
                .skip(1)
                .filter_map(|line| parse_tcp_row(line, v6)),
        );
    }
    sockets
}

/// Parses `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn parse_tcp_row(line: &str, v6: bool) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some(TcpSocket {
        local: parse_proc_addr(fields.get(1)?, v6)?,
        remote: parse_proc_addr(fields.get(2)?, v6)?,
        // 01 is TCP_ESTABLISHED.
        established: *fields.get(3)? == "01",
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// Parses `0100007F:1F90`: the address as the kernel's 32-bit words in
/// native byte order, each printed as hex; the port as plain hex.
fn parse_proc_addr(field: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = if v6 {
        let octets: [u8; 16] = bytes.try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        let octets: [u8; 4] = bytes.try_into().ok()?;
        IpAddr::V4(Ipv4Addr::from(octets))
    };
    Some(unmapped(SocketAddr::new(ip, port)))
}

/// `addr` with an IPv4-mapped IPv6 address turned into plain IPv4, so
/// sockets of dual-stack listeners compare equal to what peers report.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The inodes of the sockets process `pid` has open (empty if it is gone
/// or not ours to inspect).
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.filter_map(|fd| {
        let target = fs::read_link(fd.ok()?.path()).ok()?;
        let target = target.to_str()?;
        target
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

/// The process that holds the TCP connection from `local` to `remote`, if any
/// process we may inspect does.
///
/// Both ends are needed: Linux reuses an ephemeral port for connections to
/// different destinations, so on a busy loopback (a Tor network's relays
/// talking among themselves) a local address alone can name several sockets
/// of several processes.
///
/// Reads `/proc/net/tcp{,6}` for the socket's inode, then every
/// `/proc/PID/fd` for a link to `socket:[INODE]`.
pub fn socket_owner(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let (local, remote) = (unmapped(local), unmapped(remote));
    let inodes: HashSet<u64> = tcp_sockets()
        .into_iter()
        // Inode 0: a socket no process holds any more (TIME_WAIT).
        .filter(|socket| socket.local == local && socket.remote == remote && socket.inode != 0)
        .map(|socket| socket.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| !socket_inodes(pid).is_disjoint(&inodes))
}

/// The established TCP connections of process `pid`, as (local, remote)
/// address pairs. Empty if the process is gone or not ours to inspect.
pub fn tcp_connections_of(pid: u32) -> Vec<(SocketAddr, SocketAddr)> {
    let inodes = socket_inodes(pid);
    if inodes.is_empty() {
        return Vec::new();
    }
    tcp_sockets()
        .into_iter()
        .filter(|socket| socket.established && inodes.contains(&socket.inode))
        .map(|socket| (socket.local, socket.remote))
        .collect()
}

/// How long a [`TorUser`] may take to bootstrap (it needs the consensus and
/// one circuit).
const USER_BOOTSTRAP_DEADLINE: Duration = Duration::from_secs(90);
/// How often a [`TorUser`]'s logs are read while waiting on it.
const USER_LOG_POLL: Duration = Duration::from_millis(50);

/// A tor that uses a [`TorNet`] without being one of its relays: a client
/// with a SOCKS port ([`TorNet::start_socks_client`]) or the host of an onion
/// service ([`TorNet::start_onion_service`]).
///
/// It runs with the relays' DirAuthority lines and `TestingTorNetwork`
/// options, so it only ever talks to this network, and under the same
/// lifetime rules: it watches this process (`__OwningControllerProcess`),
/// its `tor.pid` sits in the network's directory where the watchdog finds
/// it, and dropping the handle stops it by pid (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct TorUser {
    /// Its name, which is also its directory's name in the network's.
    pub nick: String,
    /// The daemon's process id, from its `PidFile`.
    pub pid: u32,
    /// Its `DataDirectory`, holding its `torrc` and `notice.log`.
    pub data_dir: PathBuf,
    /// Its SOCKS port on 127.0.0.1, if it has one.
    pub socks: Option<SocketAddr>,
    /// When its process was started.
    pub started: Instant,
    /// From starting the process to `Bootstrapped 100%` in its log.
    pub bootstrap_time: Duration,
    /// Set once [`TorUser::stop`] has stopped it.
    stopped: bool,
}

impl TorUser {
    /// Its notice-level log file.
    pub fn notice_log(&self) -> PathBuf {
        self.data_dir.join("notice.log")
    }

    /// Stops the daemon by pid: SIGTERM, then SIGKILL if it lingers, and
    /// waits until it is gone. Blocking, for up to 20 s.
    ///
    /// # Errors
    /// If it is still running after SIGKILL.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        if let Err(err) = stop_processes(&[self.pid], "TERM") {
            tracing::warn!(err = %format!("{err:#}"), nick = %self.nick, "tor ignored SIGTERM");
            stop_processes(&[self.pid], "KILL")
                .with_context(|| format!("stopping {} (pid {})", self.nick, self.pid))?;
        }
        self.stopped = true;
        Ok(())
    }
}

impl Drop for TorUser {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::error!(err = %format!("{err:#}"), nick = %self.nick, "tor left running");
        }
    }
}

/// A C-tor onion service on a [`TorNet`], from
/// [`TorNet::start_onion_service`].
#[derive(Debug)]
pub struct OnionService {
    /// The tor hosting it; it has no SOCKS port.
    pub tor: TorUser,
    /// The service's address: 56 base32 characters and `.onion`.
    pub hostname: String,
}

impl OnionService {
    /// The service's info-level log, where tor reports descriptor uploads.
    pub fn info_log(&self) -> PathBuf {
        self.tor.data_dir.join("info.log")
    }

    /// Waits until the service has uploaded its descriptor: at least one
    /// HSDir accepted it and every upload launched so far has been answered.
    /// Returns how long after the tor started that was seen (polled every
    /// 50 ms). Blocking.
    ///
    /// # Errors
    /// If that does not happen within `limit`, or the tor exits.
    pub fn wait_published(&self, limit: Duration) -> anyhow::Result<Duration> {
        let deadline = Instant::now() + limit;
        loop {
            let log = fs::read_to_string(self.info_log()).unwrap_or_default();
            let launched = log.matches("initiated upload request").count();
            let accepted = log
                .matches("Uploading hidden service descriptor: finished with status 200")
                .count();
            let refused = log
                .matches("Uploading hidden service descriptor: http status")
                .count();
            if accepted > 0 && accepted + refused >= launched {
                return Ok(self.tor.started.elapsed());
            }
            if !is_alive(self.tor.pid) {
                bail!(
                    "onion service tor {} (pid {}) exited:\n{}",
                    self.tor.nick,
                    self.tor.pid,
                    tail(&self.tor.notice_log(), LOG_TAIL_LINES)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "onion service {} did not publish its descriptor within {limit:?} \
                     ({launched} uploads launched, {accepted} accepted, {refused} refused):\n{}",
                    self.tor.nick,
                    tail(&self.tor.notice_log(), LOG_TAIL_LINES)
                );
            }
            thread::sleep(USER_LOG_POLL);
        }
    }
}

impl TorNet {
    /// Starts a C-tor client on this network with a SOCKS port on
    /// 127.0.0.1 (`IsolateSOCKSAuth` on, as by default, and
    /// `ExtendedErrors`, so onion failures come back as Tor's own SOCKS
    /// codes), and waits until it has bootstrapped.
    ///
    /// Blocking, for up to 90 s. `nick` names its directory under the
    /// network's and must be unused.
    ///
    /// # Errors
    /// If tor fails to start or does not bootstrap in time.
    pub fn start_socks_client(&self, nick: &str) -> anyhow::Result<TorUser> {
        self.start_tor_user(nick, true, "")
    }

    /// Starts a C-tor onion service on this network that forwards its
    /// `virtual_port` to `target`, and waits until that tor has
    /// bootstrapped. The descriptor is published some seconds later:
    /// [`OnionService::wait_published`]. The tor has no SOCKS port.
    ///
    /// Blocking, for up to 90 s. `nick` names its directory under the
    /// network's and must be unused.
    ///
    /// # Errors
    /// If tor fails to start or bootstrap, or writes no onion address.
    pub fn start_onion_service(
        &self,
        nick: &str,
        virtual_port: u16,
        target: SocketAddr,
    ) -> anyhow::Result<OnionService> {
        let data_dir = self.dir.path().join(nick);
        let extra = format!(
            "HiddenServiceDir {hs}\n\
             HiddenServicePort {virtual_port} {target}\n\
             Log info file {info}\n",
            hs = data_dir.join("hs").display(),
            info = data_dir.join("info.log").display(),
        );
        let tor = self.start_tor_user(nick, false, &extra)?;
        let hostname_file = tor.data_dir.join("hs/hostname");
        let hostname = fs::read_to_string(&hostname_file)
            .with_context(|| format!("reading {}", hostname_file.display()))?
            .trim()
            .to_owned();
        if !hostname.ends_with(".onion") {
            bail!("{} holds {hostname:?}", hostname_file.display());
        }
        Ok(OnionService { tor, hostname })
    }

    /// Starts a tor that uses this network without relaying, with a SOCKS
    /// port on a free 127.0.0.1 port if `socks`, and `extra` appended to its
    /// torrc; waits until it has bootstrapped. Retries with a new port (up
    /// to three times) if its port was taken.
    ///
    /// # Errors
    /// If tor fails to start or does not bootstrap within 90 s; the message
    /// quotes its log.
    pub fn start_tor_user(&self, nick: &str, socks: bool, extra: &str) -> anyhow::Result<TorUser> {
        let data_dir = self.dir.path().join(nick);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut attempt = 1;
        loop {
            let port = if socks {
                free_ports(1)?.first().copied()
            } else {
                None
            };
            let socks_addr = port.map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
            let torrc = user_torrc(
                &data_dir,
                socks_addr,
                &self.relays,
                std::process::id(),
                extra,
            );
            let torrc_path = data_dir.join("torrc");
            fs::write(&torrc_path, torrc)
                .with_context(|| format!("writing {}", torrc_path.display()))?;
            let started = Instant::now();
            match launch_user_tor(nick, &data_dir) {
                Ok(pid) => {
                    let mut user = TorUser {
                        nick: nick.to_owned(),
                        pid,
                        data_dir,
                        socks: socks_addr,
                        started,
                        bootstrap_time: Duration::ZERO,
                        stopped: false,
                    };
                    // On error, dropping `user` stops the tor.
                    wait_bootstrapped(&user)?;
                    user.bootstrap_time = started.elapsed();
                    tracing::info!(nick, pid, socks = ?socks_addr, took = ?user.bootstrap_time,
                        "extra tor bootstrapped");
                    return Ok(user);
                }
                Err(err) if err.is::<PortTaken>() && attempt < START_ATTEMPTS => {
                    tracing::warn!(%err, attempt, nick, "a SOCKS port was taken; retrying");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// The torrc of a tor that uses a network of `all` relays without relaying:
/// the relays' DirAuthority lines and testing options, no ORPort or DirPort.
fn user_torrc(
    data_dir: &Path,
    socks: Option<SocketAddr>,
    all: &[Relay],
    owner: u32,
    extra: &str,
) -> String {
    let dir = data_dir.display();
    let mut rc = format!(
        "DataDirectory {dir}\n\
         RunAsDaemon 1\n\
         PidFile {dir}/tor.pid\n\
         Log notice file {dir}/notice.log\n\
         SafeLogging 0\n\
         __OwningControllerProcess {owner}\n\
         TestingTorNetwork 1\n\
         PathsNeededToBuildCircuits 0.67\n\
         TestingDirAuthVoteExit *\n\
         TestingDirAuthVoteHSDir *\n\
         TestingDirAuthVoteGuard *\n\
         TestingMinExitFlagThreshold 0\n\
         V3AuthNIntervalsValid 2\n\
         ClientOnly 1\n"
    );
    match socks {
        Some(addr) => {
            let _ = writeln!(rc, "SocksPort {addr} ExtendedErrors");
        }
        None => rc.push_str("SocksPort 0\n"),
    }
    for auth in all.iter().filter(|r| r.kind == RelayKind::Authority) {
        let _ = writeln!(
            rc,
            "DirAuthority {} orport={} no-v2 v3ident={} 127.0.0.1:{} {}",
            auth.nick,
            auth.or_port,
            auth.v3ident.as_deref().unwrap_or_default(),
            auth.dir_port,
            auth.fingerprint
        );
    }
    rc.push_str(extra);
    rc
}

/// Starts the tor whose torrc is in `data_dir` and returns the daemon's pid
/// (from its `PidFile`) once it has bound its ports and detached.
fn launch_user_tor(nick: &str, data_dir: &Path) -> anyhow::Result<u32> {
    let out_path = data_dir.join("launch.log");
    let out =
        fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let err = out.try_clone().context("duplicating a file handle")?;
    let pid_file = data_dir.join("tor.pid");
    // A pid file left by an earlier attempt must not be mistaken for this one's.
    let _absent = fs::remove_file(&pid_file);
    let mut child = Command::new("tor")
        .arg("-f")
        .arg(data_dir.join("torrc"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("running tor (is it installed?)")?;
    let status = wait_child(&mut child, Instant::now() + LAUNCH_TIMEOUT)
        .with_context(|| format!("starting {nick}"))?;
    if !status.success() {
        let output = tail(&out_path, LOG_TAIL_LINES);
        let msg = format!("tor for {nick} failed to start ({status}):\n{output}");
        if output.contains("Could not bind") || output.contains("Address already in use") {
            return Err(PortTaken(msg).into());
        }
        bail!(msg);
    }
    let deadline = Instant::now() + LAUNCH_TIMEOUT;
    loop {
        let pid_text = fs::read_to_string(&pid_file).unwrap_or_default();
        if let Ok(pid) = pid_text.trim().parse() {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            bail!(
                "tor for {nick} wrote no pid to {} within {LAUNCH_TIMEOUT:?}",
                pid_file.display()
            );
        }
        thread::sleep(PROCESS_POLL);
    }
}

/// Waits until `user`'s notice log says `Bootstrapped 100%`.
fn wait_bootstrapped(user: &TorUser) -> anyhow::Result<()> {
    let deadline = Instant::now() + USER_BOOTSTRAP_DEADLINE;
    loop {
        let log = fs::read_to_string(user.notice_log()).unwrap_or_default();
        if log.contains("Bootstrapped 100%") {
            return Ok(());
        }
        if !is_alive(user.pid) {
            bail!(
                "{} (pid {}) exited while bootstrapping:\n{}",
                user.nick,
                user.pid,
                tail(&user.notice_log(), LOG_TAIL_LINES)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not bootstrap within {USER_BOOTSTRAP_DEADLINE:?}:\n{}",
                user.nick,
                tail(&user.notice_log(), LOG_TAIL_LINES)
            );
        }
        thread::sleep(USER_LOG_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_rows() {
        let v4 = "   0: 0100007F:1F90 0200007F:A2C4 01 00000000:00000000 00:00000000 \
                  00000000  1000        0 12345 1 0000000000000000 20 4 30 10 -1";
        let row = parse_tcp_row(v4, false).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(row.local, "127.0.0.1:8080".parse().unwrap());
            assert_eq!(row.remote, "127.0.0.2:41668".parse().unwrap());
        }
        assert!(row.established);
        assert_eq!(row.inode, 12345);

        let mapped = "   1: 0000000000000000FFFF00000100007F:0050 \
                      00000000000000000000000000000000:0000 0A 00000000:00000000 \
                      00:00000000 00000000  1000        0 777 1 0000000000000000 100 0 0 10 0";
        let row = parse_tcp_row(mapped, true).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(row.local, "127.0.0.1:80".parse().unwrap());
        }
        assert!(!row.established);
    }
}
