//! shroud's own parts, started for a test: proxies and clients, in-process or as the real
//! binaries.
//!
//! In-process parts take listeners bound to `127.0.0.1:0` and a cancellation token, so a test
//! knows every address before anything connects. Binaries are started with `--listen-* 127.0.0.1:0`
//! and report the addresses they bound in their log, which the harness reads; they are stopped
//! by PID when their handle drops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use shroud_client::client::Client;
use shroud_client::shared::{ClientConfig, ProxyAddr, Target, Timing};
use shroud_client::transport::{DirectTransport, Resolve};
use shroud_mux::auth::SecretKey;
use shroud_proxy::policy::Policy;
use shroud_proxy::server::bind_listener;
use shroud_proxy::server::Listeners;
use shroud_proxy::shared::{Limits, ProxyConfig};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::pki::TestCa;
use crate::process::Process;

/// Port 0 on loopback: the kernel picks a free port.
const LOOPBACK: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// The files a deployment needs, made for one test: a CA that signs proxy certificates, and a
/// directory to keep them in.
pub struct Pki {
    /// The certificate authority that signs proxies' (and origins') certificates.
    pub ca: TestCa,
    /// `ca.pem`, for `--proxy-ca`.
    pub ca_path: PathBuf,
    dir: TempDir,
}

impl Pki {
    /// A fresh CA and directory.
    pub fn new() -> anyhow::Result<Self> {
        let ca = TestCa::new("shroud test CA");
        let dir = tempfile::tempdir()?;
        let ca_path = ca.write_pem(dir.path(), "ca")?;
        Ok(Self { ca, ca_path, dir })
    }

    /// The directory holding this PKI's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A TLS server configuration for an origin serving `names` over HTTP/1.1, with a leaf
    /// certificate this PKI's CA issued.
    pub fn origin_tls(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        self.ca.issue(names).server_config(&[b"http/1.1"])
    }

    /// Issues a certificate for `name` and writes `NAME.pem` and `NAME.key` (mode 0600).
    pub fn issue_files(&self, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        self.ca.issue(&[name]).write_files(self.dir.path(), name)
    }
}

