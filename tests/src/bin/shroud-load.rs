//! `shroud-load`: many visitor connections open at once through one tunnel, and what they
//! cost the proxy and the client in memory.
//!
//! For each count C it is given, it starts a fresh `shroud-proxy` and a fresh `shroud` (the
//! real binaries, found beside this one: build them with `cargo build --release --bins`), the
//! client publishing a TLS echo origin that runs in a child process of this tool (so that the
//! visitors' C descriptors and the origin's C fit under separate limits). Then:
//!
//! 1. a few warm-up visitors come and go, and the proxy's and client's resident set sizes
//!    (`VmRSS`) are sampled: the idle figure;
//! 2. C visitors connect from 127.50.0.0/16 (a few hundred per source address, as from many
//!    hosts), each completes a TLS handshake with the origin, verifying its certificate, and
//!    has one line echoed, so the path is proven end to end; all C stay open;
//! 3. with all C open, RSS and open descriptors are sampled again;
//! 4. the visitors close and both processes are stopped by PID.
//!
//! It prints a table: connections, whether all completed, RSS idle and loaded, and
//! (loaded − idle) / C for the proxy and the client. The soft limit on open files is raised to
//! the hard limit first; the children inherit it.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use rustls::ClientConfig;
use shroud_tests::process::Process;
use shroud_tests::scale::{self, spread_source};
use shroud_tests::stack::{log_addr, make_key, proxy_args, Pki};
use shroud_tests::tool::{self, Args};
use shroud_tests::{client_config, EchoOrigin};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The published name, and every visitor's SNI.
const HOST: &str = "load.example.test";
/// The proxy's tunnel name.
const PROXY_NAME: &str = "proxy.load.test";
/// Visitors sharing one source address (well under any sane per-address limit).
const PER_ADDRESS: usize = 200;
/// Second octet of the visitors' source addresses.
const SOURCE_GROUP: u8 = 50;
/// Visitors that come and go before the idle sample.
const WARM_UP: usize = 32;
/// One visitor's connect, handshake and echo.
const VISITOR_TIMEOUT: Duration = Duration::from_secs(60);
/// All C visitors of one round.
const ROUND_TIMEOUT: Duration = Duration::from_secs(600);
/// A process's start, up to its "listening" or "tunnel up" line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The client streams the proxy may hold beyond C (the control stream, the warm-up).
const STREAM_HEADROOM: usize = 64;

/// This program's name, in its messages.
const NAME: &str = "shroud-load";
const USAGE: &str = "usage: shroud-load [--connections N[,N...]] [--parallel N] [--bin-dir DIR]

Opens N visitor TLS connections at once through one shroud tunnel (real shroud-proxy and
shroud binaries on 127.0.0.1) and reports the proxy's and the client's memory per connection.
Build the binaries first: cargo build --release --bins

  --connections N,...  counts to measure, one fresh proxy and client each (default 1000,10000)
  --parallel N         handshakes in flight at once while opening (default 256)
  --bin-dir DIR        where shroud-proxy and shroud are (default: beside this program)";

/// What the command line asked for.
struct Options {
    connections: Vec<usize>,
    parallel: usize,
    bin_dir: PathBuf,
}

impl Options {
    /// Parses the arguments; `None` for `--help`.
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let exe = std::env::current_exe().context("locating this program")?;
        let mut options = Options {
            connections: vec![1000, 10_000],
            parallel: 256,
            bin_dir: exe.parent().map(Path::to_path_buf).unwrap_or_default(),
        };
        let mut args = Args::new(args);
        while let Some(flag) = args.next_flag() {
            match flag.name.as_str() {
                "-h" | "--help" => return Ok(None),
                "--connections" => {
                    let text = args.value(&flag)?;
                    options.connections = text
                        .split(',')
                        .map(|n| n.trim().parse::<usize>().ok().filter(|n| *n > 0))
                        .collect::<Option<_>>()
                        .with_context(|| format!("--connections {text:?}: counts above 0"))?;
                }
                "--parallel" => {
                    options.parallel = args.number(&flag)?;
                    ensure!(options.parallel > 0, "--parallel must be above 0");
                }
                "--bin-dir" => options.bin_dir = PathBuf::from(args.value(&flag)?),
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(Some(options))
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--origin-child") {
        return tool::exit(NAME, origin_child(args.skip(1)));
    }
    let options = match tool::options(NAME, USAGE, Options::parse(args)) {
        Ok(options) => options,
        Err(code) => return code,
    };
    tool::exit(NAME, run(options))
}

/// The origin, in a process of its own: a TLS echo server with the certificate and key in
/// the two files named, which prints `listening addr=...` and serves until killed (or until
/// its parent dies).
fn origin_child(mut args: impl Iterator<Item = String>) -> anyhow::Result<()> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    // Never outlive the tool, whatever ends it.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .context("PR_SET_PDEATHSIG")?;
    scale::raise_fd_limit().context("raising RLIMIT_NOFILE")?;
    let (Some(cert), Some(key)) = (args.next(), args.next()) else {
        bail!("--origin-child CERT KEY");
    };
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {cert}"))?;
    let key = PrivateKeyDer::from_pem_file(&key).with_context(|| format!("reading {key}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let origin = EchoOrigin::tls(Arc::new(config)).await?;
        eprintln!("listening addr={}", origin.addr());
        std::future::pending::<()>().await;
        drop(origin);
        Ok(())
    })
}

