//! The tunnels compared, each started in front of the same origin, with the processes whose
//! memory is measured: the public side ("proxy") and the side next to the origin ("client").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use shroud_tests::stack::{direct_client_args, log_addr, make_key, proxy_args, Pki};

use shroud_tests::ports::{free_port, free_ports};
use shroud_tests::process::{Output, Process};
use tempfile::TempDir;

use crate::measure::Target;
use crate::relay::Link;

/// The name visitors ask for.
pub const HOST: &str = "bench.test";
/// The proxy's own name, on its certificate.
pub const PROXY_NAME: &str = "proxy.bench.test";

/// One of the tunnels compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    /// Visitors connect to the origin itself: the machine's limit.
    NoTunnel,
    /// shroud, client to proxy over TLS on the direct transport.
    Shroud,
    /// rathole with its TLS transport.
    RatholeTls,
    /// rathole with its plain TCP transport.
    RatholeTcp,
    /// bore (plain TCP).
    Bore,
    /// PageKite (Debian's `pagekite`), front end and back end.
    PageKite,
    /// OpenSSH remote forwarding, `ssh -R`.
    SshR,
}

impl Kind {
    /// Every contender, in the order the tables list them.
    pub const ALL: [Kind; 7] = [
        Kind::NoTunnel,
        Kind::Shroud,
        Kind::RatholeTls,
        Kind::RatholeTcp,
        Kind::Bore,
        Kind::PageKite,
        Kind::SshR,
    ];

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::NoTunnel => "no tunnel",
            Kind::Shroud => "shroud",
            Kind::RatholeTls => "rathole (TLS)",
            Kind::RatholeTcp => "rathole (TCP)",
            Kind::Bore => "bore",
            Kind::PageKite => "PageKite",
            Kind::SshR => "ssh -R",
        }
    }

    /// The short name for `--only`.
    pub fn slug(self) -> &'static str {
        match self {
            Kind::NoTunnel => "none",
            Kind::Shroud => "shroud",
            Kind::RatholeTls => "rathole-tls",
            Kind::RatholeTcp => "rathole-tcp",
            Kind::Bore => "bore",
            Kind::PageKite => "pagekite",
            Kind::SshR => "ssh",
        }
    }
}

/// What the contenders share: where shroud's binaries are, and a scratch directory.
pub struct Env {
    /// The directory holding `shroud` and `shroud-proxy` (the driver's own directory).
    pub bin_dir: PathBuf,
    /// Certificates for shroud's proxy and rathole's TLS transport.
    pub pki: Pki,
    /// Scratch space for configs and keys.
    pub dir: TempDir,
    /// Where the processes' output goes.
    pub logs: PathBuf,
}

impl Env {
    /// Finds shroud's binaries next to the running driver.
    pub fn new(logs: PathBuf) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating shroud-bench")?;
        let bin_dir = exe
            .parent()
            .context("shroud-bench has no directory")?
            .to_path_buf();
        for name in ["shroud", "shroud-proxy"] {
            anyhow::ensure!(
                bin_dir.join(name).exists(),
                "{name} is not built next to shroud-bench; run `cargo build --release --bins`"
            );
        }
        Ok(Self {
            bin_dir,
            pki: Pki::new()?,
            dir: tempfile::tempdir()?,
            logs,
        })
    }

    /// The log file for processes named `name`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// Starts `program` with `args`, its output going to the log file for `log`.
    pub fn spawn(&self, program: &Path, args: &[String], log: &str) -> anyhow::Result<Process> {
        Process::spawn_with(program, args, &[], Output::File(self.log(log)))
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// A contender, up and carrying visitors.
pub struct Running {
    /// Where visitors go.
    pub target: Target,
    /// The public side, if any.
    pub proxy: Option<Process>,
    /// The side next to the origin, if any.
    pub client: Option<Process>,
    /// Anything else it needs running (a delay relay, say), stopped with it.
    _helpers: Vec<Process>,
}

impl Running {
    /// A contender whose visitors dial `addr`, with its two sides.
    fn new(addr: SocketAddr, proxy: Process, client: Process) -> Self {
        Self {
            target: Target {
                addr,
                host: HOST.into(),
            },
            proxy: Some(proxy),
            client: Some(client),
            _helpers: Vec::new(),
        }
    }

    /// Resident memory of the public side (with its child processes), in KiB.
    pub fn proxy_rss_kib(&self) -> anyhow::Result<u64> {
        let proxy = self.proxy.as_ref().context("no proxy process")?;
        crate::measure::tree_rss_kib(proxy.pid())
    }

    /// CPU seconds used so far by both sides together (and their children).
    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for process in self.proxy.iter().chain(&self.client) {
            total += crate::measure::tree_cpu_secs(process.pid())?;
        }
        Ok(total)
    }

    /// Resident memory of the origin side, in KiB.
    pub fn client_rss_kib(&self) -> anyhow::Result<u64> {
        let client = self.client.as_ref().context("no client process")?;
        crate::measure::tree_rss_kib(client.pid())
    }
}

