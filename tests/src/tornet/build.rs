//! Building a network: relays laid out on free ports, their keys made, their tors
//! started (authorities first), and the wait for a consensus that lists them all.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::ports::free_port_list;

use super::config::{self, load_arti_config, network_toml, torrc};
use super::lifetime::{
    await_tor, is_alive, spawn_tor, spawn_watchdog, tail, wait_child, PortTaken,
};
use super::{Relay, RelayKind, TorNet, LOG_TAIL_LINES};

/// How many authorities a network has.
const AUTHORITIES: usize = 3;
/// How many middle relays a network has unless told otherwise.
pub(super) const MIDDLES: usize = 2;
/// How many exits a network has: three, so a test can kill one and still have a choice of
/// two.
const EXITS: usize = 3;
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

impl TorNet {
    /// One attempt at [`TorNet::start`], with fresh ports.
    pub(super) fn try_start(began: Instant, middles: usize) -> anyhow::Result<TorNet> {
        let dir = tempfile::Builder::new()
            .prefix("shroud-tornet-")
            .tempdir()
            .context("creating the network's directory")?;
        let watchdog = spawn_watchdog(dir.path())?;
        let network_file = dir.path().join("tor-network.toml");
        let resolv_conf = dir.path().join("exits-resolv.conf");
        let resolver = super::resolver::ExitResolver::start(&resolv_conf)?;
        let mut net = TorNet {
            dir,
            network_file,
            relays: Vec::new(),
            killed: Mutex::new(HashSet::new()),
            watchdog: Some(watchdog),
            startup_time: Duration::ZERO,
            resolver,
        };

        let mut planned = plan(net.dir.path(), middles)?;
        generate_keys(&mut planned)?;
        fs::write(&net.network_file, network_toml(&planned))
            .with_context(|| format!("writing {}", net.network_file.display()))?;
        // Fail here, not in the first test, if Arti would reject the file.
        load_arti_config(&net.network_file, &net.dir.path().join("arti-check"))
            .context("Arti rejects the generated network file")?;
        let owner = std::process::id();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs();
        let file = config::bandwidth_file(&planned, now);
        for relay in planned.iter().filter(|r| r.kind == RelayKind::Authority) {
            let path = relay.data_dir.join(config::BANDWIDTHS);
            fs::write(&path, &file).with_context(|| format!("writing {}", path.display()))?;
        }
        for relay in &planned {
            fs::write(relay.torrc(), torrc(relay, &planned, owner, &resolv_conf))
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
            match spawn_tor(&relay.data_dir) {
                Ok(child) => spawned.push((relay, child)),
                Err(err) => failure = failure.or(Some(err)),
            }
        }
        for (relay, child) in spawned {
            match await_tor(&relay.nick, &relay.data_dir, child) {
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

/// Lays out the relays of one network with `middles` middle relays under `root`:
/// nicknames, free ports, data directories. Pids and identities are filled in later.
fn plan(root: &Path, middles: usize) -> anyhow::Result<Vec<Relay>> {
    let shape = [
        (RelayKind::Authority, AUTHORITIES),
        (RelayKind::Middle, middles),
        (RelayKind::Exit, EXITS),
    ];
    let count = AUTHORITIES + middles + EXITS;
    // An ORPort and a DirPort each. One another process takes before tor binds it makes
    // await_tor fail with PortTaken, and TorNet::start try again.
    let mut ports = free_port_list(2 * count)?.into_iter();
    let mut relays = Vec::with_capacity(count);
    for (kind, n) in shape {
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
