//! One full run: every contender, every figure, several times, into a [`Results`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use shroud_tests::stack::{authorize, ClientSpec, TestClient};

use shroud_tests::process::Process;
use shroud_tests::tool;

use crate::contender::{self, Env, Kind, Options, Running, HOST};
use crate::fleet::{self, FleetResults};
use crate::measure::{self, IdleVisitors, Series, Target, WrkResult};
use crate::relay::Link;

/// What a run measures, and for how long.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Contenders, in table order.
    pub kinds: Vec<Kind>,
    /// Repetitions of the throughput, HTTP and setup figures (medians are reported).
    pub runs: usize,
    /// Length of each throughput and wrk measurement.
    pub seconds: u64,
    /// Concurrent downloads in the parallel figure.
    pub parallel: usize,
    /// wrk's connections.
    pub wrk_connections: usize,
    /// Connections timed for setup latency, per run.
    pub setup_samples: usize,
    /// Idle visitor connections at which memory is read.
    pub idle_steps: Vec<usize>,
    /// Idle tunnels at which the proxy's memory is read (shroud only).
    pub idle_tunnels: usize,
    /// Round trips for the high-RTT figure (empty to skip it).
    pub rtts_ms: Vec<u64>,
    /// The relay's rate, bytes per second each way.
    pub link_rate: u64,
    /// Length of each high-RTT download.
    pub rtt_seconds: u64,
    /// shroud's `--stream-buffer-bytes`, if not its default.
    pub stream_buffer: Option<usize>,
}

/// Everything measured, raw; the report takes medians.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// The machine: kernel, CPUs.
    pub machine: String,
    /// The plan that produced these.
    pub plan: Option<Plan>,
    /// iperf3's single stream on loopback, MB/s.
    pub iperf3_mbs: Option<f64>,
    /// Per contender.
    pub contenders: Vec<ContenderResults>,
    /// The proxy's memory against idle tunnels (shroud).
    pub tunnels: Option<TunnelMemory>,
    /// The high-RTT downloads.
    pub rtt: Vec<RttResult>,
    /// How long the run took, seconds.
    pub elapsed_secs: f64,
    /// shroud visitors at the proxy holding the tunnel against visitors forwarded to it by
    /// another proxy of its fleet; last, where `--fleet-only` puts it.
    pub fleet: Option<FleetResults>,
}

/// One contender's figures, one entry per run.
#[derive(Debug, Serialize)]
pub struct ContenderResults {
    /// Which.
    pub kind: Kind,
    /// Single-stream download, MB/s.
    pub single_mbs: Vec<f64>,
    /// CPU seconds both sides spent per GB of the single-stream download.
    pub single_cpu_per_gb: Vec<f64>,
    /// `parallel` downloads together, MB/s.
    pub parallel_mbs: Vec<f64>,
    /// wrk with keep-alive.
    pub wrk_keepalive: Vec<WrkResult>,
    /// wrk with a new connection per request.
    pub wrk_close: Vec<WrkResult>,
    /// Setup latency samples, µs, all runs together.
    pub setup_us: Vec<f64>,
    /// Memory with idle visitors.
    pub memory: Option<Memory>,
    /// What failed, so the report can say so rather than print a gap.
    pub errors: Vec<String>,
}

/// Resident memory, KiB, of each side: idle, then with each step of idle visitors.
#[derive(Debug, Default, Serialize)]
pub struct Memory {
    /// The public side with its tunnel up and no visitors.
    pub proxy_idle: Option<u64>,
    /// The origin side, likewise.
    pub client_idle: Option<u64>,
    /// Each step reached.
    pub steps: Vec<Step>,
}

/// `(visitors held, proxy KiB, client KiB)`.
pub type Step = (usize, Option<u64>, Option<u64>);

/// The proxy's memory with one tunnel and with many.
#[derive(Debug, Serialize)]
pub struct TunnelMemory {
    /// Tunnels in the second reading.
    pub tunnels: usize,
    /// Proxy RSS with no tunnel, KiB.
    pub rss_none: u64,
    /// Proxy RSS with `tunnels` idle tunnels, KiB.
    pub rss_many: u64,
}

/// Plain TCP and shroud through the same delay relay.
#[derive(Debug, Serialize)]
pub struct RttResult {
    /// The added round trip.
    pub rtt_ms: u64,
    /// A plain TCP download through the relay.
    pub plain: Option<Series>,
    /// A shroud download, the client reaching the proxy through the relay.
    pub shroud: Option<Series>,
    /// What failed.
    pub errors: Vec<String>,
}

const SERIES_INTERVAL: Duration = Duration::from_millis(250);
/// Download time before the rate is counted, so connection start-up is left out.
const WARMUP: Duration = Duration::from_secs(1);