/// Tuning every contender gets alike: no limit of theirs should be what a bench of 10,000
/// idle visitors measures.
pub struct Options {
    /// shroud's per-stream buffer (`--stream-buffer-bytes` on both sides); `None` for the default.
    pub stream_buffer: Option<usize>,
}

/// Starts `kind` in front of `origin`, its client dialling the proxy through `via` when given
/// (a delay relay in front of the proxy), and waits until a request passes through it.
pub async fn start(
    env: &Env,
    kind: Kind,
    origin: SocketAddr,
    options: &Options,
) -> anyhow::Result<Running> {
    let running = match kind {
        Kind::NoTunnel => Running {
            target: Target {
                addr: origin,
                host: HOST.into(),
            },
            proxy: None,
            client: None,
            _helpers: Vec::new(),
        },
        Kind::Shroud => start_shroud(env, origin, options, None).await?,
        Kind::RatholeTls => start_rathole(env, origin, true).await?,
        Kind::RatholeTcp => start_rathole(env, origin, false).await?,
        Kind::Bore => start_bore(env, origin).await?,
        Kind::SshR => start_ssh(env, origin).await?,
        Kind::PageKite => start_pagekite(env, origin).await?,
    };
    wait_serving(&running.target, Duration::from_secs(30))
        .await
        .with_context(|| format!("{} did not carry a request", kind.name()))?;
    Ok(running)
}

/// A shroud proxy and client; with `link`, the client reaches the proxy through a delay relay.
pub async fn start_shroud(
    env: &Env,
    origin: SocketAddr,
    options: &Options,
    link: Option<Link>,
) -> anyhow::Result<Running> {
    let key = env.dir.path().join("shroud-client.key");
    let public_key = make_key(&key)?;
    let ShroudProxy {
        process: proxy,
        https,
        http,
        ..
    } = start_shroud_proxy(env, &format!("{HOST} {public_key}\n"), options).await?;

    let mut others = Vec::new();
    let dial = match link {
        Some(link) => {
            let (relay, addr) = start_relay(env, https, link).await?;
            others.push(relay);
            addr
        }
        None => https,
    };
    let mut client_args = direct_client_args(&env.pki, &key, HOST, origin, &[(PROXY_NAME, dial)]);
    client_args.extend([
        "--http-target".into(),
        origin.to_string(),
        "--max-streams".into(),
        "20000".into(),
    ]);
    if let Some(bytes) = options.stream_buffer {
        client_args.extend(["--stream-buffer-bytes".into(), bytes.to_string()]);
    }
    let client = start_shroud_client(env, &client_args, "shroud").await?;
    Ok(Running {
        _helpers: others,
        ..Running::new(http, proxy, client)
    })
}

/// Starts the `shroud` client with `args`, its output in the log file for `log`, and waits
/// until it has a tunnel up.
pub async fn start_shroud_client(env: &Env, args: &[String], log: &str) -> anyhow::Result<Process> {
    let mut client = env.spawn(&env.bin(CLIENT_BIN), args, log)?;
    client
        .wait_for_line("tunnel up", Duration::from_secs(20))
        .await
        .context("the shroud client did not bring its tunnel up")?;
    Ok(client)
}

/// Starts a delay relay (this program's `relay` command) in front of `upstream`.
pub async fn start_relay(
    env: &Env,
    upstream: SocketAddr,
    link: Link,
) -> anyhow::Result<(Process, SocketAddr)> {
    let args = [
        "relay".to_owned(),
        "--to".into(),
        upstream.to_string(),
        "--rtt-ms".into(),
        link.rtt.as_millis().to_string(),
        "--rate-bytes".into(),
        link.rate.to_string(),
    ];
    start_own(env, &args, "relay").await
}

