//! Forwarding between the proxies of a fleet: visitors at the proxy that holds the tunnel
//! ("direct") against visitors at a second proxy that holds none and forwards each of them
//! over its peer link to the first ("forwarded", one hop).
//!
//! Both paths are measured in one run, one after the other, against the same origin, the same
//! client and the same load, so their ratio leaves out what the machine does between runs.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use shroud_tests::process::Process;
use shroud_tests::stack::{direct_client_args, make_key};

use crate::contender::{self, Env, Options, ShroudProxy, HOST};
use crate::measure::{self, Target, WrkResult};
use crate::run::{progress, Plan};

/// The tunnel name (and certificate) of the proxy holding the tunnel.
const HOLDER_NAME: &str = "holder.bench.test";
/// The tunnel name of the proxy that forwards.
const FORWARDER_NAME: &str = "forwarder.bench.test";
/// The fleet's secret (16 or more printable ASCII characters, in a file of mode 0600).
const FLEET_SECRET: &str = "shroud-bench-fleet-secret-on-loopback";
/// Longest the forwarding proxy may take to learn who holds the name.
const CONVERGE_LIMIT: Duration = Duration::from_secs(30);
/// Longest one request may wait at the forwarding proxy: more than its route wait (10 s),
/// during which a visitor for a name it does not know yet is held until gossip names a holder.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One kind of visitor's figures on both paths, one entry per run.
#[derive(Debug, Default, Serialize)]
pub struct Paths {
    /// At the proxy holding the tunnel.
    pub direct: Vec<WrkResult>,
    /// At the other proxy, forwarded to the holder.
    pub forwarded: Vec<WrkResult>,
}

/// Everything the forwarding comparison measured, raw; the report takes medians.
#[derive(Debug, Default, Serialize)]
pub struct FleetResults {
    /// The machine: kernel, CPUs.
    pub machine: String,
    /// Measurements of each path and kind of visitor.
    pub runs: usize,
    /// Length of each measurement, seconds.
    pub seconds: u64,
    /// Visitors at once.
    pub connections: usize,
    /// From the tunnel coming up to the first answer through the forwarding proxy, ms.
    pub converged_ms: Option<f64>,
    /// HTTPS visitors: a new TCP connection and TLS handshake per request (the bench's own).
    pub https: Paths,
    /// Plain-HTTP visitors: a new connection per request (wrk, `Connection: close`).
    pub http: Paths,
    /// Whether it ran alone (`--fleet-only`), apart from the other figures of the report.
    pub alone: bool,
    /// What failed.
    pub errors: Vec<String>,
    /// How long the comparison took, from starting the proxies to stopping them, seconds.
    pub elapsed_secs: f64,
}

/// Two proxies of one fleet and a client holding its tunnel to the first; every process is
/// stopped when this drops.
struct Fleet {
    holder: ShroudProxy,
    forwarder: ShroudProxy,
    _client: Process,
    /// From the tunnel coming up to the first answer through the forwarder.
    converged: Duration,
}

impl Fleet {
    /// Starts the holder, then the forwarder seeded with the holder's peer address, then the
    /// client (its tunnel to the holder only), and waits until a visitor at the forwarder is
    /// answered: gossip has converged.
    async fn start(env: &Env, origin: SocketAddr, options: &Options) -> anyhow::Result<Self> {
        let secret = env.dir.path().join("fleet.secret");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&secret)
            .with_context(|| format!("writing {}", secret.display()))?;
        file.write_all(FLEET_SECRET.as_bytes())?;
        drop(file);

        let key = env.dir.path().join("fleet-client.key");
        let policy = format!("{HOST} {}\n", make_key(&key)?);
        let member = |seed: Option<SocketAddr>| {
            let mut args: Vec<String> = [
                "--listen-peer",
                "127.0.0.1:0",
                "--fleet-secret-file",
                &secret.display().to_string(),
            ]
            .map(String::from)
            .into();
            if let Some(seed) = seed {
                args.extend(["--peer".into(), seed.to_string()]);
            }
            args
        };
        let holder = contender::start_shroud_proxy_with(
            env,
            HOLDER_NAME,
            &policy,
            options,
            &member(None),
            "fleet-holder",
        )
        .await
        .context("starting the holding proxy")?;
        let seed = holder
            .peer
            .context("the holding proxy has no peer listener")?;
        let forwarder = contender::start_shroud_proxy_with(
            env,
            FORWARDER_NAME,
            &policy,
            options,
            &member(Some(seed)),
            "fleet-forwarder",
        )
        .await
        .context("starting the forwarding proxy")?;