/// One measured round.
struct Round {
    connections: usize,
    completed: usize,
    first_error: Option<String>,
    open_time: Duration,
    proxy_idle: u64,
    proxy_loaded: u64,
    client_idle: u64,
    client_loaded: u64,
    proxy_fds: usize,
    client_fds: usize,
}

fn run(options: Options) -> anyhow::Result<()> {
    let largest = options.connections.iter().copied().max().unwrap_or(0) as u64;
    // The visitors, and a margin for everything else; each child needs its own C plus a margin.
    let soft = scale::ensure_fd_limit(largest + 256)?;
    let proxy_bin = options.bin_dir.join("shroud-proxy");
    let client_bin = options.bin_dir.join("shroud");
    for bin in [&proxy_bin, &client_bin] {
        ensure!(
            bin.exists(),
            "{} is not built; run `cargo build --release --bins` first (or give --bin-dir)",
            bin.display()
        );
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let pki = Pki::new()?;
        let (origin_cert, origin_key) = pki.ca.issue(&[HOST]).write_files(pki.dir(), "origin")?;
        let exe = std::env::current_exe()?;
        let mut origin = Process::spawn(
            &exe,
            &[
                "--origin-child".to_owned(),
                origin_cert.display().to_string(),
                origin_key.display().to_string(),
            ],
        )?;
        let origin_addr = log_addr(&origin.wait_for_line("listening", START_TIMEOUT).await?)?;

        let key_path = pki.dir().join("client.key");
        let key = make_key(&key_path)?;
        let mut base_proxy_args = vec!["--listen-https".to_owned(), "127.0.0.1:0".into()];
        base_proxy_args.extend(proxy_args(&pki, PROXY_NAME, &format!("{HOST} {key}\n"))?);
        let proxy_help = help_text(&proxy_bin)?;
        let client_help = help_text(&client_bin)?;
        let visitors = client_config(pki.ca.root_store(), &[]);

        let mut rounds = Vec::new();
        for &connections in &options.connections {
            let limit = (connections + STREAM_HEADROOM).to_string();
            let mut proxy_args = base_proxy_args.clone();
            proxy_args.extend([
                "--drain-timeout-secs".into(),
                "1".into(),
                "--max-streams-per-tunnel".into(),
                limit.clone(),
                "--max-connections".into(),
                (connections * 2 + 1024).to_string(),
            ]);
            // The limits per visitor address and per hostname are not what this measures.
            for flag in per_something_flags(&proxy_help) {
                proxy_args.extend([flag, limit.clone()]);
            }
            let mut proxy = Process::spawn(&proxy_bin, &proxy_args)?;
            let line = proxy
                .wait_for_line("listener=\"https\"", START_TIMEOUT)
                .await?;
            let proxy_addr = log_addr(&line)?;

            let mut client_args = vec![
                HOST.to_owned(),
                origin_addr.to_string(),
                "--transport".into(),
                "direct".into(),
                "--proxy-ca".into(),
                pki.ca_path.display().to_string(),
                "--key".into(),
                key_path.display().to_string(),
                "--proxy".into(),
                format!("{PROXY_NAME}:{}", proxy_addr.port()),
                "--resolve".into(),
                format!("{PROXY_NAME}:{}:{}", proxy_addr.port(), proxy_addr.ip()),
            ];
            if client_help.contains("--max-streams") {
                client_args.extend(["--max-streams".to_owned(), limit.clone()]);
            } else {
                eprintln!("shroud-load: this shroud has no --max-streams; it keeps its default");
            }
            let mut client = Process::spawn(&client_bin, &client_args)?;
            client.wait_for_line("tunnel up", START_TIMEOUT).await?;

            let round = measure(
                connections,
                options.parallel,
                proxy_addr,
                &visitors,
                (proxy.pid(), client.pid()),
            )
            .await?;
            client.kill();
            proxy.kill();
            eprintln!("{}", row(&round));
            rounds.push(round);
        }
        origin.kill();
        print!("{}", table(&rounds, soft));
        let failed: Vec<_> = rounds
            .iter()
            .filter(|r| r.completed != r.connections)
            .collect();
        ensure!(
            failed.is_empty(),
            "not every connection completed: {}",
            failed
                .iter()
                .map(|r| format!(
                    "{} of {} ({})",
                    r.completed,
                    r.connections,
                    r.first_error.as_deref().unwrap_or("?")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        Ok(())
    })
}

/// `program --help`, for the flags it has.
fn help_text(program: &Path) -> anyhow::Result<String> {
    let output = std::process::Command::new(program)
        .arg("--help")
        .output()
        .with_context(|| format!("{} --help", program.display()))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The proxy's `--max-connections-per-...` flags (per visitor address, per hostname).
fn per_something_flags(help: &str) -> Vec<String> {
    let mut flags: Vec<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == '=')
        .filter(|word| word.starts_with("--max-connections-per-"))
        .map(|word| word.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .map(str::to_owned)
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// Warms up, samples idle memory, opens `connections` visitors, samples again.
async fn measure(
    connections: usize,
    parallel: usize,
    proxy: SocketAddr,
    visitors: &Arc<ClientConfig>,
    (proxy_pid, client_pid): (u32, u32),
) -> anyhow::Result<Round> {
    let warm = open_visitors(WARM_UP, parallel, proxy, visitors).await;
    ensure!(
        warm.failed == 0,
        "warm-up visitors failed: {}",
        warm.first_error.unwrap_or_default()
    );
    drop(warm);
    let proxy_idle = scale::rss_bytes(proxy_pid)?;
    let client_idle = scale::rss_bytes(client_pid)?;

    let started = Instant::now();
    let opened = bounded(
        ROUND_TIMEOUT,
        async { Ok(open_visitors(connections, parallel, proxy, visitors).await) },
        "opening the visitors",
    )
    .await?;
    let open_time = started.elapsed();
    let proxy_loaded = scale::rss_bytes(proxy_pid)?;
    let client_loaded = scale::rss_bytes(client_pid)?;
    let proxy_fds = scale::open_fds(proxy_pid)?;
    let client_fds = scale::open_fds(client_pid)?;
    let completed = opened.streams.len();
    drop(opened.streams);
    Ok(Round {
        connections,
        completed,
        first_error: opened.first_error,
        open_time,
        proxy_idle,
        proxy_loaded,
        client_idle,
        client_loaded,
        proxy_fds,
        client_fds,
    })
}

/// Visitors that completed, held open, and how the others failed.
struct Opened {
    streams: Vec<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    failed: usize,
    first_error: Option<String>,
}

/// Opens `n` visitors, `parallel` handshakes at a time; each verifies the origin's
/// certificate and has one line echoed.
async fn open_visitors(
    n: usize,
    parallel: usize,
    proxy: SocketAddr,
    config: &Arc<ClientConfig>,
) -> Opened {
    let gate = Arc::new(Semaphore::new(parallel));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let (gate, config) = (gate.clone(), config.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            bounded(VISITOR_TIMEOUT, visit(i, proxy, config), "one visitor").await
        });
    }
    let mut opened = Opened {
        streams: Vec::with_capacity(n),
        failed: 0,
        first_error: None,
    };
    while let Some(done) = tasks.join_next().await {
        match done.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(stream) => opened.streams.push(stream),
            Err(err) => {
                opened.failed += 1;
                opened.first_error.get_or_insert_with(|| format!("{err:#}"));
            }
        }
    }
    opened
}

/// One visitor: TLS to the origin through the proxy, one line echoed.
async fn visit(
    i: usize,
    proxy: SocketAddr,
    config: Arc<ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let source = spread_source(SOURCE_GROUP, i, PER_ADDRESS);
    let mut stream = scale::tls_connect_from(source, proxy, HOST, config).await?;
    let line = format!("visitor {i:08}\n");
    stream.write_all(line.as_bytes()).await?;
    stream.flush().await?;
    let mut echoed = vec![0u8; line.len()];
    stream
        .read_exact(&mut echoed)
        .await
        .context("reading the echo")?;
    ensure!(echoed == line.as_bytes(), "the echo differs");
    Ok(stream)
}

async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = anyhow::Result<T>>,
    what: &str,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .with_context(|| format!("{what}: not done within {limit:?}"))?
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn per_connection_kib(idle: u64, loaded: u64, connections: usize) -> f64 {
    loaded.saturating_sub(idle) as f64 / 1024.0 / connections.max(1) as f64
}

fn row(r: &Round) -> String {
    format!(
        "| {} | {} | {:.1} s | {:.1} → {:.1} MiB | {:.1} → {:.1} MiB | {:.1} KiB | {:.1} KiB | {} / {} |",
        r.connections,
        if r.completed == r.connections {
            format!("all {}", r.completed)
        } else {
            format!("**{} of {}**", r.completed, r.connections)
        },
        r.open_time.as_secs_f64(),
        mib(r.proxy_idle),
        mib(r.proxy_loaded),
        mib(r.client_idle),
        mib(r.client_loaded),
        per_connection_kib(r.proxy_idle, r.proxy_loaded, r.connections),
        per_connection_kib(r.client_idle, r.client_loaded, r.connections),
        r.proxy_fds,
        r.client_fds,
    )
}

fn table(rounds: &[Round], soft_limit: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nconcurrent visitor connections through one tunnel (RLIMIT_NOFILE {soft_limit}, {} CPUs)\n",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let _ = writeln!(
        out,
        "| connections | completed | time to open all | proxy RSS idle → loaded | client RSS idle → loaded | proxy per connection | client per connection | open fds proxy / client |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for r in rounds {
        let _ = writeln!(out, "{}", row(r));
    }
    out
}