/// Starts this program with `args` (its `origin` or `relay` command), logging to `name`'s
/// log, and waits for the `NAME listening addr=...` line it prints once bound.
pub async fn start_own(
    env: &Env,
    args: &[String],
    name: &str,
) -> anyhow::Result<(Process, SocketAddr)> {
    let exe = std::env::current_exe().context("locating shroud-bench")?;
    let mut process = env.spawn(&exe, args, name)?;
    let line = process
        .wait_for_line(&format!("{name} listening"), Duration::from_secs(10))
        .await?;
    let addr = log_addr(&line)?;
    Ok((process, addr))
}

/// A running `shroud-proxy`.
pub struct ShroudProxy {
    /// The process.
    pub process: Process,
    /// Where clients' tunnels connect.
    pub https: SocketAddr,
    /// Where plain-HTTP visitors connect.
    pub http: SocketAddr,
    /// Where other proxies of its fleet link to it, when it has `--listen-peer`.
    pub peer: Option<SocketAddr>,
}

/// Starts `shroud-proxy` on loopback with `authorized` as its policy and limits raised above
/// anything the bench reaches.
pub async fn start_shroud_proxy(
    env: &Env,
    authorized: &str,
    options: &Options,
) -> anyhow::Result<ShroudProxy> {
    start_shroud_proxy_with(env, PROXY_NAME, authorized, options, &[], "shroud-proxy").await
}

/// [`start_shroud_proxy`] with the tunnel name (and certificate) `name`, `extra` arguments
/// (`--listen-peer 127.0.0.1:0` and the like), and its output in the log file for `log`.
pub async fn start_shroud_proxy_with(
    env: &Env,
    name: &str,
    authorized: &str,
    options: &Options,
    extra: &[String],
    log: &str,
) -> anyhow::Result<ShroudProxy> {
    let mut args = proxy_args(&env.pki, name, authorized)?;
    args.extend(
        [
            "--listen-https",
            "127.0.0.1:0",
            "--listen-http",
            "127.0.0.1:0",
            "--max-connections",
            "50000",
            "--max-connections-per-address",
            "50000",
            "--max-connections-per-hostname",
            "50000",
            "--max-streams-per-tunnel",
            "20000",
        ]
        .map(String::from),
    );
    if let Some(bytes) = options.stream_buffer {
        args.extend(["--stream-buffer-bytes".into(), bytes.to_string()]);
    }
    args.extend_from_slice(extra);
    let wants_peer = extra.iter().any(|arg| arg == "--listen-peer");
    let mut process = env.spawn(&env.bin(PROXY_BIN), &args, log)?;
    let mut https = None;
    let mut http = None;
    let mut peer = None;
    while https.is_none() || http.is_none() || (wants_peer && peer.is_none()) {
        // The peer listener's line ("listening for peers") comes first, so it is read here too.
        let line = process
            .wait_for_line("listening", Duration::from_secs(20))
            .await?;
        let addr = log_addr(&line)?;
        if line.contains("listener=\"https\"") {
            https = Some(addr);
        } else if line.contains("listener=\"http\"") {
            http = Some(addr);
        } else if line.contains("listening for peers") {
            peer = Some(addr);
        }
    }
    Ok(ShroudProxy {
        process,
        https: https.context("no https listener")?,
        http: http.context("no http listener")?,
        peer,
    })
}

const PROXY_BIN: &str = "shroud-proxy";
const CLIENT_BIN: &str = "shroud";

