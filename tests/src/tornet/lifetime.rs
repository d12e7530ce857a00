//! Tor processes' lifetimes: started as daemons whose pids come from their
//! `PidFile`s, waited for with deadlines, stopped by pid, and cleaned up by a
//! watchdog shell if the test process dies first.

use std::fs;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::{LOG_TAIL_LINES, STOP_TIMEOUT};

/// How long `tor` may take to bind its ports and detach.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a waited-for process is looked at.
const PROCESS_POLL: Duration = Duration::from_millis(10);

/// A port tor could not bind because someone took it after `free_ports`
/// chose it.
#[derive(Debug)]
pub(super) struct PortTaken(String);

impl std::fmt::Display for PortTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for PortTaken {}

/// Starts the tor whose `torrc` is in `data_dir`. The process we spawn forks
/// the daemon and exits: with `RunAsDaemon 1` it exits only once the daemon
/// has bound its ports, with status 0, or 1 if it failed; see [`await_tor`].
pub(super) fn spawn_tor(data_dir: &Path) -> anyhow::Result<Child> {
    let out_path = data_dir.join("launch.log");
    let out =
        fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let err = out.try_clone().context("duplicating a file handle")?;
    Command::new("tor")
        .arg("-f")
        .arg(data_dir.join("torrc"))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("running tor (is it installed?)")
}

/// Waits for the launcher [`spawn_tor`] started for the tor `nick` in
/// `data_dir` and returns the daemon's pid, read from its `PidFile`
/// (`tor.pid` there).
pub(super) fn await_tor(nick: &str, data_dir: &Path, mut child: Child) -> anyhow::Result<u32> {
    let out_path = data_dir.join("launch.log");
    let pid_file = data_dir.join("tor.pid");
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
    // The daemon may write its PidFile just after the launcher exits.
    let deadline = Instant::now() + LAUNCH_TIMEOUT;
    loop {
        let pid_text = fs::read_to_string(&pid_file).unwrap_or_default();
        if let Ok(pid) = pid_text.trim().parse() {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            bail!(
                "tor for {nick} wrote no pid to {} within {LAUNCH_TIMEOUT:?} (it has {pid_text:?})",
                pid_file.display()
            );
        }
        thread::sleep(PROCESS_POLL);
    }
}

/// Starts the tor `nick` whose `torrc` is in `data_dir` and returns the
/// daemon's pid once it has bound its ports and detached.
pub(super) fn launch_tor(nick: &str, data_dir: &Path) -> anyhow::Result<u32> {
    // A pid file left by an earlier run must not be mistaken for this one's.
    let _absent = fs::remove_file(data_dir.join("tor.pid"));
    await_tor(nick, data_dir, spawn_tor(data_dir)?)
}

/// Starts the shell that kills this network's tors and deletes `root` once
/// this process is gone (the write end of its stdin closes when this
/// process exits, however it exits). It runs in its own process group, so a
/// Ctrl-C meant for the tests does not stop it before it has cleaned up.
pub(super) fn spawn_watchdog(root: &Path) -> anyhow::Result<Child> {
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
pub(super) fn wait_child(
    child: &mut Child,
    deadline: Instant,
) -> anyhow::Result<std::process::ExitStatus> {
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
pub(super) fn stop_processes(pids: &[u32], signal: &str) -> anyhow::Result<()> {
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
pub(super) fn is_alive(pid: u32) -> bool {
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

/// The last `n` lines of the file at `path`, or why it could not be read.
pub(super) fn tail(path: &Path, n: usize) -> String {
    match fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}
