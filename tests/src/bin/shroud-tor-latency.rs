//! `shroud-tor-latency`: how long a visitor waits for a hidden origin published through shroud
//! over Tor, against the same origin published as a C-tor onion service, on one private Tor
//! network on 127.0.0.1 that it starts itself (see `shroud_tests::tornet`; nothing reaches the
//! public Tor network).
//!
//! What it does, in order:
//! 1. Starts an HTTPS origin for `example.test`, a C-tor onion service forwarding port 443 to
//!    it, and a C-tor client with a SOCKS port; waits until both have bootstrapped and the
//!    service has uploaded its descriptor.
//! 2. Five times: a fresh Arti client (fresh state directory) bootstraps, then a shroud client
//!    over it binds one tunnel to a fresh in-process proxy. Both steps are timed. The last
//!    client and proxy stay up.
//! 3. Starts a proxy whose tunnel listener is also an onion service (`--onion-tunnel`, its own
//!    Arti) and a shroud client (another fresh Arti) bound through that onion service, so its
//!    tunnel uses no exit; both steps are timed.
//! 4. Makes the first onion connection (the C-tor client fetches the descriptor), then N
//!    rounds of one fresh visitor connection on each path: through the shroud proxy, through
//!    the proxy whose tunnel rides its onion service, to the
//!    onion through SOCKS (a SOCKS username of its own, so C-tor isolates it on a fresh
//!    rendezvous circuit), to the origin published as shroud's own onion service (`shroud
//!    --onion`, hosted by a fresh Arti client) through the same SOCKS client, and straight to
//!    the origin as a floor. Each connection times its first byte back (TLS ServerHello, after TCP connect
//!    and ClientHello; after the SOCKS handshake too for the onion) and a whole HTTPS GET; the
//!    origin's certificate is verified for `example.test` on every path.
//! 5. Prints a Markdown report and writes it, with how it was made, to `docs/TOR-LATENCY.md`.
//!
//! Every wait is bounded; every tor is stopped by pid when the run ends, on error too.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, ensure, Context as _};
use arti_client::{IsolationToken, StreamPrefs};
use rustls::RootCertStore;
use rustls_pki_types::ServerName;
use shroud_client::shared::{ClientConfig, Target, Timing};
use shroud_client::tor::{TorOptions, TorTransport, Vanguards};
use shroud_client::transport::Resolve;
use shroud_proxy::onion::{OnionOptions, OnionTunnels};
use shroud_tests::origin::byte_at;
use shroud_tests::stack::{authorize, ClientSpec, Pki, TestClient, TestProxy};
use shroud_tests::tool::{self, Args};
use shroud_tests::tornet::{self, OnionService, RelayKind, TorNet, TorUser};
use shroud_tests::{client_config, HttpOrigin};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The name the origin's certificate is issued for, and every visitor's SNI.
const HOST: &str = "example.test";
/// The path every visitor asks for, and the body the origin answers it with.
const PATH: &str = "/latency";
const BODY: &str = "hello from origin: GET /latency\n";
/// Visitor connections per path, unless `--samples` says otherwise.
const DEFAULT_SAMPLES: usize = 20;
/// At most this many per path, so a typo cannot run for hours.
const MAX_SAMPLES: usize = 1000;
/// Fresh Arti clients whose bootstrap and first tunnel are timed.
const ARTI_TRIALS: usize = 5;
/// One Arti bootstrap.
const ARTI_BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(120);
/// From a bootstrapped Arti to a bound tunnel.
const TUNNEL_TIMEOUT: Duration = Duration::from_secs(90);
/// From a bootstrapped Arti to a tunnel bound through a proxy's onion service, which may still
/// be publishing its descriptor.
const ONION_TUNNEL_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a stopped trial client gets to close its tunnel.
const CLIENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the onion service may take to upload its descriptor.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(180);
/// One visitor connection, from connect to complete response.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at the first onion connection, spaced by [`FIRST_ONION_RETRY`]: C-tor on a testing
/// network asks an HSDir again for a descriptor only after 5 s.
const FIRST_ONION_ATTEMPTS: usize = 15;
const FIRST_ONION_RETRY: Duration = Duration::from_secs(6);
/// The largest response a visitor reads.
const MAX_RESPONSE: usize = 64 * 1024;
/// Downloads per path (shroud's tunnel, a bare Arti stream), interleaved.
const DOWNLOADS: usize = 9;
/// The size of each download.
const DOWNLOAD_BYTES: u64 = 8 << 20;
/// How long one download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// What the runs of 2026-12-07 said about the two directions, for the report's observations.
const DIRECTION_NOTE: &str = "Until 2026-12-07 shroud's downloads were bimodal within a run, \
    about 3-5 MB/s or 8-15 (2.74, 4.90, 8.43, 8.22, 9.21, 2.85, 2.73, 3.22, 3.44 in one run), \
    while a bare stream moved the same bytes the same way at a steady pace. The slow ones were \
    held by yamux's stream window. yamux doubles a stream's receive window when the sender used \
    half of it within two round trips, and takes the round trip from one ping every 10 s, which \
    on an idle tunnel here measures 2.5-6 ms; under load a window update's round trip, behind \
    the data queued in the circuit, is several times that, so a download that started at \
    yamux's initial 256 KiB never used half of it fast enough to grow, and stayed there. In one \
    run with yamux's debug log beside Arti's congestion window (a patched tor-proto, for the \
    experiment only), every slow download (3.2-4.6 MB/s) kept the 256 KiB window and every \
    fast one grew it to 0.5-2 MiB, and which a download got followed the last ping: 2.5-6 ms \
    before the slow ones, 31 ms (taken during a transfer) before the first fast ones. Arti's \
    congestion window on the tunnel's circuit stayed at 330-520 cells through the slow \
    downloads with fewer cells in flight than it allowed: the circuit waited for shroud. (An \
    earlier reading of the same log, that slow downloads grew their windows too, had taken a \
    later download's growth for theirs; and the exit's connection to the proxy, seen idle \
    with `ss -ti` through a slow run, was waiting for the same window.) The workspace now \
    builds yamux from third_party/yamux, which takes that round trip as at least 50 ms \
    (third_party/yamux/SHROUD.md): in two runs with it every one of 18 downloads moved \
    8.7-13.6 MB/s. That mode is gone, not all slowness: in four full runs of this tool that \
    evening shroud's median download was 5.90, 11.33, 4.31 and 10.25 MB/s against bare \
    uploads of 8.41, 9.88, 8.53 and 6.67, each run's downloads close together, and in the one \
    logged every download's window grew to 4 MiB. The bare upload has a slow mode of its own \
    (in that run five uploads at 5.1-6.7 MB/s, then four at 12.6-14.4), so what is left is in \
    the circuit's pace, which neither path controls; it was not pinned down. Ruled out before: the proxy's ACK timing (TCP_QUICKACK after every read), \
    and the relays' KIST scheduler as such (with tor's Vanilla scheduler every path ran 2-3x \
    faster, fast enough for yamux's rule).";

/// This program's name, in its messages.
const NAME: &str = "shroud-tor-latency";
const USAGE: &str = "usage: shroud-tor-latency [--samples N] [--doc PATH | --no-doc]

Starts a private Tor network on 127.0.0.1 and measures how long visitors wait for an origin
published through shroud (a tunnel held over Tor) and the same origin published as a C-tor
onion service. Prints a Markdown report and writes it to docs/TOR-LATENCY.md (or PATH).

  --samples N   fresh visitor connections per path (default 20)
  --doc PATH    write the report to PATH instead of the workspace's docs/TOR-LATENCY.md
  --no-doc      only print the report";

/// What the command line asked for.
struct Options {
    samples: usize,
    doc: Option<PathBuf>,
}