        // The client terminates visitors' TLS itself, so HTTPS visitors reach the same plain
        // origin as HTTP ones do.
        let (cert, cert_key) = env.pki.issue_files(HOST)?;
        let mut args =
            direct_client_args(&env.pki, &key, HOST, origin, &[(HOLDER_NAME, holder.https)]);
        args.extend([
            "--http-target".into(),
            origin.to_string(),
            "--max-streams".into(),
            "20000".into(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            cert_key.display().to_string(),
        ]);
        if let Some(bytes) = options.stream_buffer {
            args.extend(["--stream-buffer-bytes".into(), bytes.to_string()]);
        }
        let client = contender::start_shroud_client(env, &args, "fleet-client").await?;
        let up = Instant::now();

        let fleet = Self {
            holder,
            forwarder,
            _client: client,
            converged: Duration::ZERO,
        };
        wait_answered(&fleet.forwarded(false))
            .await
            .context("no visitor got through the forwarding proxy")?;
        let converged = up.elapsed();
        wait_answered(&fleet.direct(false))
            .await
            .context("no visitor got through the holding proxy")?;
        for target in [fleet.direct(true), fleet.forwarded(true)] {
            tokio::time::timeout(
                FIRST_REQUEST_TIMEOUT,
                measure::tls_get_page(&target, &env.pki.ca),
            )
            .await
            .context("an HTTPS request took too long")?
            .with_context(|| format!("an HTTPS visitor at {}", target.addr))?;
        }
        Ok(Self { converged, ..fleet })
    }

    /// Visitors at the holder, over TLS or plain HTTP.
    fn direct(&self, tls: bool) -> Target {
        target(&self.holder, tls)
    }

    /// Visitors at the forwarder.
    fn forwarded(&self, tls: bool) -> Target {
        target(&self.forwarder, tls)
    }
}

fn target(proxy: &ShroudProxy, tls: bool) -> Target {
    Target {
        addr: if tls { proxy.https } else { proxy.http },
        host: HOST.into(),
    }
}

/// Sends `GET /page` to `target` until one is answered, each attempt allowed more than the
/// proxy's route wait, for up to [`CONVERGE_LIMIT`].
async fn wait_answered(target: &Target) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_error = anyhow::anyhow!("no attempt made");
    while started.elapsed() < CONVERGE_LIMIT {
        match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, measure::get_page(target)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => last_error = err,
            Err(_) => last_error = anyhow::anyhow!("a GET took over {FIRST_REQUEST_TIMEOUT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last_error.context(format!("no GET answered within {CONVERGE_LIMIT:?}")))
}

/// Which proxy the visitors go to.
#[derive(Debug, Clone, Copy)]
enum Path {
    Direct,
    Forwarded,
}

/// Starts the fleet in front of `origin` and measures both paths, `plan.runs` times each,
/// the order of the two alternating from run to run.
pub async fn measure(
    plan: &Plan,
    env: &Env,
    origin: SocketAddr,
    options: &Options,
    machine: String,
    alone: bool,
) -> FleetResults {
    let started = Instant::now();
    let mut results = FleetResults {
        machine,
        alone,
        runs: plan.runs,
        seconds: plan.seconds,
        connections: plan.wrk_connections,
        ..FleetResults::default()
    };
    progress("forwarding: starting two proxies of a fleet and a client");
    match Fleet::start(env, origin, options).await {
        Ok(fleet) => {
            results.converged_ms = Some(fleet.converged.as_secs_f64() * 1e3);
            for round in 0..plan.runs {
                let order = if round % 2 == 0 {
                    [Path::Direct, Path::Forwarded]
                } else {
                    [Path::Forwarded, Path::Direct]
                };
                progress(&format!(
                    "forwarding: run {}/{}, {order:?}",
                    round + 1,
                    plan.runs
                ));
                measure_round(plan, env, &fleet, order, &mut results).await;
            }
        }
        Err(err) => results.errors.push(format!("start: {err:#}")),
    }
    results.elapsed_secs = started.elapsed().as_secs_f64();
    results
}

async fn measure_round(
    plan: &Plan,
    env: &Env,
    fleet: &Fleet,
    order: [Path; 2],
    results: &mut FleetResults,
) {
    let duration = Duration::from_secs(plan.seconds);
    let connections = plan.wrk_connections;
    for path in order {
        let (target, figures) = match path {
            Path::Direct => (fleet.direct(true), &mut results.https.direct),
            Path::Forwarded => (fleet.forwarded(true), &mut results.https.forwarded),
        };
        match measure::tls_new_connections(&target, &env.pki.ca, duration, connections).await {
            Ok(result) => figures.push(result),
            Err(err) => results.errors.push(format!("HTTPS, {path:?}: {err:#}")),
        }
    }
    for path in order {
        let (target, figures) = match path {
            Path::Direct => (fleet.direct(false), &mut results.http.direct),
            Path::Forwarded => (fleet.forwarded(false), &mut results.http.forwarded),
        };
        match measure::wrk(&target, duration, connections, false).await {
            Ok(result) => figures.push(result),
            Err(err) => results.errors.push(format!("HTTP, {path:?}: {err:#}")),
        }
    }
}
