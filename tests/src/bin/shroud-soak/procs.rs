//! The soak's child processes: started with their stderr read line by line into a log file of
//! their own, each line stamped with the moment it arrived, and the lines that matter (a tunnel
//! up or lost, a listener bound) kept as [`Note`]s for the chaos schedule and the report.
//!
//! Every child is stopped by its pid: by [`Proc::kill`] or [`Proc::terminate`], by dropping its
//! handle, and, if this process dies first (a panic that aborts, SIGKILL), by a [`Watchdog`]
//! shell that outlives it just long enough to kill the children still registered with it.

use std::fs::File;
use std::io::{BufRead as _, BufReader, LineWriter, Write as _};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// How often a waited-for process or note is looked at.
const POLL: Duration = Duration::from_millis(20);
/// How long a SIGKILLed child may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Something a child's log said, and when the line arrived.
#[derive(Debug, Clone)]
pub struct Note {
    /// When the line was read.
    pub at: Instant,
    /// What it said.
    pub seen: Seen,
}

/// The log lines the soak cares about. Proxies are named by their index in the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The soak started a new process for this slot (not a log line).
    Started,
    /// The soak killed or stopped this slot's process (not a log line).
    Stopped,
    /// Client: its tunnel to this proxy is bound.
    TunnelUp(usize),
    /// Client: its tunnel to this proxy failed; it reconnects.
    TunnelLost(usize),
    /// Client: this proxy sent go-away; it reconnects.
    Draining(usize),
    /// Client: it gave up on this proxy for good.
    GaveUp(usize),
    /// Client: Tor has bootstrapped.
    Bootstrapped,
    /// Proxy: its HTTPS listener is bound here.
    Listening(SocketAddr),
    /// Proxy: a tunnel bound, with the proxy's number for it (numbers start again at 0 in each
    /// process).
    TunnelBound(u64),
    /// Proxy: the bound tunnel of that number closed and left the routing table.
    TunnelClosed(u64),
    /// Proxy: its drain deadline passed with connections still open.
    DrainDeadline,
}

/// Every [`Note`] of one slot (a proxy or a client), over all its processes.
pub type History = Arc<Mutex<Vec<Note>>>;

/// Reads a log line into a [`Seen`], if it is one that matters.
pub type Classify = Arc<dyn Fn(&str) -> Option<Seen> + Send + Sync>;

/// Appends `seen` to `history`, stamped now; returns the stamp.
pub fn note(history: &History, seen: Seen) -> Instant {
    let at = Instant::now();
    history
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(Note { at, seen });
    at
}