impl Options {
    /// Parses the arguments; `None` for `--help`.
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let mut options = Options {
            samples: DEFAULT_SAMPLES,
            doc: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/TOR-LATENCY.md")),
        };
        let mut args = Args::new(args);
        while let Some(flag) = args.next_flag() {
            match flag.name.as_str() {
                "-h" | "--help" => return Ok(None),
                "--samples" => {
                    let n: usize = args.number(&flag)?;
                    ensure!(
                        (1..=MAX_SAMPLES).contains(&n),
                        "--samples must be 1 to {MAX_SAMPLES}"
                    );
                    options.samples = n;
                }
                "--doc" => options.doc = Some(PathBuf::from(args.value(&flag)?)),
                "--no-doc" => options.doc = None,
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(Some(options))
    }
}

fn main() -> ExitCode {
    let parsed = Options::parse(std::env::args().skip(1));
    let options = match tool::options(NAME, USAGE, parsed) {
        Ok(options) => options,
        Err(code) => return code,
    };
    // tor_netdir warns about every weighting of this tiny network's relays.
    tool::init("warn,tor_netdir=error");
    tool::exit(NAME, run(&options))
}

/// Progress, on stderr; the report alone goes to stdout.
fn progress(msg: impl std::fmt::Display) {
    eprintln!("{NAME}: {msg}");
}

fn run(options: &Options) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    progress("starting a private Tor network on 127.0.0.1 (20-40 s)");
    let net = TorNet::start().context("starting the private Tor network")?;
    progress(format_args!(
        "network ready after {:.1} s",
        net.startup_time().as_secs_f64()
    ));
    let measured = runtime.block_on(measure(&net, options.samples));
    // Arti's and the proxies' tasks end with the runtime, before the tors they talk to.
    runtime.shutdown_timeout(Duration::from_secs(5));
    let results = measured?;

    let report = results.markdown();
    println!("{report}");
    if let Some(path) = &options.doc {
        let doc = document(&net, &results, &report);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
        progress(format_args!("wrote {}", path.display()));
    }
    // Dropping the network stops every tor by pid.
    drop(net);
    Ok(())
}

/// Everything one run measured.
struct Results {
    samples: usize,
    network_start: Duration,
    arti: Vec<ArtiTrial>,
    onion_client_bootstrap: Duration,
    onion_service_bootstrap: Duration,
    onion_published: Duration,
    first_onion: Sample,
    first_onion_attempts: usize,
    onion_proxy_start: Duration,
    onion_first_tunnel: Duration,
    shroud: Series,
    /// A bare Arti stream to the origin on a standing exit circuit of the shroud client's
    /// Arti: the floor for shroud's path.
    bare: Series,
    /// Download rates (MB/s): through shroud, and on a bare Arti stream.
    shroud_downloads: Vec<f64>,
    bare_downloads: Vec<f64>,
    /// Upload rates (MB/s) on a bare Arti stream: the same bytes the other way, from the
    /// client out through the exit, the way a tunnel carries a download.
    bare_uploads: Vec<f64>,
    backhaul: Series,
    onion: Series,
    /// Visitors of the origin published as shroud's own onion service (`shroud --onion`).
    own_onion: Series,
    direct: Series,
}

/// One fresh Arti client: bootstrap, then its first bound tunnel.
struct ArtiTrial {
    bootstrap: Duration,
    first_tunnel: Duration,
}

/// One visitor connection's timings, both from the start of its TCP connect.
#[derive(Clone, Copy)]
struct Sample {
    first_byte: Duration,
    response: Duration,
}

/// The connections of one path.
#[derive(Default)]
struct Series {
    samples: Vec<Sample>,
    failures: Vec<String>,
}

impl Series {
    fn record(&mut self, path: &str, result: anyhow::Result<Sample>) {
        match result {
            Ok(sample) => self.samples.push(sample),
            Err(err) => {
                progress(format_args!("{path}: a connection failed: {err:#}"));
                self.failures.push(format!("{err:#}"));
            }
        }
    }

    fn first_bytes(&self) -> Vec<Duration> {
        self.samples.iter().map(|s| s.first_byte).collect()
    }

    fn responses(&self) -> Vec<Duration> {
        self.samples.iter().map(|s| s.response).collect()
    }
}

/// Where a visitor's connection goes.
enum Route<'a> {
    /// Straight to this address (the proxy's public TLS port, or the origin).
    Tcp(SocketAddr),
    /// A stream of `tor`'s to this address, through an exit, on the circuit `prefs`' isolation
    /// keeps.
    Arti {
        tor: &'a shroud_tor::Tor,
        addr: SocketAddr,
        prefs: &'a StreamPrefs,
    },
    /// Through a SOCKS5 port to `host:443`, authenticating as `user`.
    Socks {
        socks: SocketAddr,
        host: &'a str,
        user: String,
    },
}

async fn measure(net: &TorNet, samples: usize) -> anyhow::Result<Results> {
    let pki = Pki::new()?;
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST]))
        .await
        .context("starting the origin")?;
    let roots = pki.ca.root_store();

    progress("starting a C-tor onion service and a C-tor SOCKS client on the network");
    // Publication is waited for before the Arti clients start, so the service's own circuit
    // building does not run alongside them.
    let (mut onion, onion_published, mut socks_tor) =
        tokio::task::block_in_place(|| start_c_tors(net, origin.addr()))?;
    let socks = socks_tor
        .socks
        .context("the C-tor client has no SOCKS port")?;
    progress(format_args!(
        "onion service published its descriptor {:.1} s after it started",
        onion_published.as_secs_f64()
    ));

    let mut arti = Vec::new();
    let mut kept: Option<(TestClient, TestProxy, Arc<shroud_tor::Tor>)> = None;
    for index in 0..ARTI_TRIALS {
        // One Arti client at a time: the previous one stops before the next starts.
        if let Some((client, proxy, _)) = kept.take() {
            stop_client(client).await;
            drop(proxy);
        }
        let (trial, client, proxy, tor) = arti_trial(net, &pki, origin.addr(), index).await?;
        progress(format_args!(
            "Arti client {}/{ARTI_TRIALS}: bootstrap {}, first tunnel {} later",
            index + 1,
            ms(trial.bootstrap),
            ms(trial.first_tunnel)
        ));
        arti.push(trial);
        kept = Some((client, proxy, tor));
    }
    let (client, proxy, tor) = kept.context("no Arti client was started")?;

    progress("starting a proxy with --onion-tunnel and a client bound through its onion service");
    let (onion_proxy_start, onion_first_tunnel, backhaul_client, backhaul_proxy) =
        onion_backhaul(net, &pki, origin.addr()).await?;
    progress(format_args!(
        "onion proxy up {} after start; its tunnel bound {} after the client's bootstrap",
        ms(onion_proxy_start),
        ms(onion_first_tunnel)
    ));

    let (first_onion, first_onion_attempts) =
        first_onion_connection(socks, &onion.hostname, &roots).await?;

    progress("publishing the origin as shroud's own onion service (shroud --onion)");
    let own = OwnOnion::start(net, &pki, origin.addr()).await?;
    // Its first connection waits for the descriptor to be published and fetched; it is not
    // one of the fresh-circuit samples.
    first_onion_connection(socks, &own.address, &roots).await?;

    // The floor for shroud's path: a stream of the same Arti client straight to the origin,
    // through an exit, on a circuit built before the rounds and kept (one isolation token).
    let mut bare_prefs = StreamPrefs::new();
    bare_prefs.set_isolation(IsolationToken::new());
    let bare_route = Route::Arti {
        tor: &tor,
        addr: origin.addr(),
        prefs: &bare_prefs,
    };
    let warm = visit(&bare_route, &roots)
        .await
        .context("the first bare Arti stream to the origin (it builds the circuit)")?;
    progress(format_args!(
        "bare Arti stream: circuit built; first byte {} on it",
        ms(warm.first_byte)
    ));

    progress(format_args!(
        "{samples} rounds of fresh visitors: shroud, bare Arti stream, shroud over onion, onion, \
         shroud --onion, direct"
    ));
    let (mut shroud, mut onion_series, mut direct) =
        (Series::default(), Series::default(), Series::default());
    let mut bare = Series::default();
    let mut own_onion = Series::default();
    let mut backhaul = Series::default();
    for round in 0..samples {
        shroud.record("shroud", visit(&Route::Tcp(proxy.https), &roots).await);
        bare.record("bare Arti stream", visit(&bare_route, &roots).await);
        let route = Route::Tcp(backhaul_proxy.https);
        backhaul.record("shroud over onion", visit(&route, &roots).await);
        let route = Route::Socks {
            socks,
            host: &onion.hostname,
            user: format!("visitor-{round}"),
        };
        onion_series.record("onion", visit(&route, &roots).await);
        let route = Route::Socks {
            socks,
            host: &own.address,
            user: format!("own-visitor-{round}"),
        };
        own_onion.record("shroud --onion", visit(&route, &roots).await);
        direct.record("direct", visit(&Route::Tcp(origin.addr()), &roots).await);
    }
    own.stop().await;

    progress(format_args!(
        "{DOWNLOADS} rounds of {} MiB each, interleaved: a download through shroud, one on a \
         bare Arti stream, an upload on it",
        DOWNLOAD_BYTES >> 20
    ));
    let sink_route = Route::Arti {
        tor: &tor,
        addr: start_sink().await?,
        prefs: &bare_prefs,
    };
    let (mut shroud_downloads, mut bare_downloads) = (Vec::new(), Vec::new());
    let mut bare_uploads = Vec::new();
    for _ in 0..DOWNLOADS {
        for (name, route, rates) in [
            ("shroud", &Route::Tcp(proxy.https), &mut shroud_downloads),
            ("bare Arti stream", &bare_route, &mut bare_downloads),
        ] {
            match download(route, &roots).await {
                Ok(rate) => rates.push(rate),
                Err(err) => progress(format_args!("{name}: a download failed: {err:#}")),
            }
        }
        match upload(&sink_route).await {
            Ok(rate) => bare_uploads.push(rate),
            Err(err) => progress(format_args!("bare Arti stream: an upload failed: {err:#}")),
        }
    }

    for (name, series) in [
        ("shroud", &shroud),
        ("bare Arti stream", &bare),
        ("shroud over onion", &backhaul),
        ("onion", &onion_series),
        ("shroud --onion", &own_onion),
        ("direct", &direct),
    ] {
        if series.samples.is_empty() {
            bail!(
                "every {name} connection failed; the first error: {}",
                series.failures.first().map_or("none", String::as_str)
            );
        }
    }

    stop_client(client).await;
    drop(proxy);
    stop_client(backhaul_client).await;
    drop(backhaul_proxy);
    let (onion_service_bootstrap, onion_client_bootstrap) =
        (onion.tor.bootstrap_time, socks_tor.bootstrap_time);
    tokio::task::block_in_place(|| -> anyhow::Result<()> {
        onion.tor.stop()?;
        socks_tor.stop()
    })?;
    Ok(Results {
        samples,
        network_start: net.startup_time(),
        arti,
        onion_client_bootstrap,
        onion_service_bootstrap,
        onion_published,
        first_onion,
        first_onion_attempts,
        onion_proxy_start,
        onion_first_tunnel,
        shroud,
        bare,
        shroud_downloads,
        bare_downloads,
        bare_uploads,
        backhaul,
        onion: onion_series,
        own_onion,
        direct,
    })
}

