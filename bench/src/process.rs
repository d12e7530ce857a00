//! Processes the bench starts: each killed by PID when dropped, with both output streams read
//! line by line (a tool that logs to stdout must never block on a full pipe) and kept in a log
//! file under the run's scratch directory, not echoed.

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A running child process.
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Starts `program` with `args`; its output goes to `log`.
    pub fn spawn(program: &Path, args: &[String], log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with_env(program, args, log, &[])
    }

    /// Like [`Process::spawn`], with `env` added to its environment.
    pub fn spawn_with_env(
        program: &Path,
        args: &[String],
        log: &Path,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        forward(stdout, tx.clone(), file.try_clone()?);
        forward(stderr, tx, file);
        Ok(Self { child, lines })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (on a blocking thread) for an output line containing `needle`, up to `limit`.
    pub async fn wait_for_line(&mut self, needle: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            anyhow::ensure!(
                !left.is_zero(),
                "no line containing {needle:?} within {limit:?}"
            );
            let step = left.min(Duration::from_millis(50));
            match tokio::task::block_in_place(|| self.lines.recv_timeout(step)) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("the process ended before printing {needle:?}")
                }
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies `stream` into `file` and `tx` line by line, until it closes.
fn forward(stream: impl Read + Send + 'static, tx: mpsc::Sender<String>, mut file: std::fs::File) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let _ = writeln!(file, "{line}");
            // Nobody may be listening any more; the file still gets every line.
            let _ = tx.send(line);
        }
    });
}