/// Polls with a GET until one passes through `target`, for up to `limit`.
pub async fn wait_serving(target: &Target, limit: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_error = None;
    while started.elapsed() < limit {
        match tokio::time::timeout(Duration::from_secs(2), crate::measure::get_page(target)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => last_error = Some(err),
            Err(_) => last_error = Some(anyhow::anyhow!("a GET took over 2 s")),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no attempt made")))
        .context(format!("no GET passed within {limit:?}"))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// rathole server and client, one service, over TLS (native-tls: OpenSSL, with a throwaway CA
/// from bench/contenders/make-certs.sh) or plain TCP.
async fn start_rathole(env: &Env, origin: SocketAddr, tls: bool) -> anyhow::Result<Running> {
    let dir = env
        .dir
        .path()
        .join(if tls { "rathole-tls" } else { "rathole-tcp" });
    std::fs::create_dir_all(&dir)?;
    let [control, public] = free_ports()?;
    let (server_transport, client_transport) = if tls {
        let certs = dir.join("certs");
        let status = std::process::Command::new("sh")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/contenders/make-certs.sh"
            ))
            .arg(&certs)
            .arg(RATHOLE_P12_PASSWORD)
            .stdout(std::process::Stdio::null())
            .status()
            .context("running make-certs.sh (needs openssl)")?;
        anyhow::ensure!(status.success(), "make-certs.sh failed");
        (
            format!(
                "[server.transport]\ntype = \"tls\"\n[server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"{RATHOLE_P12_PASSWORD}\"\n",
                certs.join("server.p12").display()
            ),
            format!(
                "[client.transport]\ntype = \"tls\"\n[client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
                certs.join("ca.pem").display()
            ),
        )
    } else {
        (
            "[server.transport]\ntype = \"tcp\"\n".to_owned(),
            "[client.transport]\ntype = \"tcp\"\n".to_owned(),
        )
    };
    let server_config = dir.join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\ndefault_token = \"{RATHOLE_TOKEN}\"\n{server_transport}[server.services.bench]\nbind_addr = \"127.0.0.1:{public}\"\n"
        ),
    )?;
    let client_config = dir.join("client.toml");
    std::fs::write(
        &client_config,
        format!(
            "[client]\nremote_addr = \"localhost:{control}\"\ndefault_token = \"{RATHOLE_TOKEN}\"\n{client_transport}[client.services.bench]\nlocal_addr = \"{origin}\"\n"
        ),
    )?;
    let proxy = env
        .spawn(
            Path::new("rathole"),
            &["--server".into(), server_config.display().to_string()],
            "rathole-server",
        )
        .context("starting rathole (is it installed? bench/run.sh installs it)")?;
    let client = env.spawn(
        Path::new("rathole"),
        &["--client".into(), client_config.display().to_string()],
        "rathole-client",
    )?;
    Ok(Running::new(loopback(public), proxy, client))
}

const RATHOLE_TOKEN: &str = "bench-token";
const RATHOLE_P12_PASSWORD: &str = "benchpass";

/// bore server and `bore local`. bore's control port is fixed at 7835, so two benches cannot
/// run at once; the public port is whatever the server gives and `bore local` prints.
async fn start_bore(env: &Env, origin: SocketAddr) -> anyhow::Result<Running> {
    let proxy = env
        .spawn(
            Path::new("bore"),
            &[
                "server".into(),
                "--bind-addr".into(),
                "127.0.0.1".into(),
                "--secret".into(),
                BORE_SECRET.into(),
            ],
            "bore-server",
        )
        .context("starting bore server (is it installed? bench/run.sh installs it)")?;
    let mut proxy = proxy;
    proxy
        .wait_for_line("server listening", Duration::from_secs(10))
        .await
        .context("bore server did not listen")?;
    let mut client = env.spawn(
        Path::new("bore"),
        &[
            "local".into(),
            origin.port().to_string(),
            "--local-host".into(),
            origin.ip().to_string(),
            "--to".into(),
            "127.0.0.1".into(),
            "--secret".into(),
            BORE_SECRET.into(),
        ],
        "bore-local",
    )?;
    let line = client
        .wait_for_line("listening at", Duration::from_secs(10))
        .await
        .context("bore local did not report its public port")?;
    let port: u16 = line
        .rsplit(':')
        .next()
        .map(|p| p.trim().trim_end_matches(|c: char| !c.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {line:?}"))?;
    Ok(Running::new(loopback(port), proxy, client))
}

const BORE_SECRET: &str = "bench-secret";

/// A private sshd (own config, host key and authorized key, on loopback) and `ssh -N -R`.
async fn start_ssh(env: &Env, origin: SocketAddr) -> anyhow::Result<Running> {
    let dir = env.dir.path().join("ssh");
    std::fs::create_dir_all(&dir)?;
    for (key, kind) in [("host_key", "ed25519"), ("user_key", "ed25519")] {
        let path = dir.join(key);
        if !path.exists() {
            let status = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(&path)
                .status()
                .context("running ssh-keygen")?;
            anyhow::ensure!(status.success(), "ssh-keygen failed");
        }
    }
    std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys"))?;
    // sshd refuses to start without its privilege-separation directory.
    std::fs::create_dir_all("/run/sshd")?;
    let port = free_port()?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nAllowTcpForwarding remote\nMaxStartups 100\nLogLevel INFO\n",
            dir.join("host_key").display(),
            dir.join("authorized_keys").display()
        ),
    )?;
    let mut proxy = env
        .spawn(
            Path::new("/usr/sbin/sshd"),
            &[
                "-D".into(),
                "-e".into(),
                "-f".into(),
                config.display().to_string(),
            ],
            "sshd",
        )
        .context("starting sshd (is openssh-server installed?)")?;
    proxy
        .wait_for_line("Server listening on", Duration::from_secs(10))
        .await
        .context("sshd did not listen")?;
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let mut client = env.spawn(
        Path::new("ssh"),
        &[
            "-N".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=no".into(),
            "-o".into(),
            "UserKnownHostsFile=/dev/null".into(),
            "-o".into(),
            "ExitOnForwardFailure=yes".into(),
            "-i".into(),
            dir.join("user_key").display().to_string(),
            "-p".into(),
            port.to_string(),
            "-R".into(),
            format!("127.0.0.1:0:{origin}"),
            format!("{user}@127.0.0.1"),
        ],
        "ssh",
    )?;
    let line = client
        .wait_for_line("Allocated port", Duration::from_secs(15))
        .await
        .context("ssh did not report its forwarded port")?;
    let public: u16 = line
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in {line:?}"))?;
    Ok(Running::new(loopback(public), proxy, client))
}