/// The origin published as shroud's own onion service, as `shroud --onion` does, from a fresh
/// Arti client of its own.
struct OwnOnion {
    address: String,
    task: tokio::task::JoinHandle<()>,
    shutdown: tokio_util::sync::CancellationToken,
    /// Keeps Arti running while the service is.
    _transport: Arc<TorTransport>,
}

impl OwnOnion {
    async fn start(net: &TorNet, pki: &Pki, origin: SocketAddr) -> anyhow::Result<Self> {
        let tor_dir = net.new_state_root()?;
        let options = TorOptions {
            state_dir: tor_dir.clone(),
            network_file: Some(net.network_file.clone()),
            vanguards: Vanguards::default(),
            resolve: Resolve::new(),
            bootstrap_timeout: ARTI_BOOTSTRAP_TIMEOUT,
            progress_bar: false,
        };
        let transport = Arc::new(
            TorTransport::bootstrap(options)
                .await
                .context("bootstrapping the onion service's Arti")?,
        );
        let spec = ClientSpec::new(HOST, origin, vec![]);
        let config = Arc::new(ClientConfig {
            hostname: spec.hostname,
            target: Target {
                host: origin.ip().to_string(),
                port: origin.port(),
            },
            http_target: None,
            origin_tls: None,
            acme: None,
            transport: transport.clone(),
            tls: shroud_client::tls::client_config(Some(&pki.ca_path))?,
            key: spec.key,
            timing: Timing::tor(),
            metrics: Arc::default(),
        });
        let shutdown = tokio_util::sync::CancellationToken::new();
        let settings = shroud_client::onion::OnionSettings {
            tor_dir,
            // No self-checks: their circuits would run alongside the measurements.
            probe_interval: None,
        };
        let onion =
            shroud_client::onion::launch(transport.client(), settings, config, shutdown.clone())
                .context("launching shroud's onion service")?;
        progress(format_args!(
            "shroud's own onion service: {}",
            onion.address
        ));
        Ok(Self {
            address: onion.address,
            task: onion.task,
            shutdown,
            _transport: transport,
        })
    }

    async fn stop(self) {
        self.shutdown.cancel();
        if tokio::time::timeout(CLIENT_STOP_TIMEOUT, self.task)
            .await
            .is_err()
        {
            progress("shroud's onion service did not stop within 10 s; leaving it");
        }
    }
}

/// Starts the onion service (port 443 to `origin`) and the SOCKS client side by side, and
/// waits until both have bootstrapped and the service has published its descriptor, which
/// it returns how long after its start it did.
fn start_c_tors(
    net: &TorNet,
    origin: SocketAddr,
) -> anyhow::Result<(OnionService, Duration, TorUser)> {
    std::thread::scope(|scope| {
        let service = scope.spawn(|| -> anyhow::Result<(OnionService, Duration)> {
            let service = net.start_onion_service("onion-service", 443, origin)?;
            let published = service.wait_published(PUBLISH_TIMEOUT)?;
            Ok((service, published))
        });
        let client = scope.spawn(|| net.start_socks_client("onion-client"));
        let service = service
            .join()
            .map_err(|_| anyhow!("starting the onion service panicked"))?;
        let client = client
            .join()
            .map_err(|_| anyhow!("starting the SOCKS client panicked"))?;
        // If one failed, the other's handle drops here and stops its tor.
        let (service, published) = service.context("starting the C-tor onion service")?;
        let client = client.context("starting the C-tor SOCKS client")?;
        Ok((service, published, client))
    })
}

/// A fresh Arti client (fresh state directory) bootstraps; then a shroud client over it binds
/// one tunnel to a fresh proxy. Returns both times, and the running client and proxy.
async fn arti_trial(
    net: &TorNet,
    pki: &Pki,
    origin: SocketAddr,
    index: usize,
) -> anyhow::Result<(ArtiTrial, TestClient, TestProxy, Arc<shroud_tor::Tor>)> {
    let mut spec = ClientSpec::new(HOST, origin, vec![]);
    spec.timing = Timing {
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(500),
        ..Timing::tor()
    };
    let proxy = TestProxy::start(
        pki,
        &format!("proxy{index}.test"),
        &authorize(HOST, &spec.key),
    )
    .await
    .context("starting a proxy")?;
    spec.proxies = vec![proxy.dial()];
    let mut resolve = Resolve::new();
    resolve.insert(&proxy.name, proxy.https.port(), proxy.https.ip());
    let options = TorOptions {
        state_dir: net.new_state_root()?,
        network_file: Some(net.network_file.clone()),
        vanguards: Vanguards::default(),
        resolve,
        bootstrap_timeout: ARTI_BOOTSTRAP_TIMEOUT,
        progress_bar: false,
    };

    let started = Instant::now();
    let transport = TorTransport::bootstrap(options)
        .await
        .context("bootstrapping Arti on the private network")?;
    let bootstrap = started.elapsed();
    let bootstrapped = Instant::now();
    let tor = transport.client();
    let mut client = TestClient::start_with_transport(pki, spec, Arc::new(transport))
        .context("starting the shroud client")?;
    tokio::time::timeout(TUNNEL_TIMEOUT, client.wait_bound(1))
        .await
        .map_err(|_| anyhow!("no tunnel bound within {TUNNEL_TIMEOUT:?} of bootstrap"))?;
    let first_tunnel = bootstrapped.elapsed();
    Ok((
        ArtiTrial {
            bootstrap,
            first_tunnel,
        },
        client,
        proxy,
        tor,
    ))
}

