//! `shroud-soak`: half an hour (by default) of mixed visitor traffic through shroud while
//! proxies, clients and Tor relays are killed and restarted at random, every byte checked; then
//! a summary that attributes every failed request to the event that broke it. Not a CI test:
//! run it with `soak/run.sh` (see `soak/README.md`).
//!
//! The setup, all on 127.0.0.0/8 and nothing beyond: a private Tor network
//! (`shroud_tests::tornet`: three authorities, two middles, three exits), three `shroud-proxy`
//! processes, two `shroud` clients publishing one hostname through Tor (as two machines
//! would), each to its own TLS origin serving both HTTP and the bulk protocol. Then:
//!
//! 1. traffic ([`traffic`]): steady GETs, bulk transfers of 1 KiB to 8 MiB each way, and
//!    long-lived paced transfers, spread over the proxies as a browser spreads them over the
//!    addresses DNS gives it, each request recorded;
//! 2. chaos ([`chaos`]): from the seed, one event at a time: a proxy SIGKILLed or drained
//!    with SIGTERM, a client SIGKILLed, a middle or exit relay SIGKILLed; each restarted after
//!    a random pause; the next event only once every tunnel is bound again;
//! 3. accounting ([`report`]): failures attributed to events, the rest unexplained;
//!    corruption apart. PASS means zero corrupted and zero unexplained.
//!
//! Every process is stopped by pid at the end, on Ctrl-C and on error; if this process dies
//! first, watchdog shells kill the tors and the shroud processes it started.

// The binary's own modules live in `shroud-soak/` beside this file.
#[path = "shroud-soak/accounting.rs"]
mod accounting;
#[path = "shroud-soak/chaos.rs"]
mod chaos;
#[path = "shroud-soak/fleet.rs"]
mod fleet;
#[path = "shroud-soak/procs.rs"]
mod procs;
#[path = "shroud-soak/report.rs"]
mod report;
#[path = "shroud-soak/traffic.rs"]
mod traffic;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use shroud_tests::tool::{self, Args};
use shroud_tests::tornet::{self, RelayKind, TorNet};
use tokio_util::sync::CancellationToken;

use crate::chaos::{Journal, Rng};
use crate::fleet::{Bins, Fleet};
use crate::procs::Watchdog;
use crate::traffic::Traffic;

/// How long the fleet may take to be bound everywhere at the start (Tor bootstrap included).
const SETUP_TIMEOUT: Duration = Duration::from_secs(180);
/// How often a progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);
/// How long each process gets to exit on SIGTERM at the end.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest run accepted, so a typo cannot run for days.
const MAX_MINUTES: f64 = 24.0 * 60.0;

const USAGE: &str =
    "usage: shroud-soak [--minutes M] [--seed N] [--out FILE] [--bin-dir DIR] [--log-dir DIR]

Runs shroud's soak on 127.0.0.1: a private Tor network, 3 proxies, 2 clients publishing one
hostname through Tor, mixed traffic with every byte checked, and random kills and restarts of
proxies, clients and relays. Prints a summary and exits 0 on PASS (zero corrupted, zero
unexplained failures), 1 on FAIL, 2 on bad arguments. Usually run through soak/run.sh.

  --minutes M    minutes of traffic (default 30; fractions allowed)
  --seed N       seed of the chaos schedule and the requests' sizes (default: from the clock;
                 printed, so a run can be replayed)
  --out FILE     also write the summary (Markdown) to FILE
  --bin-dir DIR  where shroud-proxy and shroud are (default: beside this program)
  --log-dir DIR  where every process's log and the event journal go (default: a new
                 directory under the system's temporary directory, kept)";

/// What the command line asked for.
struct Options {
    minutes: f64,
    seed: u64,
    out: Option<PathBuf>,
    bin_dir: PathBuf,
    log_dir: Option<PathBuf>,
}