/// Runs `plan` against an origin started here; progress goes to stdout.
pub async fn run(plan: Plan, logs: PathBuf) -> anyhow::Result<Results> {
    let started = Instant::now();
    let env = Env::new(logs)?;
    let (_origin, origin) = start_origin(&env).await?;
    let options = Options {
        stream_buffer: plan.stream_buffer,
    };
    let mut results = Results {
        machine: machine(),
        ..Results::default()
    };

    progress("iperf3 on loopback");
    match measure::iperf3_loopback(Duration::from_secs(plan.seconds)).await {
        Ok(mbs) => results.iperf3_mbs = Some(mbs),
        Err(err) => progress(&format!("  iperf3 failed: {err:#}")),
    }

    results.contenders = plan
        .kinds
        .iter()
        .map(|&kind| ContenderResults {
            kind,
            single_mbs: Vec::new(),
            single_cpu_per_gb: Vec::new(),
            parallel_mbs: Vec::new(),
            wrk_keepalive: Vec::new(),
            wrk_close: Vec::new(),
            setup_us: Vec::new(),
            memory: None,
            errors: Vec::new(),
        })
        .collect();
    for round in 1..=plan.runs {
        for entry in &mut results.contenders {
            progress(&format!("run {round}/{}: {}", plan.runs, entry.kind.name()));
            match contender::start(&env, entry.kind, origin, &options).await {
                Ok(running) => throughput_and_http(&plan, &running, entry).await,
                Err(err) => entry.errors.push(format!("start: {err:#}")),
            }
        }
    }
    if !plan.idle_steps.is_empty() {
        for entry in &mut results.contenders {
            if entry.kind == Kind::NoTunnel {
                continue;
            }
            progress(&format!("memory: {}", entry.kind.name()));
            match contender::start(&env, entry.kind, origin, &options).await {
                Ok(running) => {
                    entry.memory = Some(memory(&plan, &running, &mut entry.errors).await)
                }
                Err(err) => entry.errors.push(format!("start for memory: {err:#}")),
            }
        }
    }
    if plan.idle_tunnels > 0 && plan.kinds.contains(&Kind::Shroud) {
        progress(&format!(
            "memory: shroud proxy with {} idle tunnels",
            plan.idle_tunnels
        ));
        match tunnel_memory(&env, origin, &options, plan.idle_tunnels).await {
            Ok(tunnels) => results.tunnels = Some(tunnels),
            Err(err) => progress(&format!("  failed: {err:#}")),
        }
    }
    for &rtt_ms in &plan.rtts_ms {
        progress(&format!("high RTT: {rtt_ms} ms"));
        results
            .rtt
            .push(high_rtt(&plan, &env, origin, &options, rtt_ms).await);
    }
    if plan.kinds.contains(&Kind::Shroud) {
        let machine = results.machine.clone();
        results.fleet = Some(fleet::measure(&plan, &env, origin, &options, machine, false).await);
    }
    results.plan = Some(plan);
    results.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(results)
}

/// Measures only forwarding between proxies (direct against forwarded), against an origin
/// started here.
pub async fn run_fleet(plan: &Plan, logs: PathBuf) -> anyhow::Result<FleetResults> {
    let env = Env::new(logs)?;
    let (_origin, origin) = start_origin(&env).await?;
    let options = Options {
        stream_buffer: plan.stream_buffer,
    };
    Ok(fleet::measure(plan, &env, origin, &options, machine(), true).await)
}

async fn throughput_and_http(plan: &Plan, running: &Running, entry: &mut ContenderResults) {
    let target = &running.target;
    let duration = Duration::from_secs(plan.seconds) + WARMUP;
    let to = Duration::from_secs(plan.seconds) + WARMUP;
    let cpu_before = running.cpu_secs();
    match measure::download(target, duration, SERIES_INTERVAL).await {
        Ok(series) => {
            entry.single_mbs.push(series.rate_mbs(WARMUP, to));
            let gb = series.bytes.iter().sum::<u64>() as f64 / 1e9;
            if let (Ok(before), Ok(after)) = (cpu_before, running.cpu_secs()) {
                if gb > 0.0 && running.proxy.is_some() {
                    entry.single_cpu_per_gb.push((after - before) / gb);
                }
            }
        }
        Err(err) => entry.errors.push(format!("single stream: {err:#}")),
    }
    match measure::parallel_download(target, plan.parallel, duration, SERIES_INTERVAL).await {
        Ok(series) => entry.parallel_mbs.push(series.rate_mbs(WARMUP, to)),
        Err(err) => entry
            .errors
            .push(format!("{} streams: {err:#}", plan.parallel)),
    }
    let wrk_time = Duration::from_secs(plan.seconds);
    match measure::wrk(target, wrk_time, plan.wrk_connections, true).await {
        Ok(result) => entry.wrk_keepalive.push(result),
        Err(err) => entry.errors.push(format!("wrk keep-alive: {err:#}")),
    }
    match measure::wrk(target, wrk_time, plan.wrk_connections, false).await {
        Ok(result) => entry.wrk_close.push(result),
        Err(err) => entry.errors.push(format!("wrk new connections: {err:#}")),
    }
    match measure::setup_latency(target, plan.setup_samples).await {
        Ok(samples) => entry.setup_us.extend(samples),
        Err(err) => entry.errors.push(format!("setup latency: {err:#}")),
    }
}