/// A proxy whose tunnel listener is also an onion service (its own Arti, fresh state), and a
/// shroud client over another fresh Arti bound through that service, so that its tunnel
/// never leaves Tor through an exit. Returns how long the proxy took to start (bootstrap and
/// launch), how long after the client's bootstrap its tunnel was bound (the descriptor's
/// publication may still be under way: the client retries), and the client and proxy.
async fn onion_backhaul(
    net: &TorNet,
    pki: &Pki,
    origin: SocketAddr,
) -> anyhow::Result<(Duration, Duration, TestClient, TestProxy)> {
    let started = Instant::now();
    let onion = OnionTunnels::start(OnionOptions {
        // A directory of its own inside the fresh root, made private by the proxy.
        state_dir: net.new_state_root()?.join("proxy"),
        network_file: Some(net.network_file.clone()),
        vanguards: Vanguards::default(),
        bootstrap_timeout: ARTI_BOOTSTRAP_TIMEOUT,
        port: 443,
        // No self-checks: their circuits would run alongside the measurements.
        probe_interval: None,
    })
    .await
    .context("starting the proxy's onion service")?;
    let proxy_start = started.elapsed();
    let mut spec = ClientSpec::new(HOST, origin, vec![]);
    spec.timing = Timing {
        backoff_base: Duration::from_millis(50),
        backoff_cap: Duration::from_millis(500),
        ..Timing::tor()
    };
    let authorized = authorize(HOST, &spec.key);
    let proxy = TestProxy::start_with_onion(pki, "onion-proxy.test", &authorized, onion)
        .await
        .context("starting the onion proxy")?;
    spec.onion_proxies = vec![proxy
        .onion_dial()
        .context("the onion proxy has no onion address")?];
    let options = TorOptions {
        state_dir: net.new_state_root()?,
        network_file: Some(net.network_file.clone()),
        vanguards: Vanguards::default(),
        resolve: Resolve::new(),
        bootstrap_timeout: ARTI_BOOTSTRAP_TIMEOUT,
        progress_bar: false,
    };
    let transport = TorTransport::bootstrap(options)
        .await
        .context("bootstrapping Arti for the client of the onion proxy")?;
    let bootstrapped = Instant::now();
    let mut client = TestClient::start_with_transport(pki, spec, Arc::new(transport))
        .context("starting the client of the onion proxy")?;
    tokio::time::timeout(ONION_TUNNEL_TIMEOUT, client.wait_bound(1))
        .await
        .map_err(|_| {
            anyhow!("no tunnel through the onion service within {ONION_TUNNEL_TIMEOUT:?}")
        })?;
    Ok((proxy_start, bootstrapped.elapsed(), client, proxy))
}

/// Cancels a client and waits (bounded) for its tunnels to close.
async fn stop_client(client: TestClient) {
    let TestClient { client, guard } = client;
    drop(guard);
    match tokio::time::timeout(CLIENT_STOP_TIMEOUT, client.join()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(%err, "stopped client reported"),
        Err(_) => progress("a stopped client did not finish within 10 s; leaving it"),
    }
}

/// The first connection to the onion: the C-tor client has no descriptor yet and fetches it.
/// Retried (bounded) in case the HSDir it asks has not stored the descriptor yet. Returns the
/// successful attempt's timings and how many attempts it took.
async fn first_onion_connection(
    socks: SocketAddr,
    onion: &str,
    roots: &RootCertStore,
) -> anyhow::Result<(Sample, usize)> {
    let mut last_error = None;
    for attempt in 1..=FIRST_ONION_ATTEMPTS {
        let route = Route::Socks {
            socks,
            host: onion,
            user: format!("first-{attempt}"),
        };
        match visit(&route, roots).await {
            Ok(sample) => {
                progress(format_args!(
                    "first onion connection: first byte {}, response {} (attempt {attempt})",
                    ms(sample.first_byte),
                    ms(sample.response)
                ));
                return Ok((sample, attempt));
            }
            Err(err) => {
                progress(format_args!(
                    "first onion connection, attempt {attempt}: {err:#}"
                ));
                last_error = Some(err);
                tokio::time::sleep(FIRST_ONION_RETRY).await;
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow!("no attempt made"))
        .context(format!(
            "the onion service was unreachable after {FIRST_ONION_ATTEMPTS} attempts"
        )))
}

/// One fresh visitor: connect (through SOCKS for an onion), TLS handshake for `example.test`
/// verified against `roots`, `GET /latency`, read the whole response.
async fn visit(route: &Route<'_>, roots: &RootCertStore) -> anyhow::Result<Sample> {
    tokio::time::timeout(SAMPLE_TIMEOUT, visit_inner(route, roots))
        .await
        .map_err(|_| anyhow!("no complete response within {SAMPLE_TIMEOUT:?}"))?
}

async fn visit_inner(route: &Route<'_>, roots: &RootCertStore) -> anyhow::Result<Sample> {
    // A fresh configuration per visitor: no TLS session to resume.
    let config = client_config(roots.clone(), &[]);
    let name = ServerName::try_from(HOST).context("the test host is a valid name")?;
    let request = format!(
        "GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: shroud-tor-latency\r\n\
         Connection: close\r\n\r\n"
    );

    let started = Instant::now();
    let stream = connect(route).await?;
    let mut tls = TlsConnector::from(config)
        .connect(name, FirstByte::new(stream))
        .await
        .context("TLS handshake for example.test (certificate verified)")?;
    let first_byte = tls
        .get_ref()
        .0
        .first_byte
        .context("the handshake ended without a byte received")?
        .duration_since(started);
    tls.write_all(request.as_bytes())
        .await
        .context("sending the request")?;
    tls.flush().await.context("sending the request")?;
    let (status, body) = read_response(&mut tls).await?;
    let response = started.elapsed();
    ensure!(status == 200, "the origin answered {status}");
    ensure!(
        body == BODY.as_bytes(),
        "unexpected body {:?}",
        String::from_utf8_lossy(&body)
    );
    Ok(Sample {
        first_byte,
        response,
    })
}

/// A visitor's connection, whatever its route.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Opens a visitor's connection along `route`.
async fn connect(route: &Route<'_>) -> anyhow::Result<Box<dyn Conn>> {
    Ok(match route {
        Route::Tcp(addr) => {
            let tcp = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connecting to {addr}"))?;
            tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
            Box::new(tcp)
        }
        Route::Socks { socks, host, user } => {
            Box::new(socks5_connect(*socks, host, 443, user).await?)
        }
        Route::Arti { tor, addr, prefs } => Box::new(
            tor.connect_with_prefs((addr.ip().to_string(), addr.port()), prefs)
                .await
                .with_context(|| format!("an Arti stream to {addr}"))?,
        ),
    })
}

/// One download of [`DOWNLOAD_BYTES`] along `route` (TLS verified, every byte checked), in
/// MB/s from the request sent to the last byte read.
async fn download(route: &Route<'_>, roots: &RootCertStore) -> anyhow::Result<f64> {
    tokio::time::timeout(DOWNLOAD_TIMEOUT, download_inner(route, roots))
        .await
        .map_err(|_| anyhow!("no complete download within {DOWNLOAD_TIMEOUT:?}"))?
}

/// A server on loopback that reads [`DOWNLOAD_BYTES`] from each connection, checks every one
/// against the download's pattern, and answers `k` once it has them all (or `x` on a wrong
/// byte): the far end of [`upload`].
async fn start_sink() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the upload sink")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut got = 0;
                let verdict = loop {
                    if got == DOWNLOAD_BYTES {
                        break b"k";
                    }
                    match tcp.read(&mut buf).await {
                        Ok(n @ 1..) => match check_bytes(got, &buf[..n]) {
                            Ok(at) if at <= DOWNLOAD_BYTES => got = at,
                            _ => break b"x",
                        },
                        _ => return,
                    }
                };
                let _ = tcp.write_all(verdict).await;
            });
        }
    });
    Ok(addr)
}