/// A proxy running in this process.
pub struct TestProxy {
    /// Its tunnel name (SNI and certificate name).
    pub name: String,
    /// The public TLS listener (visitors and tunnels).
    pub https: SocketAddr,
    /// The public HTTP listener.
    pub http: SocketAddr,
    /// The tunnel-only listener.
    pub tunnel: SocketAddr,
    /// Its tunnel listener's onion service, `ADDRESS.onion` and port, when it has one.
    pub onion: Option<(String, u16)>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestProxy {
    /// Starts a proxy named `name` with default limits and the given authorized-file text.
    pub async fn start(pki: &Pki, name: &str, authorized: &str) -> anyhow::Result<Self> {
        Self::start_with(pki, name, authorized, Limits::default()).await
    }

    /// Starts one proxy for each of `names`, with default limits and the same
    /// authorized-file text.
    pub async fn start_each<const N: usize>(
        pki: &Pki,
        names: [&str; N],
        authorized: &str,
    ) -> anyhow::Result<[Self; N]> {
        let mut proxies = Vec::with_capacity(N);
        for name in names {
            proxies.push(Self::start(pki, name, authorized).await?);
        }
        proxies
            .try_into()
            .map_err(|_| anyhow::anyhow!("started a proxy for each name, yet not N of them"))
    }

    /// Starts a proxy with explicit limits.
    pub async fn start_with(
        pki: &Pki,
        name: &str,
        authorized: &str,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        Self::start_full(pki, name, authorized, None, limits, None).await
    }

    /// Starts a proxy whose tunnel listener is also the onion service `onion`
    /// (`--onion-tunnel`), already launched.
    pub async fn start_with_onion(
        pki: &Pki,
        name: &str,
        authorized: &str,
        onion: shroud_proxy::onion::OnionTunnels,
    ) -> anyhow::Result<Self> {
        Self::start_full(pki, name, authorized, None, Limits::default(), Some(onion)).await
    }

    /// How a client dials this proxy's onion service: `NAME@ADDRESS.onion:PORT`.
    pub fn onion_dial(&self) -> Option<ProxyAddr> {
        self.onion.as_ref().map(|(address, port)| ProxyAddr {
            name: self.name.clone(),
            port: *port,
            onion: Some(address.clone()),
        })
    }

    /// Starts a proxy that also authorizes keys by `_shroud` TXT records, asking `dns_server`.
    pub async fn start_with_dns(
        pki: &Pki,
        name: &str,
        authorized: &str,
        dns_server: SocketAddr,
    ) -> anyhow::Result<Self> {
        let authorizer = shroud_proxy::dns_auth::DnsAuthorizer::new(
            Some(dns_server),
            shroud_proxy::dns_auth::DnsAuthLimits::default(),
        )?;
        Self::start_full(
            pki,
            name,
            authorized,
            Some(authorizer),
            Limits::default(),
            None,
        )
        .await
    }

    async fn start_full(
        pki: &Pki,
        name: &str,
        authorized: &str,
        dns: Option<shroud_proxy::dns_auth::DnsAuthorizer>,
        limits: Limits,
        onion: Option<shroud_proxy::onion::OnionTunnels>,
    ) -> anyhow::Result<Self> {
        let (cert, key) = pki.issue_files(name)?;
        let config = ProxyConfig {
            tunnel_name: name.to_owned(),
            tls: shroud_proxy::server::tunnel_tls_config(&cert, &key)?,
            policy: Policy::parse(authorized)?,
            dns,
            word_domains: Vec::new(),
            limits,
            fleet: None,
        };
        let https = bind_listener(LOOPBACK)?;
        let http = bind_listener(LOOPBACK)?;
        let tunnel = bind_listener(LOOPBACK)?;
        let (https_addr, http_addr) = (https.local_addr()?, http.local_addr()?);
        let tunnel_addr = tunnel.local_addr()?;
        let onion_addr = onion
            .as_ref()
            .map(|onion| (onion.address().to_owned(), onion.port()));
        let listeners = Listeners {
            https: Some(https),
            http: Some(http),
            tunnel: Some(tunnel),
            peer: None,
            onion,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(shroud_proxy::server::run(
            listeners,
            config,
            shutdown.clone(),
        ));
        Ok(Self {
            name: name.to_owned(),
            https: https_addr,
            http: http_addr,
            tunnel: tunnel_addr,
            onion: onion_addr,
            shutdown,
            task: Some(task),
        })
    }

    /// Where a client dials this proxy.
    pub fn dial(&self) -> (String, SocketAddr) {
        (self.name.clone(), self.https)
    }

    /// Starts a graceful shutdown (as SIGTERM does) and waits for the proxy to finish draining.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }

    /// Starts a graceful shutdown and returns at once.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// What a test client publishes, and where.
pub struct ClientSpec {
    /// Hostname to bind.
    pub hostname: String,
    /// Where TLS visitors go.
    pub target: SocketAddr,
    /// Where plain-HTTP visitors go.
    pub http_target: Option<SocketAddr>,
    /// Proxies: tunnel name and the address it really listens on.
    pub proxies: Vec<(String, SocketAddr)>,
    /// The client's key.
    pub key: SecretKey,
    /// Terminate visitors' TLS at the client, as `--tls-cert/--tls-key` do.
    pub origin_tls: Option<tokio_rustls::TlsAcceptor>,
    /// A certificate from ACME, as `--acme` (or `--acme-export`) gets.
    pub acme: Option<shroud_client::shared::AcmeTls>,
    /// Where the list of proxies comes from, when not `proxies` (which then only says where
    /// each name resolves, as `--resolve` does).
    pub fleet: Option<Box<dyn shroud_client::fleet::FleetSource>>,
    /// Timeouts; tests shorten the backoff so reconnects happen quickly.
    pub timing: Timing,
    /// Proxies dialed at their onion service (`NAME@ADDRESS.onion`), through a Tor transport,
    /// besides `proxies`.
    pub onion_proxies: Vec<ProxyAddr>,
}

impl ClientSpec {
    /// A spec with a fresh key and test-friendly timing (fast backoff).
    pub fn new(hostname: &str, target: SocketAddr, proxies: Vec<(String, SocketAddr)>) -> Self {
        let key = SecretKey::generate().unwrap_or_else(|_| SecretKey::from_seed(&[42; 32]));
        Self {
            hostname: hostname.to_owned(),
            target,
            http_target: None,
            proxies,
            key,
            origin_tls: None,
            acme: None,
            fleet: None,
            timing: Timing {
                backoff_base: Duration::from_millis(50),
                backoff_cap: Duration::from_millis(500),
                ..Timing::default()
            },
            onion_proxies: Vec::new(),
        }
    }
}

/// A client running in this process.
pub struct TestClient {
    /// The running client, with its tunnels' states.
    pub client: Client,
    /// Stops the client when the test drops it.
    pub guard: tokio_util::sync::DropGuard,
}

impl TestClient {
    /// Starts a client that trusts `pki`'s CA for proxies and dials each proxy's real address
    /// under its tunnel name (as `--resolve` does).
    pub fn start(pki: &Pki, spec: ClientSpec) -> anyhow::Result<Self> {
        let mut resolve = Resolve::new();
        for (name, addr) in &spec.proxies {
            resolve.insert(name, addr.port(), addr.ip());
        }
        let transport = Arc::new(DirectTransport::new(resolve, spec.timing.connect_timeout));
        Self::start_with_transport(pki, spec, transport)
    }

    /// Starts a client that reaches its proxies through `transport` (a [`TorTransport`] made
    /// by the caller, say, to time its bootstrap apart from the tunnels), trusting `pki`'s CA.
    ///
    /// [`TorTransport`]: shroud_client::tor::TorTransport
    pub fn start_with_transport(
        pki: &Pki,
        spec: ClientSpec,
        transport: Arc<dyn shroud_client::transport::Transport>,
    ) -> anyhow::Result<Self> {
        let proxies = spec
            .proxies
            .iter()
            .map(|(name, addr)| ProxyAddr::new(name.clone(), addr.port()))
            .chain(spec.onion_proxies.iter().cloned())
            .collect();
        let target = |addr: SocketAddr| Target {
            host: addr.ip().to_string(),
            port: addr.port(),
        };
        let config = ClientConfig {
            hostname: spec.hostname,
            target: target(spec.target),
            http_target: spec.http_target.map(target),
            origin_tls: spec.origin_tls,
            acme: spec.acme,
            transport,
            tls: shroud_client::tls::client_config(Some(&pki.ca_path))?,
            key: spec.key,
            timing: spec.timing,
            metrics: Arc::default(),
        };
        let source = match spec.fleet {
            Some(fleet) => shroud_client::fleet::ProxySource::Dynamic(fleet),
            None => shroud_client::fleet::ProxySource::Static(proxies),
        };
        let shutdown = CancellationToken::new();
        let client = Client::spawn(config, source, shutdown.clone())?;
        Ok(Self {
            client,
            guard: shutdown.drop_guard(),
        })
    }

    /// Starts a client that reaches its proxies through Tor on the private network whose
    /// Arti configuration is `network_file`, keeping Tor's state under `state_dir`. Proxy names
    /// resolve (at the exit) to the addresses in `spec`, as `--resolve` does.
    pub async fn start_tor(
        pki: &Pki,
        spec: ClientSpec,
        network_file: &Path,
        state_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut resolve = Resolve::new();
        for (name, addr) in &spec.proxies {
            resolve.insert(name, addr.port(), addr.ip());
        }
        let options = shroud_client::tor::TorOptions {
            state_dir: state_dir.to_owned(),
            network_file: Some(network_file.to_owned()),
            vanguards: shroud_client::tor::Vanguards::default(),
            resolve,
            bootstrap_timeout: Duration::from_secs(120),
            progress_bar: false,
        };
        let transport = shroud_client::tor::TorTransport::bootstrap(options).await?;
        Self::start_with_transport(pki, spec, Arc::new(transport))
    }

    /// Waits until `n` tunnels are bound.
    pub async fn wait_bound(&mut self, n: usize) {
        self.client.wait_bound(n).await
    }
}

/// The authorized-file line that lets `key` bind `hostname`.
pub fn authorize(hostname: &str, key: &SecretKey) -> String {
    format!("{hostname} {}\n", key.public())
}

/// Path of one of the workspace's binaries, built by `cargo test --workspace` (the proxy and
/// client crates have integration tests of their own, so cargo builds their binaries before
/// any test runs).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test binary> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace` (or `cargo build --bins` first)",
        path.display()
    );
    path
}

/// Creates a client key file at `path`, as `shroud key` does (PKCS#8 PEM, mode 0600; a key
/// already there is kept), and returns its public key as a user would copy it into an
/// authorized file.
pub fn make_key(path: &Path) -> anyhow::Result<String> {
    let (secret, _created) = shroud_mux::keyfile::load_or_create(path)
        .with_context(|| format!("making a client key at {}", path.display()))?;
    Ok(secret.public().to_string())
}

/// Reads the `addr=` field of a log line such as `listening addr=127.0.0.1:4000 listener="https"`.
pub fn log_addr(line: &str) -> anyhow::Result<SocketAddr> {
    let field = line
        .split_whitespace()
        .find_map(|word| word.strip_prefix("addr="))
        .with_context(|| format!("no addr= in {line:?}"))?;
    Ok(field.parse()?)
}

/// Arguments for a `shroud` client binary with the direct transport, publishing `hostname`
/// at `target` through `proxies` (name and address each), trusting the proxies' test CA,
/// with short backoff (1 s cap) and keepalive (2 s) so tests see failures handled quickly.
pub fn direct_client_args(
    pki: &Pki,
    key: &Path,
    hostname: &str,
    target: SocketAddr,
    proxies: &[(&str, SocketAddr)],
) -> Vec<String> {
    let mut args = vec![
        hostname.to_owned(),
        target.to_string(),
        "--transport".into(),
        "direct".into(),
        "--proxy-ca".into(),
        pki.ca_path.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--max-backoff-secs".into(),
        "1".into(),
        "--keepalive-secs".into(),
        "2".into(),
    ];
    for (name, addr) in proxies {
        args.extend([
            "--proxy".into(),
            format!("{name}:{}", addr.port()),
            "--resolve".into(),
            format!("{name}:{}:{}", addr.port(), addr.ip()),
        ]);
    }
    args
}

/// Arguments for a `shroud-proxy` binary named `name`, with a certificate `pki`'s CA issues
/// for `name` and `authorized` as its policy, both written to files in `pki`'s directory. The
/// caller adds where it listens (`--listen-https`) and anything else.
pub fn proxy_args(pki: &Pki, name: &str, authorized: &str) -> anyhow::Result<Vec<String>> {
    let (cert, key) = pki.issue_files(name)?;
    let policy = pki.dir().join(format!("{name}.authorized"));
    std::fs::write(&policy, authorized).with_context(|| format!("writing {}", policy.display()))?;
    Ok(vec![
        "--tunnel-name".into(),
        name.into(),
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--authorized".into(),
        policy.display().to_string(),
    ])
}

/// A `shroud-proxy` process on loopback, with its files.
pub struct ProxyProcess {
    /// The process.
    pub process: Process,
    /// Its public TLS address.
    pub https: SocketAddr,
    /// Its arguments, to restart it on the same port.
    pub args: Vec<String>,
}

impl ProxyProcess {
    /// Starts the real proxy binary named `name`, listening for TLS on `https` (port 0 for a
    /// fresh port), with `authorized` as its policy.
    pub async fn start(
        pki: &Pki,
        name: &str,
        authorized: &str,
        https: SocketAddr,
    ) -> anyhow::Result<Self> {
        Self::start_with_args(pki, name, authorized, https, &[]).await
    }