impl Options {
    /// Parses the arguments; `None` for `--help`.
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let exe = std::env::current_exe().context("locating this program")?;
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut options = Options {
            minutes: 30.0,
            // Short enough to type when replaying.
            seed: Rng::new(clock ^ u64::from(std::process::id())).next_u64() % 1_000_000_000,
            out: None,
            bin_dir: exe.parent().map(Path::to_path_buf).unwrap_or_default(),
            log_dir: None,
        };
        let mut args = Args::new(args);
        while let Some(flag) = args.next_flag() {
            match flag.name.as_str() {
                "-h" | "--help" => return Ok(None),
                "--minutes" => {
                    let minutes: f64 = args.number(&flag)?;
                    ensure!(
                        minutes > 0.0 && minutes <= MAX_MINUTES,
                        "--minutes must be above 0 and at most {MAX_MINUTES}"
                    );
                    options.minutes = minutes;
                }
                "--seed" => {
                    let text = args.value(&flag)?;
                    options.seed = match text.strip_prefix("0x") {
                        Some(hex) => u64::from_str_radix(hex, 16),
                        None => text.parse(),
                    }
                    .with_context(|| format!("--seed {text:?} is not a number"))?;
                }
                "--out" => options.out = Some(PathBuf::from(args.value(&flag)?)),
                "--bin-dir" => options.bin_dir = PathBuf::from(args.value(&flag)?),
                "--log-dir" => options.log_dir = Some(PathBuf::from(args.value(&flag)?)),
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(Some(options))
    }
}

fn main() -> ExitCode {
    let parsed = Options::parse(std::env::args().skip(1));
    let options = match tool::options("shroud-soak", USAGE, parsed) {
        Ok(options) => options,
        Err(code) => return code,
    };
    tool::init("warn");
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("shroud-soak: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the soak; whether it passed.
fn run(options: &Options) -> anyhow::Result<bool> {
    let bins = Bins::in_dir(&options.bin_dir)?;
    let log_dir = match &options.log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.canonicalize()
                .with_context(|| format!("resolving {}", dir.display()))?
        }
        None => tempfile::Builder::new()
            .prefix("shroud-soak-")
            .tempdir()
            .context("creating a log directory")?
            .keep(),
    };
    let wall_start = SystemTime::now();
    println!(
        "shroud-soak: {} min of traffic, seed {} (replay: soak/run.sh --minutes {} --seed {})",
        options.minutes, options.seed, options.minutes, options.seed
    );
    println!("shroud-soak: logs in {}", log_dir.display());

    let began = Instant::now();
    println!("shroud-soak: starting a private Tor network on 127.0.0.1 (20-40 s)");
    let net = TorNet::start().context("starting the private Tor network")?;
    println!(
        "shroud-soak: Tor network ready after {:.1} s",
        net.startup_time().as_secs_f64()
    );
    let network = describe(&net);
    let network_file = net.network_file.clone();
    let net = Arc::new(Mutex::new(net));
    let watchdog = Watchdog::start()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = runtime.block_on(soak(
        options,
        bins,
        &network_file,
        &log_dir,
        &net,
        watchdog.clone(),
        began,
    ));
    runtime.shutdown_timeout(Duration::from_secs(5));
    watchdog.finish();
    keep_tor_logs(&net, &log_dir.join("tor"));
    // Every tor, by pid.
    drop(net);
    let outcome = result?;

    let inputs = accounting::Inputs {
        seed: options.seed,
        minutes: options.minutes,
        wall_start,
        epoch: outcome.epoch,
        traffic_start: outcome.traffic_start,
        traffic_end: outcome.traffic_end,
        stopped_early: outcome.stopped_early,
        setup: outcome.setup,
        events: &outcome.events,
        records: &outcome.records,
        client_notes: &outcome.client_notes,
        proxy_notes: &outcome.proxy_notes,
        log_dir: &log_dir,
        network,
        source: source_version(),
    };
    let (summary, pass) = report::summarize(&inputs);
    println!("\n{summary}");
    if let Some(path) = &options.out {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, &summary).with_context(|| format!("writing {}", path.display()))?;
        println!("shroud-soak: wrote {}", path.display());
    }
    let csv = log_dir.join("requests.csv");
    std::fs::write(&csv, report::requests_csv(&inputs))
        .with_context(|| format!("writing {}", csv.display()))?;
    let copy = log_dir.join("summary.md");
    std::fs::write(&copy, &summary).with_context(|| format!("writing {}", copy.display()))?;
    Ok(pass)
}

/// What a soak produced, for the report.
struct Outcome {
    epoch: Instant,
    traffic_start: Instant,
    traffic_end: Instant,
    setup: Duration,
    stopped_early: Option<String>,
    events: Vec<chaos::Event>,
    records: Vec<shroud_tests::load::Record>,
    client_notes: Vec<Vec<procs::Note>>,
    proxy_notes: Vec<Vec<procs::Note>>,
}