/// A copy of `history`.
pub fn notes(history: &History) -> Vec<Note> {
    history
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// A child process of the soak, killed by pid when dropped.
pub struct Proc {
    child: Child,
    pid: u32,
    reaped: Option<ExitStatus>,
    watchdog: Arc<Watchdog>,
    /// When it was started.
    pub started: Instant,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program` with `args`, in a process group of its own (so a Ctrl-C meant for the
    /// soak reaches it only through the soak), with `RUST_LOG=info` and no `SHROUD_*`
    /// variable of ours. Its stderr goes, line by line and stamped with the seconds since
    /// `epoch`, to `log`; the lines `classify` recognises go to `history`.
    pub fn spawn(
        program: &Path,
        args: &[String],
        log: &Path,
        epoch: Instant,
        history: &History,
        classify: Classify,
        watchdog: &Arc<Watchdog>,
    ) -> anyhow::Result<Self> {
        let mut file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let started = note(history, Seen::Started);
        let _ = writeln!(
            file,
            "{:>10.3} === soak: starting {} {}",
            started.duration_since(epoch).as_secs_f64(),
            program.display(),
            args.join(" ")
        );
        let stdout = file.try_clone().context("duplicating a log file handle")?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .process_group(0);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SHROUD_") {
                command.env_remove(name);
            }
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let pid = child.id();
        let comm = program
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        watchdog.watch(pid, &comm);
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let history = history.clone();
        std::thread::Builder::new()
            .name(format!("log-{pid}"))
            .spawn(move || {
                let mut out = LineWriter::new(file);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let at = Instant::now();
                    let _ = writeln!(
                        out,
                        "{:>10.3} {line}",
                        at.duration_since(epoch).as_secs_f64()
                    );
                    if let Some(seen) = classify(&line) {
                        history
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(Note { at, seen });
                    }
                }
            })
            .context("starting a log reader thread")?;
        Ok(Self {
            child,
            pid,
            reaped: None,
            watchdog: watchdog.clone(),
            started,
            log: log.to_owned(),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its exit status, if it has exited (and is reaped now).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped = Some(status);
                self.watchdog.forget(self.pid);
            }
        }
        self.reaped
    }

    /// SIGKILL, then waits until it is reaped. Returns when that was.
    pub fn kill(&mut self) -> Instant {
        if self.exited().is_none() {
            // Fails only if it has exited meanwhile, which the wait below sees.
            let _ = self.child.kill();
            let deadline = Instant::now() + REAP_TIMEOUT;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
        }
        Instant::now()
    }

    /// SIGTERM, by pid.
    pub fn terminate(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Waits up to `limit` for it to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits up to `limit` for a note after `after` in `history` that `wanted` accepts, and returns
/// it; fails early if `proc` exits.
pub async fn wait_note<T>(
    history: &History,
    proc: &mut Proc,
    after: Instant,
    limit: Duration,
    wanted: impl Fn(&Seen) -> Option<T>,
) -> anyhow::Result<(Instant, T)> {
    let deadline = Instant::now() + limit;
    loop {
        let found = history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|note| note.at >= after)
            .find_map(|note| wanted(&note.seen).map(|value| (note.at, value)));
        if let Some(found) = found {
            return Ok(found);
        }
        if let Some(status) = proc.exited() {
            bail!(
                "pid {} exited ({status}); see {}",
                proc.pid(),
                proc.log.display()
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "pid {} did not say it within {limit:?}; see {}",
                proc.pid(),
                proc.log.display()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A shell that SIGKILLs every child still registered with it once this process is gone
/// (its stdin, whose only writer is this process, then reads EOF), however this process
/// ends. A pid is killed only if its `/proc/PID/comm` still names the program started, so a
/// recycled pid is left alone; children reaped normally are unregistered at once.
pub struct Watchdog {
    stdin: Mutex<Option<ChildStdin>>,
    shell: Mutex<Child>,
}

impl Watchdog {
    /// Starts the shell, in a process group of its own, so a Ctrl-C does not stop it before
    /// it has done its work.
    pub fn start() -> anyhow::Result<Arc<Self>> {
        // Builtins only while reading; `kill` with every pid at once at the end.
        const SCRIPT: &str = r#"
trap '' INT HUP TERM
pids=' '
while read -r op pid comm; do
    case $op in
        +) pids="$pids$pid:$comm " ;;
        -) kept=' '
           for e in $pids; do [ "${e%%:*}" = "$pid" ] || kept="$kept$e "; done
           pids=$kept ;;
    esac
done
doomed=
for e in $pids; do
    pid=${e%%:*} want=${e#*:} comm=
    read -r comm < "/proc/$pid/comm" 2>/dev/null
    [ "$comm" = "$want" ] && doomed="$doomed $pid"
done
[ -n "$doomed" ] && kill -9 $doomed 2>/dev/null
exit 0
"#;
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("shroud-soak-watchdog")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the watchdog shell")?;
        let stdin = shell.stdin.take().context("no watchdog stdin")?;
        Ok(Arc::new(Self {
            stdin: Mutex::new(Some(stdin)),
            shell: Mutex::new(shell),
        }))
    }

    fn send(&self, line: &str) {
        let mut stdin = self.stdin.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pipe) = stdin.as_mut() {
            if pipe.write_all(line.as_bytes()).is_err() {
                tracing::warn!("the watchdog shell is gone; children may outlive a crash");
                *stdin = None;
            }
        }
    }

    /// Registers child `pid`, running the program named `comm`.
    fn watch(&self, pid: u32, comm: &str) {
        // /proc/PID/comm holds at most 15 bytes of the name.
        let comm: String = comm.chars().take(15).collect();
        self.send(&format!("+ {pid} {comm}\n"));
    }

    /// Unregisters `pid`, which has been reaped.
    fn forget(&self, pid: u32) {
        self.send(&format!("- {pid}\n"));
    }

    /// Lets the shell go: it checks the children still registered (none, if every handle
    /// was dropped first) and exits. Waits up to 10 s for it.
    pub fn finish(&self) {
        drop(
            self.stdin
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let mut shell = self.shell.lock().unwrap_or_else(PoisonError::into_inner);
        let deadline = Instant::now() + REAP_TIMEOUT;
        loop {
            match shell.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = shell.kill();
                    let _ = shell.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(POLL),
            }
        }
    }
}
