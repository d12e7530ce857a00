//! `shroud-bench`: shroud against the tunnels people would pick instead, side by side on
//! loopback, in one run. See bench/README.md.
//!
//! `shroud-bench run` drives everything and writes BENCHMARKS.md; `origin` and `relay` are
//! the processes it starts (the HTTP origin every contender forwards to, and the delay relay
//! that stands in for a long path).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod clock;
mod contender;
mod fleet;
mod measure;
mod origin;
mod relay;
mod report;
mod run;

use contender::Kind;

#[derive(Parser)]
#[command(version, about = "Benchmarks shroud against other tunnels on loopback")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measures every contender and writes the report.
    Run(RunArgs),
    /// Serves the benchmark's origin (started by `run`).
    Origin {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Relays connections over an imitated long link (started by `run`).
    Relay {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Where to relay to.
        #[arg(long)]
        to: SocketAddr,
        /// Round trip added, ms.
        #[arg(long)]
        rtt_ms: u64,
        /// Link rate each way, bytes per second.
        #[arg(long)]
        rate_bytes: u64,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where to write the charts (PNG), referenced from the report by a path relative to it.
    #[arg(long, default_value = "bench/charts")]
    charts: PathBuf,
    /// Where the started processes' output goes (one log file each).
    #[arg(long, default_value = "bench/logs")]
    logs: PathBuf,
    /// Where to write every raw figure, as JSON.
    #[arg(long, default_value = "bench/results.json")]
    json: PathBuf,
    /// Repetitions of each throughput, HTTP and setup figure; medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    runs: u64,
    /// Seconds each throughput and wrk measurement lasts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    seconds: u64,
    /// Only these contenders (comma-separated): none, shroud, rathole-tls, rathole-tcp, bore,
    /// pagekite, ssh.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Idle visitor connections at which memory is read (comma-separated; the flag alone
    /// skips the memory figures).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1000,10000")]
    idle: Vec<usize>,
    /// Idle tunnels at which shroud's proxy memory is read (0 to skip).
    #[arg(long, default_value_t = 200)]
    idle_tunnels: usize,
    /// Round trips, ms, of the high-RTT figure (comma-separated; the flag alone skips it).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,300,800")]
    rtt_ms: Vec<u64>,
    /// The delay relay's rate, Mbit/s each way.
    #[arg(long, default_value_t = 200)]
    link_mbit: u64,
    /// Seconds each high-RTT download lasts.
    #[arg(long, default_value_t = 14)]
    rtt_seconds: u64,
    /// shroud's --stream-buffer-bytes on both sides, instead of its default.
    #[arg(long)]
    stream_buffer: Option<usize>,
    /// Measure only forwarding between two proxies of a fleet (visitors at the proxy holding
    /// the tunnel against visitors at one that forwards them), and replace just that section
    /// of --out and the `fleet` entry of --json, leaving the rest as it is. A full run measures
    /// it too, whenever shroud is measured.
    #[arg(long, conflicts_with_all = ["only", "idle", "idle_tunnels", "rtt_ms"])]
    fleet_only: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("shroud-bench: starting the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Origin { listen } => origin::serve(listen).await,
            Command::Relay {
                listen,
                to,
                rtt_ms,
                rate_bytes,
            } => {
                let link = relay::Link {
                    rtt: Duration::from_millis(rtt_ms),
                    rate: rate_bytes.max(1),
                };
                relay::serve(listen, to, link).await
            }
            Command::Run(args) => run_and_report(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shroud-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_and_report(args: RunArgs) -> anyhow::Result<()> {
    let kinds = if args.only.is_empty() {
        Kind::ALL.to_vec()
    } else {
        let mut kinds = Vec::new();
        for slug in &args.only {
            let kind = Kind::ALL
                .into_iter()
                .find(|k| k.slug() == slug)
                .ok_or_else(|| anyhow::anyhow!("unknown contender {slug:?}"))?;
            kinds.push(kind);
        }
        kinds
    };
    raise_open_file_limit();
    let plan = run::Plan {
        kinds,
        runs: args.runs as usize,
        seconds: args.seconds,
        parallel: 8,
        wrk_connections: 32,
        setup_samples: 50,
        idle_steps: args.idle.into_iter().filter(|&n| n > 0).collect(),
        idle_tunnels: args.idle_tunnels,
        rtts_ms: args.rtt_ms,
        link_rate: args.link_mbit * 1_000_000 / 8,
        rtt_seconds: args.rtt_seconds,
        stream_buffer: args.stream_buffer,
    };
    std::fs::create_dir_all(&args.logs)?;
    if args.fleet_only {
        return fleet_only(&plan, &args.logs, &args.json, &args.out).await;
    }
    let results = run::run(plan, args.logs.clone()).await?;
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&results)?)?;
    report::write(&results, &args.out, &args.charts)?;
    println!(
        "wrote {} (charts in {}, raw figures in {}) after {:.0} s",
        args.out.display(),
        args.charts.display(),
        args.json.display(),
        results.elapsed_secs
    );
    Ok(())
}

/// `run --fleet-only`: the forwarding figures alone, spliced into an existing report.
async fn fleet_only(
    plan: &run::Plan,
    logs: &Path,
    json_path: &Path,
    out: &Path,
) -> anyhow::Result<()> {
    let fleet = run::run_fleet(plan, logs.to_path_buf()).await?;
    // The figures of the last full run stay; only the forwarding ones are replaced.
    report::write_fleet_json(&fleet, json_path)?;
    report::write_fleet(&fleet, out)?;
    for err in &fleet.errors {
        eprintln!("shroud-bench: forwarding: {err}");
    }
    println!(
        "wrote the forwarding section of {} (raw figures under \"fleet\" in {}) after {:.0} s",
        out.display(),
        json_path.display(),
        fleet.elapsed_secs
    );
    anyhow::ensure!(
        fleet.errors.is_empty(),
        "{} measurement(s) failed",
        fleet.errors.len()
    );
    Ok(())
}

/// 10,000 idle visitors need well over 10,000 descriptors here (and in the processes started
/// from here, which inherit the limit).
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(max) = limit.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: limit.maximum,
            },
        );
    }
}