/// One upload of [`DOWNLOAD_BYTES`] along `route` to a [`start_sink`] sink: in MB/s from the
/// first byte written to the sink's answer that it has them all, intact. On a bare Arti
/// stream the bytes cross Tor from the client out through the exit, as a tunnel carries a
/// visitor's download.
async fn upload(route: &Route<'_>) -> anyhow::Result<f64> {
    let run = async {
        let mut stream = connect(route).await?;
        let started = Instant::now();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < DOWNLOAD_BYTES {
            let len = (DOWNLOAD_BYTES - sent).min(chunk.len() as u64) as usize;
            for (i, byte) in chunk[..len].iter_mut().enumerate() {
                *byte = byte_at(sent + i as u64);
            }
            stream
                .write_all(&chunk[..len])
                .await
                .context("writing the upload")?;
            sent += len as u64;
        }
        stream.flush().await.context("writing the upload")?;
        let mut verdict = [0u8; 1];
        stream
            .read_exact(&mut verdict)
            .await
            .context("waiting for the sink's answer")?;
        ensure!(&verdict == b"k", "the sink found a wrong byte");
        Ok(DOWNLOAD_BYTES as f64 / started.elapsed().as_secs_f64() / 1e6)
    };
    tokio::time::timeout(DOWNLOAD_TIMEOUT, run)
        .await
        .map_err(|_| anyhow!("no complete upload within {DOWNLOAD_TIMEOUT:?}"))?
}

async fn download_inner(route: &Route<'_>, roots: &RootCertStore) -> anyhow::Result<f64> {
    let config = client_config(roots.clone(), &[]);
    let name = ServerName::try_from(HOST).context("the test host is a valid name")?;
    let stream = connect(route).await?;
    let mut tls = TlsConnector::from(config)
        .connect(name, stream)
        .await
        .context("TLS handshake for example.test (certificate verified)")?;
    let request = format!(
        "GET /bytes/{DOWNLOAD_BYTES} HTTP/1.1\r\nHost: {HOST}\r\n\
         User-Agent: shroud-tor-latency\r\nConnection: close\r\n\r\n"
    );
    let started = Instant::now();
    tls.write_all(request.as_bytes())
        .await
        .context("sending the request")?;
    tls.flush().await.context("sending the request")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        let n = tls.read(&mut buf).await.context("reading the response")?;
        ensure!(n > 0, "connection closed before the response head ended");
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        ensure!(head.len() <= MAX_RESPONSE, "response head too long");
    };
    let text = String::from_utf8_lossy(&head[..body_start]);
    ensure!(
        text.starts_with("HTTP/1.1 200 "),
        "the origin answered {:?}",
        text.lines().next().unwrap_or_default()
    );
    let expected = format!("content-length: {DOWNLOAD_BYTES}\r\n");
    ensure!(
        text.to_ascii_lowercase().contains(&expected),
        "the response does not announce {DOWNLOAD_BYTES} bytes: {text:?}"
    );
    let mut got = check_bytes(0, &head[body_start..])?;
    while got < DOWNLOAD_BYTES {
        let n = tls.read(&mut buf).await.context("reading the body")?;
        ensure!(
            n > 0,
            "connection closed after {got} of {DOWNLOAD_BYTES} bytes"
        );
        got = check_bytes(got, &buf[..n])?;
    }
    ensure!(
        got == DOWNLOAD_BYTES,
        "{got} bytes where {DOWNLOAD_BYTES} were sent"
    );
    Ok(DOWNLOAD_BYTES as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// Checks that `bytes` are the download's bytes from `offset` on; returns the offset after them.
fn check_bytes(offset: u64, bytes: &[u8]) -> anyhow::Result<u64> {
    let mut at = offset;
    for &byte in bytes {
        ensure!(byte == byte_at(at), "byte {at} of the download is wrong");
        at += 1;
    }
    Ok(at)
}

/// Reads one HTTP/1.1 response with a `Content-Length`, and stops as soon as it is complete
/// (not at the connection's close, which would add the close's own trip).
async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head =
                std::str::from_utf8(&raw[..head_end]).context("response head is not UTF-8")?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse::<u16>().ok())
                .with_context(|| format!("bad status line in {head:?}"))?;
            let length = head
                .lines()
                .filter_map(|line| line.split_once(':'))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, value)| value.trim().parse::<usize>().ok())
                .context("response without a Content-Length")?;
            let body_start = head_end + 4;
            if raw.len() >= body_start + length {
                return Ok((status, raw[body_start..body_start + length].to_vec()));
            }
        }
        ensure!(
            raw.len() <= MAX_RESPONSE,
            "response larger than {MAX_RESPONSE} bytes"
        );
        let n = stream
            .read(&mut buf)
            .await
            .context("reading the response")?;
        ensure!(
            n > 0,
            "connection closed after {} bytes, before a complete response",
            raw.len()
        );
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A SOCKS5 CONNECT to `host:port` (the name resolved by the SOCKS server) with
/// username/password authentication; C-tor isolates streams by those credentials.
async fn socks5_connect(
    socks: SocketAddr,
    host: &str,
    port: u16,
    user: &str,
) -> anyhow::Result<TcpStream> {
    const PASSWORD: &[u8] = b"x";
    let user_len = u8::try_from(user.len()).context("SOCKS username longer than 255 bytes")?;
    let host_len = u8::try_from(host.len()).context("SOCKS host name longer than 255 bytes")?;
    let mut stream = TcpStream::connect(socks)
        .await
        .with_context(|| format!("connecting to the SOCKS port {socks}"))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;

    // Greeting: version 5, one method, username/password (RFC 1929).
    stream
        .write_all(&[5, 1, 2])
        .await
        .context("SOCKS greeting")?;
    let mut reply = [0u8; 2];
    stream
        .read_exact(&mut reply)
        .await
        .context("SOCKS greeting reply")?;
    ensure!(
        reply == [5, 2],
        "SOCKS server refused username/password auth ({reply:?})"
    );
    let mut auth = vec![1, user_len];
    auth.extend_from_slice(user.as_bytes());
    auth.push(PASSWORD.len() as u8);
    auth.extend_from_slice(PASSWORD);
    stream.write_all(&auth).await.context("SOCKS auth")?;
    stream
        .read_exact(&mut reply)
        .await
        .context("SOCKS auth reply")?;
    ensure!(reply == [1, 0], "SOCKS auth refused ({reply:?})");

    // CONNECT, address type 3: a domain name.
    let mut request = vec![5, 1, 0, 3, host_len];
    request.extend_from_slice(host.as_bytes());
    request.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&request).await.context("SOCKS CONNECT")?;
    let mut head = [0u8; 4];
    stream
        .read_exact(&mut head)
        .await
        .context("SOCKS CONNECT reply")?;
    ensure!(head[0] == 5, "not a SOCKS5 reply ({head:?})");
    if head[1] != 0 {
        bail!(
            "SOCKS CONNECT to {host}:{port} failed: {}",
            socks_error(head[1])
        );
    }
    let address_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => usize::from(stream.read_u8().await.context("SOCKS CONNECT reply")?),
        other => bail!("SOCKS reply with address type {other}"),
    };
    let mut bound = vec![0u8; address_len + 2];
    stream
        .read_exact(&mut bound)
        .await
        .context("SOCKS CONNECT reply")?;
    Ok(stream)
}

/// A SOCKS5 reply code in words, Tor's extended codes (`ExtendedErrors`) included.
fn socks_error(code: u8) -> String {
    let what = match code {
        1 => "general failure",
        2 => "not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        0xF0 => "onion service descriptor not found",
        0xF1 => "onion service descriptor invalid",
        0xF2 => "onion service introduction failed",
        0xF3 => "onion service rendezvous failed",
        0xF4 => "onion service client authorization missing",
        0xF5 => "onion service client authorization wrong",
        0xF6 => "invalid onion address",
        0xF7 => "onion service introduction timed out",
        _ => "unknown error",
    };
    format!("{what} (0x{code:02X})")
}

/// A stream that notes when its first byte arrived.
struct FirstByte<S> {
    inner: S,
    first_byte: Option<Instant>,
}

impl<S> FirstByte<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            first_byte: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstByte<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.first_byte.is_none() && buf.filled().len() > before {
            this.first_byte = Some(Instant::now());
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstByte<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Order statistics of a set of durations.
struct Stats {
    n: usize,
    median: Duration,
    p90: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    /// `None` for an empty set. The median of an even count is the mean of the middle two;
    /// p90 is the nearest-rank value.
    fn of(values: &[Duration]) -> Option<Self> {
        let mut sorted = values.to_vec();
        sorted.sort();
        let n = sorted.len();
        let (&min, &max) = (sorted.first()?, sorted.last()?);
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2
        };
        let rank = (n * 9).div_ceil(10).max(1);
        Some(Stats {
            n,
            median,
            p90: sorted[rank - 1],
            min,
            max,
        })
    }
}