/// Debian's PageKite: a front end and a back end over one plain TCP link, routing visitors by
/// their `Host` header.
///
/// Two flags leave its defaults, both for correctness under many connections: PageKite 1.5.2
/// kills its tunnel when one read holds over 150 chunks (`BugFoundError('Too much data')`),
/// which default settings reach after about a thousand quick connections; `--nozchunks` on
/// the back end and `--max_read_bytes=16000x1` on both keep reads under that. Its default
/// pacing (`--select_loop_min_ms=5`, which caps a tunnel's bandwidth by design) is kept.
async fn start_pagekite(env: &Env, origin: SocketAddr) -> anyhow::Result<Running> {
    let home = env.dir.path().join("pagekite-home");
    std::fs::create_dir_all(&home)?;
    let public = free_port()?;
    let common = |args: &[String]| -> Vec<String> {
        let mut all: Vec<String> = ["--clean", "--nullui", "--logfile=stdio"]
            .map(String::from)
            .to_vec();
        all.extend_from_slice(args);
        all
    };
    let front_args = common(&[
        "--isfrontend".into(),
        "--host=127.0.0.1".into(),
        format!("--ports={public}"),
        "--protos=http".into(),
        format!("--domain=http:{HOST}:{PAGEKITE_SECRET}"),
        "--max_read_bytes=16000x1".into(),
    ]);
    let back_args = common(&[
        format!("--frontend=127.0.0.1:{public}"),
        format!(
            "--service_on=http:{HOST}:{}:{}:{PAGEKITE_SECRET}",
            origin.ip(),
            origin.port()
        ),
        "--nozchunks".into(),
        "--max_read_bytes=16000x1".into(),
    ]);
    let mut proxy = Process::spawn_with(
        Path::new("pagekite"),
        &front_args,
        &[("HOME", home.as_os_str())],
        Output::File(env.log("pagekite-front")),
    )
    .context("starting pagekite (is it installed? bench/run.sh installs it)")?;
    proxy
        .wait_for_line(
            &format!("listen=127.0.0.1:{public}"),
            Duration::from_secs(15),
        )
        .await
        .context("the PageKite front end did not listen")?;
    let mut client = Process::spawn_with(
        Path::new("pagekite"),
        &back_args,
        &[("HOME", home.as_os_str())],
        Output::File(env.log("pagekite-back")),
    )?;
    client
        .wait_for_line(&format!("domain={HOST}; ssl="), Duration::from_secs(30))
        .await
        .context("the PageKite back end did not register")?;
    Ok(Running::new(loopback(public), proxy, client))
}

const PAGEKITE_SECRET: &str = "bench-secret";