    /// Like [`ProxyProcess::start`], with `extra` arguments appended.
    pub async fn start_with_args(
        pki: &Pki,
        name: &str,
        authorized: &str,
        https: SocketAddr,
        extra: &[String],
    ) -> anyhow::Result<Self> {
        let mut args = vec!["--listen-https".into(), https.to_string()];
        args.extend(proxy_args(pki, name, authorized)?);
        args.extend(["--drain-timeout-secs".into(), "5".into()]);
        args.extend_from_slice(extra);
        Self::start_args(args).await
    }

    /// Starts the proxy binary with `args`, waiting until it listens.
    pub async fn start_args(args: Vec<String>) -> anyhow::Result<Self> {
        let mut process = Process::spawn(&binary("shroud-proxy"), &args)?;
        let line = process
            .wait_for_line("listener=\"https\"", Duration::from_secs(20))
            .await?;
        let https = log_addr(&line)?;
        Ok(Self {
            process,
            https,
            args,
        })
    }

    /// Kills the proxy with SIGKILL.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Stops the proxy as an operator would (SIGTERM: drain, then exit), waits up to `limit`
    /// for it to exit, and starts it again on the same port, as `systemctl restart` does.
    pub async fn restart_gracefully(&mut self, limit: Duration) -> anyhow::Result<()> {
        self.process.terminate();
        let status = self.process.wait_exit(limit).await?;
        anyhow::ensure!(
            status.success(),
            "the proxy exited with {status} on SIGTERM"
        );
        self.restart().await
    }