/// Milliseconds with one decimal.
fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn ms_bare(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

impl Results {
    /// The report: the visitor table, the ratio of medians, the setup costs.
    fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "### Visitor latency ({} fresh connections per path, interleaved; ms)\n",
            self.samples
        );
        let _ = writeln!(
            out,
            "| Path | Timing | n | failed | median | p90 | min | max |\n\
             |---|---|--:|--:|--:|--:|--:|--:|"
        );
        let first = [self.first_onion];
        let first_series = Series {
            samples: first.to_vec(),
            failures: Vec::new(),
        };
        let paths: [(&str, &Series); 7] = [
            (
                "shroud: proxy, then the tunnel's existing Tor circuit",
                &self.shroud,
            ),
            (
                "bare Arti stream to the origin on a standing exit circuit (no shroud)",
                &self.bare,
            ),
            (
                "shroud, tunnel over the proxy's onion service (no exit)",
                &self.backhaul,
            ),
            (
                "C-tor onion service, fresh circuits (descriptor cached)",
                &self.onion,
            ),
            (
                "C-tor onion service, first connection (descriptor fetch)",
                &first_series,
            ),
            (
                "shroud --onion: the client's own onion service (Arti), fresh circuits",
                &self.own_onion,
            ),
            ("direct to the origin, no Tor (floor)", &self.direct),
        ];
        for (timing, pick) in [
            (
                "first byte",
                Series::first_bytes as fn(&Series) -> Vec<Duration>,
            ),
            ("HTTPS GET complete", Series::responses),
        ] {
            for (path, series) in paths {
                if let Some(stats) = Stats::of(&pick(series)) {
                    let _ = writeln!(
                        out,
                        "| {path} | {timing} | {} | {} | {} | {} | {} | {} |",
                        stats.n,
                        series.failures.len(),
                        ms_bare(stats.median),
                        ms_bare(stats.p90),
                        ms_bare(stats.min),
                        ms_bare(stats.max)
                    );
                }
            }
        }
        let ratio = |over: &Series, under: &Series, pick: fn(&Series) -> Vec<Duration>| match (
            Stats::of(&pick(over)),
            Stats::of(&pick(under)),
        ) {
            (Some(over), Some(under)) if !under.median.is_zero() => format!(
                "{:.1}×",
                over.median.as_secs_f64() / under.median.as_secs_f64()
            ),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            out,
            "\nRatio of medians, onion (fresh circuits) / shroud: first byte **{}**, \
             HTTPS GET **{}**.",
            ratio(&self.onion, &self.shroud, Series::first_bytes),
            ratio(&self.onion, &self.shroud, Series::responses)
        );
        let _ = writeln!(
            out,
            "\nRatio of medians, shroud with the tunnel over the proxy's onion service / through \
             an exit: first byte **{}**, HTTPS GET **{}**.",
            ratio(&self.backhaul, &self.shroud, Series::first_bytes),
            ratio(&self.backhaul, &self.shroud, Series::responses)
        );
        let _ = writeln!(
            out,
            "\nRatio of medians, shroud / a bare Arti stream on a standing circuit: first byte \
             **{}**, HTTPS GET **{}**.",
            ratio(&self.shroud, &self.bare, Series::first_bytes),
            ratio(&self.shroud, &self.bare, Series::responses)
        );
        if self.first_onion_attempts > 1 {
            let _ = writeln!(
                out,
                "\nThe first onion connection succeeded at attempt {} (earlier attempts failed; \
                 the figure is the successful attempt alone).",
                self.first_onion_attempts
            );
        }

        out.push_str(&self.downloads_markdown());
        out.push_str(&self.targets_markdown());

        let _ = writeln!(out, "\n### Setup costs (ms)\n");
        let _ = writeln!(
            out,
            "| Step | n | median | min | max |\n|---|--:|--:|--:|--:|"
        );
        let bootstraps: Vec<Duration> = self.arti.iter().map(|t| t.bootstrap).collect();
        let tunnels: Vec<Duration> = self.arti.iter().map(|t| t.first_tunnel).collect();
        let rows: [(&str, Vec<Duration>); 8] = [
            ("Arti bootstrap, fresh state directory", bootstraps),
            ("Arti bootstrapped → first shroud tunnel bound", tunnels),
            (
                "proxy with --onion-tunnel: start → Arti bootstrapped, service launched",
                vec![self.onion_proxy_start],
            ),
            (
                "Arti bootstrapped → first tunnel bound over the proxy's onion service",
                vec![self.onion_first_tunnel],
            ),
            (
                "C-tor SOCKS client: start → bootstrapped",
                vec![self.onion_client_bootstrap],
            ),
            (
                "C-tor onion service host: start → bootstrapped",
                vec![self.onion_service_bootstrap],
            ),
            (
                "C-tor onion service: start → descriptor uploaded",
                vec![self.onion_published],
            ),
            (
                "private network: keys → consensus listing every relay",
                vec![self.network_start],
            ),
        ];
        for (step, values) in rows {
            if let Some(stats) = Stats::of(&values) {
                let _ = writeln!(
                    out,
                    "| {step} | {} | {} | {} | {} |",
                    stats.n,
                    ms_bare(stats.median),
                    ms_bare(stats.min),
                    ms_bare(stats.max)
                );
            }
        }
        let each: Vec<String> = self
            .arti
            .iter()
            .map(|t| format!("{} + {}", ms_bare(t.bootstrap), ms_bare(t.first_tunnel)))
            .collect();
        let _ = writeln!(
            out,
            "\nEach Arti client, bootstrap + first tunnel (ms): {}.",
            each.join(", ")
        );

        let _ = writeln!(
            out,
            "\n### Every visitor connection, in the order made (first byte / GET complete, ms)\n"
        );
        for (path, series) in [
            ("shroud", &self.shroud),
            ("bare Arti stream", &self.bare),
            ("shroud over the proxy's onion service", &self.backhaul),
            ("onion, fresh circuits", &self.onion),
            ("shroud --onion, fresh circuits", &self.own_onion),
            ("direct", &self.direct),
        ] {
            let each: Vec<String> = series
                .samples
                .iter()
                .map(|s| format!("{}/{}", ms_bare(s.first_byte), ms_bare(s.response)))
                .collect();
            let _ = writeln!(out, "- {path}: {}", each.join(", "));
        }
        out
    }
}

impl Results {
    /// The downloads: MB/s per path.
    fn downloads_markdown(&self) -> String {
        let mut out = format!(
            "\n### Downloads ({DOWNLOADS} per path, {} MiB each, interleaved; MB/s)\n\n\
             | Path | n | median | min | max |\n|---|--:|--:|--:|--:|\n",
            DOWNLOAD_BYTES >> 20
        );
        for (path, rates) in [
            (
                "shroud: proxy, then the tunnel's Tor circuit",
                &self.shroud_downloads,
            ),
            (
                "bare Arti stream on a standing exit circuit, exit → Arti (download)",
                &self.bare_downloads,
            ),
            (
                "the same bare Arti stream's circuit, Arti → exit (upload: a tunnel's direction)",
                &self.bare_uploads,
            ),
        ] {
            let Some(median) = median(rates) else {
                let _ = writeln!(out, "| {path} | 0 | — | — | — |");
                continue;
            };
            let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let max = rates.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "| {path} | {} | {median:.2} | {min:.2} | {max:.2} |",
                rates.len()
            );
        }
        let each = |rates: &[f64]| {
            rates
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "\nIn the order made: shroud {}; bare Arti stream, download {}; upload {}.",
            each(&self.shroud_downloads),
            each(&self.bare_downloads),
            each(&self.bare_uploads)
        );
        out
    }

    /// Issue 16's targets for the Tor path, each met or not, with its ratio.
    fn targets_markdown(&self) -> String {
        let mut out = String::from(
            "\n### Targets\n\n| Target | Measured | Ratio | Met |\n|---|---|--:|---|\n",
        );
        let met = |ok: bool| if ok { "yes" } else { "**no**" };
        let shroud = Stats::of(&self.shroud.first_bytes());
        let bare = Stats::of(&self.bare.first_bytes());
        if let (Some(shroud), Some(bare)) = (&shroud, &bare) {
            let r = shroud.median.as_secs_f64() / bare.median.as_secs_f64();
            let _ = writeln!(
                out,
                "| visitor's first byte through shroud ≤ 2× a bare Arti stream's (medians) | \
                 {} against {} | {r:.2}× | {} |",
                ms(shroud.median),
                ms(bare.median),
                met(r <= 2.0)
            );
        }
        if let Some(shroud) = &shroud {
            let r = shroud.p90.as_secs_f64() / shroud.median.as_secs_f64();
            let _ = writeln!(
                out,
                "| no two speeds: shroud's first byte p90 ≤ 1.5× its median | \
                 p90 {}, median {} | {r:.2}× | {} |",
                ms(shroud.p90),
                ms(shroud.median),
                met(r <= 1.5)
            );
        }
        if let (Some(shroud), Some(bare)) =
            (median(&self.shroud_downloads), median(&self.bare_uploads))
        {
            let r = shroud / bare;
            let _ = writeln!(
                out,
                "| download through shroud ≥ 0.9 of a bare Arti stream's carrying the same bytes \
                 the same way through Tor (medians; client → exit) | \
                 {shroud:.2} against {bare:.2} MB/s | {r:.2} | {} |",
                met(r >= 0.9)
            );
        }
        out
    }
}

