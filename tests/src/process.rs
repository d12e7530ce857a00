//! Programs started by a test, a tool or the bench, each killed by PID when its handle drops.
//!
//! Both output streams are read line by line, so a program that logs to stdout never blocks
//! on a full pipe. Every line can be waited for ([`Process::wait_for_line`]) and also goes
//! where the caller chose ([`Output`]): kept and echoed to the test's output, or appended to
//! a log file.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Where a [`Process`]'s output lines go, besides [`Process::wait_for_line`].
#[derive(Debug, Clone)]
pub enum Output {
    /// Kept for [`Process::output_text`] and echoed to the test's output, each line prefixed
    /// with the program's name and pid: what a test reads, and shows when it fails.
    Echo,
    /// Appended to the file at this path, and shown nowhere: for runs whose logs would bury
    /// everything else (the bench).
    File(PathBuf),
}

/// A running child process; killed (SIGKILL) and reaped when dropped.
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
    sink: Arc<Sink>,
}

impl Process {
    /// Starts `program` with `args`, its output echoed and kept ([`Output::Echo`]).
    pub fn spawn(program: &Path, args: &[String]) -> anyhow::Result<Self> {
        Self::spawn_with(program, args, &[], Output::Echo)
    }

    /// Starts `program` with `args` and `env` added to its environment, its output going to
    /// `output`.
    ///
    /// Every program gets `RUST_LOG=info` (shroud's binaries then log the lines tests wait
    /// for), `NO_COLOR=1` (no escape codes inside those lines) and no `SHROUD_TRANSPORT` or
    /// `SHROUD_CONFIG` from the caller's environment; `env` comes last and may override them.
    pub fn spawn_with(
        program: &Path,
        args: &[String],
        env: &[(&str, &OsStr)],
        output: Output,
    ) -> anyhow::Result<Self> {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("SHROUD_TRANSPORT")
            .env_remove("SHROUD_CONFIG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let sink = match output {
            Output::Echo => {
                let name = program
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Sink::Echo {
                    label: format!("[{name} {}]", child.id()),
                    kept: Mutex::new(Vec::new()),
                }
            }
            Output::File(path) => {
                let file = File::options()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening {}", path.display()))?;
                Sink::File(Mutex::new(file))
            }
        };
        let sink = Arc::new(sink);
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        forward(stdout, tx.clone(), sink.clone());
        forward(stderr, tx, sink.clone());
        Ok(Self { child, lines, sink })
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
            if left.is_zero() {
                bail!("no line containing {needle:?} within {limit:?}");
            }
            let step = left.min(Duration::from_millis(50));
            match tokio::task::block_in_place(|| self.lines.recv_timeout(step)) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the process ended before printing {needle:?}")
                }
            }
        }
    }

    /// Everything the process wrote so far, stdout and stderr, one line each in the order
    /// read; empty unless its output is [`Output::Echo`].
    pub fn output_text(&self) -> String {
        match &*self.sink {
            Sink::Echo { kept, .. } => kept
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .join("\n"),
            Sink::File(_) => String::new(),
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        // Err: it has exited already, and `wait` reaps it all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // Err: it has exited already; the caller waits for the exit either way.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGHUP, which makes a shroud binary reload its files; returns once it is sent.
    pub fn hangup(&self) {
        // Err: it has exited already, which the caller's next look at it shows.
        let _ = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status();
    }

    /// How the process exited, if it has; `None` while it runs.
    pub fn try_status(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits for the process to exit, up to `limit`; kills it if it does not.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                // Give the reader threads a moment to drain what was written before exit.
                let _ = tokio::task::block_in_place(|| {
                    self.lines.recv_timeout(Duration::from_millis(100))
                });
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("process did not exit within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the reader threads put each line: an [`Output`], opened.
enum Sink {
    Echo {
        label: String,
        kept: Mutex<Vec<String>>,
    },
    File(Mutex<File>),
}

impl Sink {
    fn take(&self, line: &str) {
        match self {
            Sink::Echo { label, kept } => {
                eprintln!("{label} {line}");
                kept.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(line.to_owned());
            }
            Sink::File(file) => {
                // One write per line, so the two streams' lines never interleave mid-line. A
                // log that cannot be written is not worth stopping the program for.
                let _ = file
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write_all(format!("{line}\n").as_bytes());
            }
        }
    }
}

/// Reads `stream` line by line into `sink` and `tx`, on a thread of its own, until it closes.
fn forward(stream: impl Read + Send + 'static, tx: mpsc::Sender<String>, sink: Arc<Sink>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            sink.take(&line);
            // Nobody may be waiting for lines any more; the sink still gets every one.
            let _ = tx.send(line);
        }
    });
}
