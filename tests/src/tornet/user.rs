//! Tors that use a network without relaying: a SOCKS client, an onion
//! service's host.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::ports::free_port;

use super::config::user_torrc;
use super::lifetime::{is_alive, launch_tor, stop_processes, tail, PortTaken};
use super::{TorNet, LOG_TAIL_LINES, START_ATTEMPTS};

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
            let port = if socks { Some(free_port()?) } else { None };
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
            match launch_tor(nick, &data_dir) {
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