/// The median of `values`; `None` for none.
fn median(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The whole of `docs/TOR-LATENCY.md`: what was measured, on what, how to reproduce it, and
/// the report.
fn document(net: &TorNet, results: &Results, report: &str) -> String {
    let count = |kind: RelayKind| net.relays().iter().filter(|r| r.kind == kind).count();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = tool::cpu_model().unwrap_or_else(|| "unknown CPU".into());
    let kernel = tool::kernel_release().unwrap_or_else(|| "unknown".into());
    let tor = tornet::tor_version().unwrap_or_else(|| "tor (version unknown)".into());
    let arti = arti_version().unwrap_or_else(|| "0.47".into());
    let samples = results.samples;
    // The shroud connections whose first byte met no stall (see Observations), and for each
    // the time from first byte to complete response.
    let fast: Vec<Duration> = results
        .shroud
        .samples
        .iter()
        .filter(|s| s.first_byte < Duration::from_millis(20))
        .map(|s| s.response.saturating_sub(s.first_byte))
        .collect();
    let shroud_n = results.shroud.samples.len();
    let own_onion_note = match (
        Stats::of(&results.own_onion.first_bytes()),
        Stats::of(&results.onion.first_bytes()),
        Stats::of(&results.shroud.first_bytes()),
    ) {
        (Some(own), Some(ctor), Some(shroud)) if !shroud.median.is_zero() => format!(
            "A fresh visitor's first byte through the origin's own onion service (`shroud \
             --onion`, hosted by Arti) came in a median {} (p90 {}, max {}), against {} through \
             the C-tor onion service: the same protocol work per visitor (an introduction and a \
             fresh rendezvous circuit), so about the same cost, {:.1}× a visitor through a \
             proxy and a tunnel's existing circuit. What `--onion` buys is not speed but a path \
             with no proxy and no exit.",
            ms(own.median),
            ms(own.p90),
            ms(own.max),
            ms(ctor.median),
            own.median.as_secs_f64() / shroud.median.as_secs_f64()
        ),
        _ => "Too few connections to the origin's own onion service succeeded to compare.".into(),
    };
    let slow = results
        .shroud
        .samples
        .iter()
        .filter(|s| s.first_byte >= Duration::from_millis(40))
        .count();
    let fast_note = match Stats::of(&fast) {
        Some(stats) => format!(
            "In this run {} of {shroud_n} shroud first bytes took under 20 ms and {slow} took \
             40 ms or more; in the fast ones, the rest of the handshake and the request (one \
             more round trip over the tunnel) took a median {} from first byte to GET \
             complete.",
            stats.n,
            ms(stats.median)
        ),
        None => format!(
            "In this run none of the {shroud_n} shroud first bytes took under 20 ms (the \
             fastest: {}).",
            Stats::of(&results.shroud.first_bytes()).map_or_else(|| "none".into(), |s| ms(s.min))
        ),
    };
    let download_note = match (
        median(&results.shroud_downloads),
        median(&results.bare_uploads),
        median(&results.bare_downloads),
    ) {
        (Some(shroud), Some(up), Some(down)) => format!(
            "Through the tunnel a download moved a median {shroud:.2} MB/s. On a bare Arti \
             stream the same bytes moved {up:.2} MB/s going out from Arti through the exit, the \
             way the tunnel carries them ({:.2} of it), and {down:.2} MB/s coming in from the \
             exit ({:.2}). {DIRECTION_NOTE} A tunnel adds TLS and yamux framing inside Tor's \
             cells and one more hop on loopback, little beside the circuit's own pace: Tor's \
             flow control lets a stream run only so far ahead of its SENDMEs, so the rate is \
             set by round trips through the relays, and single transfers vary by 2-4× from \
             one to the next (every one is listed above). Before Arti's connections had Nagle \
             off, a tunnel moved 2.55 MB/s against 5.23 on a bare stream's download (0.49) in \
             a run on 2026-12-07; with it off, 6.66 against 7.17. With delayed ACKs off for \
             the whole interface (see above) both were faster still, 10.6 against 12.6 MB/s \
             (0.84).",
            shroud / up,
            shroud / down
        ),
        _ => "This run has no download figures.".to_owned(),
    };
    // The onion back-haul beside the exit path: first byte, and the one more round trip over
    // the tunnel that completes the GET.
    let rest = |series: &Series| -> Vec<Duration> {
        series
            .samples
            .iter()
            .map(|s| s.response.saturating_sub(s.first_byte))
            .collect()
    };
    let backhaul_note = match (
        Stats::of(&results.backhaul.first_bytes()),
        Stats::of(&results.shroud.first_bytes()),
        Stats::of(&rest(&results.backhaul)),
        Stats::of(&rest(&results.shroud)),
    ) {
        (Some(onion_first), Some(exit_first), Some(onion_rest), Some(exit_rest)) => format!(
            "A fresh visitor's first byte came back in a median {} through a tunnel over the \
             proxy's onion service, against {} through an exit; the rest of the TLS handshake \
             and the request, one more round trip over the tunnel, took a median {} against {}.",
            ms(onion_first.median),
            ms(exit_first.median),
            ms(onion_rest.median),
            ms(exit_rest.median)
        ),
        _ => "This run has no figures for it.".to_owned(),
    };
    let (authorities, middles, exits) = (
        count(RelayKind::Authority),
        count(RelayKind::Middle),
        count(RelayKind::Exit),
    );
    format!(
        r#"# Visitor latency: shroud over Tor vs. a C-tor onion service

Generated by `shroud-tor-latency` on {date} (UTC). Reproduce with:

```sh
cargo run --release -p shroud-tests --bin shroud-tor-latency -- --samples {samples}
```

It needs Debian's `tor` (`tor`, `tor-gencert`); it starts its own private Tor network and
rewrites this file. Progress goes to stderr, the report to stdout.

## The question

shroud's promise is low latency: the client holds one TLS+yamux tunnel per proxy over a
Tor circuit it built in advance, so a visitor connects to the proxy directly and the proxy
opens a stream on that tunnel; no visitor waits for a circuit. The alternative users would
pick is publishing the origin as a Tor onion service, which visitors reach with a Tor
client: each new (isolated) visitor connection needs an introduction and a fresh
rendezvous circuit, and the very first one a descriptor fetch too.

## What was measured

One private Tor network on 127.0.0.1 ({authorities} directory authorities, {middles} middle
relays, {exits} exits; C-tor relays), one HTTPS origin for `example.test` (a test CA's
certificate; every visitor verifies it for `example.test`, so every path reaches the real
origin end to end), published three ways at once:

- **shroud**: an in-process proxy; a shroud client in this process reaching it through
  embedded Arti {arti} (its tunnel on its own 3-hop circuit to an exit, which connects to
  the proxy). A visitor TCP-connects to the proxy's public TLS port.
- **shroud, tunnel over the proxy's onion service**: a second in-process proxy that also
  hosts its tunnel listener as an onion service (`--onion-tunnel`, its own Arti), and a
  second shroud client (its own Arti) bound through that service (`NAME@ADDRESS.onion`): its
  tunnel rides a rendezvous circuit, six hops and no exit. Visitors connect to this proxy's
  public TLS port exactly as to the first.
- **C-tor onion service**: a separate `tor` with `HiddenServiceDir` and
  `HiddenServicePort 443 -> origin`; visitors use a second `tor` as their client, through
  its SOCKS port. Each visitor uses its own SOCKS username (`IsolateSOCKSAuth`, tor's
  default), so tor gives it a fresh rendezvous circuit, as it would a new, unlinkable
  visitor; the descriptor stays cached after the first connection. The first connection,
  which fetches the descriptor from an HSDir, is reported on its own row.
- **shroud --onion**: the same origin published as shroud's own onion service, hosted by
  Arti {arti} as `shroud --onion` does (`onion::launch`, port 443 to the origin; a fresh Arti
  client of its own here). Visitors reach it through the same C-tor client and SOCKS port as
  the C-tor onion service, each with its own SOCKS username, so each gets a fresh rendezvous
  circuit; its first connection (descriptor fetch) is made before the rounds and not counted.
- **bare Arti stream**: no shroud at all: the visitor is the shroud client's own Arti, which
  opens a stream to the origin through an exit on a circuit it has standing (one isolation
  token for all of them, the circuit built by a warm-up stream first), the same kind of
  circuit a tunnel rides. This is the baseline the speed targets are set against: shroud can
  hardly beat one Tor stream on a ready circuit, and should cost little more.
- **direct**: the visitor connects to the origin itself, no Tor: the floor (local TCP and
  TLS cost).

For every visitor connection (a fresh TCP connection, a fresh TLS configuration, so no
session resumption), two timings, both from the start of the TCP connect (to the proxy,
the SOCKS port, or the origin):

- **first byte**: the first byte read back after sending the TLS ClientHello (for the
  onion, after the SOCKS handshake, which returns once tor has the rendezvous circuit and
  the stream is connected). That byte is the origin's ServerHello: through shroud it went
  origin → client → tunnel over the Tor circuit → proxy → visitor.
- **HTTPS GET complete**: TLS handshake done, `GET {PATH}` sent, and the whole response
  read (per its `Content-Length`).

Then downloads: {downloads} times each, interleaved, a visitor fetches {download_mib} MiB from the
origin (`GET /bytes/N` over TLS, the certificate verified, every byte checked against the
origin's pattern) through the shroud tunnel and on a bare Arti stream as above; the rate is
bytes over the time from the request sent to the last byte read. The two do not cross Tor the
same way: a bare stream's download comes in from the exit to Arti, while through shroud the
origin's bytes go out from the client's Arti to the exit (the tunnel is the client's
connection to the proxy). So each round also uploads the same bytes on the bare stream's
circuit, from Arti out through the exit to a sink on loopback that checks every byte and
answers once it has them all (the rate is bytes over the time from the first byte written to
that answer). The speed target is set against that upload, the bare stream moving the bytes
in the tunnel's direction.

The paths are measured in interleaved rounds (shroud, shroud over onion, onion, shroud
--onion, direct, then again), one connection at a time, so slow periods of the machine hit all
paths alike. Before that, the setup costs: {trials} fresh Arti clients, each with a fresh state
directory, bootstrap (consensus and microdescriptors from the authorities); each then binds
one shroud tunnel to a fresh proxy (circuit, TLS to the proxy, bind handshake), timed
separately; then the onion proxy's start and its client's first tunnel (descriptor fetch,
introduction, rendezvous, TLS, bind).

## Machine and limits

{cores} cores ({cpu}), Linux {kernel}, {tor}, arti-client {arti}, release build.
Every relay, proxy, origin and client is on the loopback interface, so link latency is about
zero: the figures show protocol round trips and the CPU cost of building circuits (and of
the relays' cryptography), not real-world internet latency. On the public Tor network each
round trip through a circuit costs tens to hundreds of milliseconds, and an onion
connection needs several more of them than a stream on an existing circuit, so the gap in
absolute terms grows there; the ratio here only says how much protocol work each path
does per visitor.

## Results

{report}

## Observations

**Where the remaining slow first bytes come from.** {fast_note} Until 2026-12-07 every
visitor's first exchange left shroud as two small writes in each direction (the client's
one-byte stream acknowledgement at once, the ServerHello a few milliseconds later; yamux
flushing each frame on its own), and most first bytes took 45-87 ms instead of 3: on a
relay connection, tor holds a second small write under Nagle's algorithm until the first is
acknowledged, and a Linux receiver with nothing to send back delays that ACK by 40 ms. Now
the session writes what one turn of it produced as one write, the acknowledgement rides in
the ServerHello's frame (PROTOCOL.md §7.3), Arti's connections to its guard have Nagle
off (`shroud_tor::runtime`), and the two sockets shroud owns that a relay writes to (the
proxy's end of a tunnel, the client's links to its guard) acknowledge short reads at once
(`TCP_QUICKACK`, `shroud_mux::quickack`). In a pair of runs on 2026-12-07, with and without
that last change, it took a bare Arti stream's first byte from a median of 52.3 to 20.0 ms and
shroud's HTTPS GET from 50.7 to 16.7 ms, but left shroud's slow first bytes as they were (7
and 8 of 20 at 40 ms or more). What stalls remain are between relays, where shroud has no
socket. The check: with
delayed ACKs turned off for the whole loopback interface (`ip route change table local local
127.0.0.0/8 dev lo proto kernel scope host src 127.0.0.1 quickack 1`, root, undone after),
a run on 2026-12-07 gave shroud a first byte median of 3.2 ms, p90 6.6, max 12.7, with no
sample near 40 ms, the bare Arti stream 15.5 ms (p90 20.2) instead of about 52, and the tunnel
over the proxy's onion service 12.6 ms instead of 93. So on this network of idle loopback
relays the slow mode belongs to the relays' TCP, and it hits a bare Arti stream too (most of
its first bytes here took about 52 ms, where shroud's take 3); on busy public relays other traffic carries ACKs and it is probably rarer,
but that was not measured. The p90 target asks for no second mode: in the run without
delayed ACKs the spread left was 2.1× at a 3 ms median (a few samples at 6-13 ms),
probably the relays' scheduling rather than a stall (not investigated).

**Downloads.** {download_note}

**The onion back-haul.** {backhaul_note} That tunnel rides a rendezvous circuit: six relays or
more between the client and the proxy instead of three (full vanguards, the default since
2026-12-07, lengthen both halves to keep the relays next to each guard fixed), and no exit.
Its visitors still start at the proxy's public port and their streams ride a circuit built in advance, so no visitor
waits for a circuit or a descriptor here either: what the extra hops cost is round trips. On
this loopback network a relay hop costs almost nothing on the wire, so the gap is mostly the
relays' delayed ACKs on more hops (with them off, 12.6 ms to the first byte: see above); it
varies from run to run (three runs on 2026-12-07 without vanguards gave medians of 56, 64 and 99 ms to the first
byte, against 46 ms through an exit each time; the first with full vanguards, 96 ms against
47), and was not investigated further. On the public network each extra hop adds
its real round trip, so expect the back-haul to cost more there than here. The client's
first tunnel through the onion service (descriptor fetch, introduction, rendezvous, TLS,
bind) is in the setup costs.

**shroud --onion against the C-tor onion service.** {own_onion_note}

**The onion path's tail.** Fresh onion connections usually cost one introduction and
one rendezvous, but some take much longer (p90 and max above; up to 7.6 s in an earlier
run). The cause was not investigated; the median is the figure to compare.

**Setup outliers on a young network.** The network is measured within a minute or two of
its first full consensus. In an earlier run one fresh Arti client bootstrapped just after
a new consensus and could not pick an exit for 74 s (stderr: `rejected 7/8 as not
exiting to desired ports`), which shows up as the max of the first-tunnel row when it
happens; the median is not affected.
"#,
        date = tool::utc_date(SystemTime::now()),
        trials = ARTI_TRIALS,
        downloads = DOWNLOADS,
        download_mib = DOWNLOAD_BYTES >> 20,
    )
}

/// arti-client's version from the workspace's Cargo.lock.
fn arti_version() -> Option<String> {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
        .ok()?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"arti-client\"" {
            let version = lines.next()?.trim().strip_prefix("version = ")?;
            return Some(version.trim_matches('"').to_owned());
        }
    }
    None
}