async fn soak(
    options: &Options,
    bins: Bins,
    network_file: &Path,
    log_dir: &Path,
    net: &Arc<Mutex<TorNet>>,
    watchdog: Arc<Watchdog>,
    began: Instant,
) -> anyhow::Result<Outcome> {
    let cancel = CancellationToken::new();
    let signals = tokio::spawn(stop_on_signal(cancel.clone()));

    // Every time (logs, journal, summary) counts from here.
    let epoch = Instant::now();
    let journal = Journal::create(&log_dir.join("events.log"), epoch)?;
    journal.log("starting the proxies and the clients");
    let mut fleet = Fleet::start(bins, network_file, log_dir, epoch, watchdog).await?;
    let bound = tokio::select! {
        () = cancel.cancelled() => bail!("interrupted during setup"),
        bound = fleet.wait_all_bound(&[], SETUP_TIMEOUT) => bound?,
    };
    if bound.is_none() {
        bail!(
            "not every client bound at every proxy within {SETUP_TIMEOUT:?}; see the logs in {}",
            log_dir.display()
        );
    }

    let traffic_start = Instant::now();
    let setup = traffic_start.duration_since(began);
    journal.log(format_args!(
        "every client bound at every proxy ({:.1} s of setup, Tor network included); traffic \
         starts",
        setup.as_secs_f64()
    ));
    let traffic = Traffic::start(&fleet, options.seed);
    let end = traffic_start + Duration::from_secs_f64(options.minutes * 60.0);

    let mut rng = Rng::new(options.seed);
    let mut progress =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let (events, chaos_error) = {
        let chaos = chaos::run(&mut fleet, net, &mut rng, end, &cancel, &journal);
        let mut chaos = std::pin::pin!(chaos);
        loop {
            tokio::select! {
                done = &mut chaos => break done,
                _ = progress.tick() => journal.log(traffic.progress()),
            }
        }
    };
    let mut stopped_early = chaos_error.map(|err| format!("{err:#}"));
    if stopped_early.is_none() && !cancel.is_cancelled() {
        journal.log("chaos schedule done; traffic goes on to the end");
        // The rest of the run: traffic only, with the fleet watched.
        let mut watch = tokio::time::interval(Duration::from_secs(1));
        while Instant::now() < end && !cancel.is_cancelled() {
            if let Err(err) = fleet.check_alive() {
                stopped_early = Some(format!("{err:#}"));
                break;
            }
            let left = end.saturating_duration_since(Instant::now());
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(left) => {}
                _ = watch.tick() => {}
                _ = progress.tick() => journal.log(traffic.progress()),
            }
        }
    }
    if cancel.is_cancelled() && stopped_early.is_none() {
        stopped_early = Some("interrupted (SIGINT or SIGTERM)".into());
    }
    let traffic_end = Instant::now();
    journal.log(format_args!(
        "traffic stops: {}; waiting for the requests in flight",
        traffic.progress()
    ));
    // An interrupted run ends at once; a whole one lets the last transfers finish.
    let grace = stopped_early.is_some().then_some(Duration::from_secs(5));
    let records = traffic.stop(grace).await;
    journal.log("every request has ended; stopping the fleet");
    signals.abort();
    fleet.stop(STOP_TIMEOUT).await;
    Ok(Outcome {
        epoch,
        traffic_start,
        traffic_end,
        setup,
        stopped_early,
        events,
        records,
        client_notes: fleet.client_notes(),
        proxy_notes: fleet.proxy_notes(),
    })
}

/// Cancels `cancel` on SIGINT or SIGTERM.
async fn stop_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    println!("shroud-soak: stopping (signal); the summary will say the run was cut short");
    cancel.cancel();
}

/// Copies every relay's notice log to `dir` (the network's own directory goes with it).
fn keep_tor_logs(net: &Arc<Mutex<TorNet>>, dir: &Path) {
    let net = net
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Err(err) = std::fs::create_dir_all(dir) {
        tracing::warn!(%err, dir = %dir.display(), "cannot keep the relays' logs");
        return;
    }
    for relay in net.relays() {
        let to = dir.join(format!("{}.log", relay.nick));
        if let Err(err) = std::fs::copy(relay.notice_log(), &to) {
            tracing::warn!(%err, relay = %relay.nick, "cannot keep the relay's log");
        }
    }
}

/// The network's shape, for people.
fn describe(net: &TorNet) -> String {
    let count = |kind| net.relays().iter().filter(|r| r.kind == kind).count();
    let version = tornet::tor_version().unwrap_or_else(|| "tor".into());
    format!(
        "{} authorities, {} middles, {} exits on 127.0.0.1 ({version}), ready in {:.1} s; \
         only middles and exits are killed",
        count(RelayKind::Authority),
        count(RelayKind::Middle),
        count(RelayKind::Exit),
        net.startup_time().as_secs_f64()
    )
}

/// The workspace's commit, and whether the work tree had changes.
fn source_version() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit} with uncommitted changes")
            } else {
                commit
            }
        }
        None => "unknown".into(),
    }
}
