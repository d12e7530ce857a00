//! Command-line interface of `shroud-proxy`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::policy::Policy;
use crate::server::{self, Limits, Listeners, ProxyConfig};

/// A shroud proxy: publishes services whose clients hold tunnels to it, routing visitors by TLS
/// SNI or HTTP Host without decrypting their traffic.
#[derive(Debug, Parser)]
#[command(name = "shroud-proxy", version)]
pub struct Cli {
    /// Public TLS listener: visitors are routed by SNI; shroud clients (ALPN shroud/1) become
    /// tunnels. Usually 0.0.0.0:443, since Tor exits commonly allow 443.
    #[arg(long, env = "SHROUD_LISTEN_HTTPS", value_name = "ADDR")]
    pub listen_https: Option<SocketAddr>,

    /// Public plain-HTTP listener: visitors are routed by Host. Usually 0.0.0.0:80.
    #[arg(long, env = "SHROUD_LISTEN_HTTP", value_name = "ADDR")]
    pub listen_http: Option<SocketAddr>,

    /// An extra listener that accepts tunnels only.
    #[arg(long, env = "SHROUD_LISTEN_TUNNEL", value_name = "ADDR")]
    pub listen_tunnel: Option<SocketAddr>,

    /// This proxy's own hostname: clients connect with it as SNI and check the certificate
    /// against it.
    #[arg(long, env = "SHROUD_TUNNEL_NAME", value_name = "NAME")]
    pub tunnel_name: String,

    /// Certificate chain (PEM) for the tunnel name.
    #[arg(long, env = "SHROUD_TLS_CERT", value_name = "FILE")]
    pub tls_cert: PathBuf,

    /// Private key (PEM) for the certificate.
    #[arg(long, env = "SHROUD_TLS_KEY", value_name = "FILE")]
    pub tls_key: PathBuf,

    /// Which client key may bind which hostname: lines of `HOSTNAME KEY`, where HOSTNAME may
    /// be `*.example.com` (its subdomains) and KEY is what `shroud key` prints.
    #[arg(long, env = "SHROUD_AUTHORIZED", value_name = "FILE")]
    pub authorized: PathBuf,

    /// On SIGTERM or SIGINT, how long streams in flight may take to finish.
    #[arg(
        long,
        env = "SHROUD_DRAIN_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 30
    )]
    pub drain_timeout_secs: u64,

    /// A tunnel whose client sends nothing (not even a keepalive) for this long is closed and
    /// unbound. Clients ping every 10 s by default.
    #[arg(long, env = "SHROUD_TUNNEL_IDLE_TIMEOUT_SECS", value_name = "SECS", default_value_t = 45,
          value_parser = clap::value_parser!(u64).range(5..))]
    pub tunnel_idle_timeout_secs: u64,

    /// Most streams open at once on one tunnel.
    #[arg(long, env = "SHROUD_MAX_STREAMS_PER_TUNNEL", default_value_t = 4096)]
    pub max_streams_per_tunnel: usize,

    /// Most connections (visitors and tunnels) served at once.
    #[arg(long, env = "SHROUD_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
}

impl Cli {
    /// Checks the arguments and loads the files they name.
    pub fn config(&self) -> anyhow::Result<ProxyConfig> {
        let tunnel_name = shroud_mux::hostname::normalize(&self.tunnel_name)
            .with_context(|| format!("--tunnel-name {:?}", self.tunnel_name))?;
        let tls = server::tunnel_tls_config(&self.tls_cert, &self.tls_key)?;
        let policy = Policy::load(&self.authorized)
            .with_context(|| format!("--authorized {}", self.authorized.display()))?;
        if self.max_streams_per_tunnel == 0 || self.max_connections == 0 {
            anyhow::bail!("--max-streams-per-tunnel and --max-connections must be at least 1");
        }
        let limits = Limits {
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            tunnel_idle_timeout: Duration::from_secs(self.tunnel_idle_timeout_secs),
            max_streams_per_tunnel: self.max_streams_per_tunnel,
            max_connections: self.max_connections,
            ..Limits::default()
        };
        Ok(ProxyConfig {
            tunnel_name,
            tls,
            policy,
            limits,
        })
    }

    /// Binds the listeners the arguments name.
    pub async fn listeners(&self) -> anyhow::Result<Listeners> {
        async fn bind(addr: Option<SocketAddr>, flag: &str) -> anyhow::Result<Option<TcpListener>> {
            match addr {
                None => Ok(None),
                Some(addr) => server::bind_listener(addr)
                    .map(Some)
                    .with_context(|| format!("{flag} {addr}")),
            }
        }
        let listeners = Listeners {
            https: bind(self.listen_https, "--listen-https").await?,
            http: bind(self.listen_http, "--listen-http").await?,
            tunnel: bind(self.listen_tunnel, "--listen-tunnel").await?,
        };
        if listeners.https.is_none() && listeners.tunnel.is_none() {
            anyhow::bail!(
                "give --listen-https or --listen-tunnel, or clients cannot reach this proxy"
            );
        }
        Ok(listeners)
    }
}

/// Runs the proxy as the command line says, until SIGTERM or SIGINT.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.config()?;
    let listeners = cli.listeners().await?;
    info!(
        tunnel_name = %config.tunnel_name,
        bindings = config.policy.len(),
        "starting"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    server::run(listeners, config, shutdown).await
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
pub async fn shutdown_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the proxy with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    shutdown.cancel();
}