async fn memory(plan: &Plan, running: &Running, errors: &mut Vec<String>) -> Memory {
    let mut memory = Memory {
        proxy_idle: running.proxy_rss_kib().ok(),
        client_idle: running.client_rss_kib().ok(),
        steps: Vec::new(),
    };
    let mut visitors = IdleVisitors::new();
    for &step in &plan.idle_steps {
        let opened = tokio::time::timeout(
            Duration::from_secs(120),
            visitors.grow_to(&running.target, step, 256),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("{step} idle connections took over 120 s")));
        // A contender that drops some connections is still measured with those it holds.
        if visitors.len() > 0 {
            memory.steps.push((
                visitors.len(),
                running.proxy_rss_kib().ok(),
                running.client_rss_kib().ok(),
            ));
        }
        if let Err(err) = opened {
            errors.push(format!("{step} idle visitors: {err:#}"));
            break;
        }
    }
    memory
}

async fn tunnel_memory(
    env: &Env,
    origin: SocketAddr,
    options: &Options,
    tunnels: usize,
) -> anyhow::Result<TunnelMemory> {
    let specs: Vec<ClientSpec> = (0..tunnels)
        .map(|i| ClientSpec::new(&format!("t{i}.{HOST}"), origin, Vec::new()))
        .collect();
    let policy: String = specs
        .iter()
        .map(|spec| authorize(&spec.hostname, &spec.key))
        .collect();
    let proxy = contender::start_shroud_proxy(env, &policy, options).await?;
    let rss_none = measure::tree_rss_kib(proxy.process.pid())?;
    let mut clients = Vec::with_capacity(tunnels);
    for mut spec in specs {
        spec.proxies = vec![(contender::PROXY_NAME.to_owned(), proxy.https)];
        clients.push(TestClient::start(&env.pki, spec)?);
    }
    for client in &mut clients {
        tokio::time::timeout(Duration::from_secs(60), client.wait_bound(1))
            .await
            .context("a tunnel did not bind within 60 s")?;
    }
    let rss_many = measure::tree_rss_kib(proxy.process.pid())?;
    Ok(TunnelMemory {
        tunnels,
        rss_none,
        rss_many,
    })
}

async fn high_rtt(
    plan: &Plan,
    env: &Env,
    origin: SocketAddr,
    options: &Options,
    rtt_ms: u64,
) -> RttResult {
    let link = Link {
        rtt: Duration::from_millis(rtt_ms),
        rate: plan.link_rate,
    };
    let duration = Duration::from_secs(plan.rtt_seconds);
    let mut result = RttResult {
        rtt_ms,
        plain: None,
        shroud: None,
        errors: Vec::new(),
    };
    let plain = async {
        let (_relay, addr) = contender::start_relay(env, origin, link).await?;
        let target = Target {
            addr,
            host: HOST.into(),
        };
        measure::download(&target, duration, SERIES_INTERVAL).await
    };
    match plain.await {
        Ok(series) => result.plain = Some(series),
        Err(err) => result.errors.push(format!("plain TCP: {err:#}")),
    }
    let shroud = async {
        let running = contender::start_shroud(env, origin, options, Some(link)).await?;
        contender::wait_serving(&running.target, Duration::from_secs(30)).await?;
        measure::download(&running.target, duration, SERIES_INTERVAL).await
    };
    match shroud.await {
        Ok(series) => result.shroud = Some(series),
        Err(err) => result.errors.push(format!("shroud: {err:#}")),
    }
    result
}

/// Starts the origin (this program's `origin` command).
async fn start_origin(env: &Env) -> anyhow::Result<(Process, SocketAddr)> {
    contender::start_own(env, &["origin".to_owned()], "origin").await
}

pub(crate) fn machine() -> String {
    let kernel = tool::kernel_release().unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = tool::cpu_model().unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} CPUs ({model}), Linux {kernel}")
}

/// Prints `message` with the time of day.
pub(crate) fn progress(message: &str) {
    println!("[{}] {message}", chrono_now());
}

fn chrono_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}