    /// Starts the same proxy again on the same port (killing it first if it still runs).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        let mut args = self.args.clone();
        if let Some(pos) = args.iter().position(|a| a == "--listen-https") {
            args[pos + 1] = self.https.to_string();
        }
        *self = Self::start_args(args).await?;
        Ok(())
    }
}

/// A TCP relay in front of a server that a test can freeze: frozen connections stay open but
/// carry nothing more, like a network path that silently died. Connections made after the
/// freeze relay normally.
pub struct FreezableRelay {
    /// Where clients connect.
    pub addr: SocketAddr,
    freeze: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableRelay {
    /// Starts a relay on loopback to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = bind_listener(LOOPBACK)?;
        let addr = listener.local_addr()?;
        let (freeze, _) = tokio::sync::watch::channel(0u64);
        let freezes = freeze.clone();
        let task = tokio::spawn(async move {
            let mut generation = 0u64;
            while let Ok((inbound, _)) = listener.accept().await {
                generation += 1;
                let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let mut frozen = freezes.subscribe();
                let mine = generation;
                tokio::spawn(async move {
                    let (mut a, mut b) = (inbound, outbound);
                    let freeze = async move {
                        // Drop the borrow at once: it may not be held across an await.
                        let reached = frozen.wait_for(|&upto| upto >= mine).await.is_ok();
                        if !reached {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        () = freeze => {
                            // Hold both sockets open and silent until the test ends.
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        Ok(Self { addr, freeze, task })
    }

    /// Freezes every connection made so far.
    pub fn freeze_existing(&self, connections_so_far: u64) {
        self.freeze.send_replace(connections_so_far);
    }
}

impl Drop for FreezableRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
