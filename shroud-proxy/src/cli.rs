//! Command-line interface of `shroud-proxy`.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::dns_auth::{DnsAuthLimits, DnsAuthorizer};
use crate::onion::{OnionOptions, OnionTunnels};
use crate::peers::FleetConfig;
use crate::policy::Policy;
use crate::server::{self, Listeners};
use crate::shared::{Authorization, Limits, ProxyConfig, Shared};

/// A shroud proxy: publishes services whose clients hold tunnels to it, routing visitors by TLS
/// SNI or HTTP Host without decrypting their traffic.
#[derive(Debug, Parser)]
#[command(
    name = "shroud-proxy",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Log format and level.
    #[command(flatten)]
    pub log: shroud_process::logging::LogArgs,

    /// A subcommand (completions, man pages) instead of the flags that run the proxy: clap
    /// refuses the two together, and requires --tunnel-name, --tls-cert and --tls-key only
    /// without one (so those three are `Option`s that are `Some` whenever the proxy runs).
    #[command(subcommand)]
    pub command: Option<Command>,

    /// `--config FILE`: flags from a TOML file.
    #[command(flatten)]
    pub config: shroud_process::config::ConfigArgs,

    /// Where to serve metrics, health and readiness (--metrics-listen).
    #[command(flatten)]
    pub metrics: shroud_process::metrics::MetricsArgs,

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
    #[arg(long, env = "SHROUD_TUNNEL_NAME", value_name = "NAME", required = true)]
    pub tunnel_name: Option<String>,

    /// Certificate chain (PEM) for the tunnel name.
    #[arg(long, env = "SHROUD_TLS_CERT", value_name = "FILE", required = true)]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) for the certificate.
    #[arg(long, env = "SHROUD_TLS_KEY", value_name = "FILE", required = true)]
    pub tls_key: Option<PathBuf>,

    /// Which client key may bind which hostname: lines of `HOSTNAME KEY`, where HOSTNAME may
    /// be `*.example.com` (its subdomains) and KEY is what `shroud key` prints.
    #[arg(long, env = "SHROUD_AUTHORIZED", value_name = "FILE")]
    pub authorized: Option<PathBuf>,

    /// Also let a key bind HOSTNAME when `_shroud.HOSTNAME` has a TXT record `shroud-key=KEY`.
    /// Answers are cached for their TTL; a DNS failure refuses the bind, never grants it, and a
    /// removed record unbinds tunnels at the next check
    #[arg(long, env = "SHROUD_AUTHORIZE_DNS")]
    pub authorize_dns: bool,

    /// Offer word names under DOMAIN (repeatable): a client running `shroud --fleet-name DOMAIN`
    /// binds WORDS.DOMAIN, WORDS being four words derived from its key, with no entry in the
    /// authorized file; no other key can bind those words
    #[arg(
        long,
        env = "SHROUD_WORD_NAMES",
        value_name = "DOMAIN",
        value_delimiter = ','
    )]
    pub word_names: Vec<String>,

    /// The DNS server for --authorize-dns, as IP:PORT [default: the system's resolvers]
    #[arg(long, env = "SHROUD_DNS_SERVER", value_name = "ADDR")]
    pub dns_server: Option<SocketAddr>,

    /// Announce this proxy to a discovery service (https://HOST[:PORT]) with heartbeats, and
    /// leave it at once on SIGTERM; repeat for every instance of a replicated service
    #[arg(long, env = "SHROUD_DISCOVERY", value_name = "URL", value_delimiter = ',',
          requires_all = ["fleet_secret_file", "region", "public_name"])]
    pub discovery: Vec<String>,

    /// A public address of this proxy (IPv4 or IPv6; repeatable), announced to discovery so
    /// that its DNS answers send visitors of the names bound here to it
    #[arg(
        long,
        env = "SHROUD_PUBLIC_ADDR",
        value_name = "IP",
        value_delimiter = ',',
        requires = "discovery"
    )]
    pub public_addr: Vec<IpAddr>,

    /// File (mode 0600) holding the fleet's secret: the discovery service expects it with
    /// heartbeats, and peer links prove it both ways
    #[arg(long, env = "SHROUD_FLEET_SECRET_FILE", value_name = "FILE")]
    pub fleet_secret_file: Option<PathBuf>,

    /// Listen for links from the other proxies of the fleet on ADDR (TLS with the tunnel
    /// certificate; both ends prove --fleet-secret-file). Members gossip which names each
    /// holds, and a visitor for a name with no tunnel here is forwarded to a peer holding it
    #[arg(
        long,
        env = "SHROUD_LISTEN_PEER",
        value_name = "ADDR",
        requires = "fleet_secret_file"
    )]
    pub listen_peer: Option<SocketAddr>,

    /// Another member's peer address, HOST:PORT (repeatable): announced to at start, and
    /// again while it is not known to be alive. One reachable member is enough to join
    #[arg(
        long = "peer",
        env = "SHROUD_PEER",
        value_name = "HOST:PORT",
        value_delimiter = ',',
        requires = "listen_peer"
    )]
    pub peers: Vec<String>,

    /// The address the other members reach --listen-peer at, IP:PORT [default: the
    /// --listen-peer address, which must then not be a wildcard]
    #[arg(
        long,
        env = "SHROUD_ADVERTISE_PEER",
        value_name = "IP:PORT",
        requires = "listen_peer"
    )]
    pub advertise_peer: Option<SocketAddr>,

    /// This proxy's region, as the discovery service spreads clients across regions
    #[arg(long, env = "SHROUD_REGION", value_name = "REGION")]
    pub region: Option<String>,

    /// The name and port clients use for this proxy, as NAME:PORT (usually the tunnel name
    /// and 443)
    #[arg(long, env = "SHROUD_PUBLIC_NAME", value_name = "NAME:PORT")]
    pub public_name: Option<String>,

    /// Extra CA certificates (PEM) to trust for the discovery service, besides the web's roots
    #[arg(long, env = "SHROUD_DISCOVERY_CA", value_name = "FILE")]
    pub discovery_ca: Option<PathBuf>,

    /// Reach NAME:PORT at ADDR instead of asking DNS, curl-style (repeatable): for a --discovery
    /// URL whose name system DNS does not know. TLS still checks the certificate for NAME
    #[arg(
        long,
        value_name = "NAME:PORT:ADDR",
        env = "SHROUD_RESOLVE",
        value_delimiter = ','
    )]
    pub resolve: Vec<String>,

    /// Seconds between heartbeats to the discovery service
    #[arg(long, env = "SHROUD_HEARTBEAT_SECS", value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_secs: u64,

    /// On SIGTERM or SIGINT, how long streams in flight may take to finish.
    #[arg(
        long,
        env = "SHROUD_DRAIN_TIMEOUT_SECS",
        value_name = "SECS",
        default_value_t = 30
    )]
    pub drain_timeout_secs: u64,

    /// A visitor for a name with no tunnel waits up to this long for one to bind, when the
    /// name is likely back soon: the proxy started less than a minute ago (its clients are
    /// reconnecting), or the name's last tunnel left less than a minute ago. Other unknown
    /// names are refused at once. 0 never waits.
    #[arg(long, env = "SHROUD_ROUTE_WAIT_SECS", value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=60))]
    pub route_wait_secs: u64,

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

    /// Most connections at once from one address (an IPv4 address, or an IPv6 /64): visitors
    /// while connected, tunnels until bound. Checked before anything is read; beyond it,
    /// plain-HTTP visitors get 429 and TLS connections are closed
    #[arg(long, env = "SHROUD_MAX_CONNECTIONS_PER_ADDRESS", value_name = "N",
          default_value_t = 512, value_parser = at_least_one())]
    pub max_connections_per_address: usize,

    /// Most visitor connections at once to one hostname; beyond it, plain-HTTP visitors get
    /// 503 and TLS visitors a fatal internal_error alert
    #[arg(long, env = "SHROUD_MAX_CONNECTIONS_PER_HOSTNAME", value_name = "N",
          default_value_t = 10_000, value_parser = at_least_one())]
    pub max_connections_per_hostname: usize,

    /// Most tunnels one client key may have bound at once; a bind beyond it is refused
    /// ("limit reached") and the client tries again later
    #[arg(long, env = "SHROUD_MAX_TUNNELS_PER_KEY", value_name = "N", default_value_t = 8,
          value_parser = at_least_one())]
    pub max_tunnels_per_key: usize,

    /// Most distinct hostnames one client key may have bound at once, over all its tunnels; a
    /// name beyond it is refused ("limit reached", or for good when one bind alone asks for
    /// more)
    #[arg(long, env = "SHROUD_MAX_HOSTNAMES_PER_KEY", value_name = "N", default_value_t = 64,
          value_parser = at_least_one())]
    pub max_hostnames_per_key: usize,

    /// Most bytes one tunnel stream (one visitor) may hold here received from the client but
    /// not yet sent on: the cap on its yamux receive window, 262144 (256 KiB, the fixed
    /// initial window) to 16777216. A stream's window grows from 256 KiB towards it only
    /// while the stream is read quickly, so that one download over a slow, distant tunnel
    /// (Tor) is not held to 256 KiB per round trip; growth comes from one pool per tunnel,
    /// so a tunnel holds at most this much more than 256 KiB per stream. Burst copy buffers
    /// are a sixteenth of it, 16 to 64 KiB
    #[arg(long, env = "SHROUD_STREAM_BUFFER_BYTES", value_name = "BYTES",
          default_value_t = shroud_mux::session::DEFAULT_STREAM_BUFFER,
          value_parser = stream_buffer_bytes())]
    pub stream_buffer_bytes: usize,

    /// Reload on edits too, not only on SIGHUP.
    #[command(flatten)]
    pub watch: shroud_process::reload::WatchArgs,

    /// Also host the tunnel listener as a Tor onion service, with embedded Tor: clients that
    /// dial its address reach this proxy without a Tor exit. The address (the service's key,
    /// kept under --state-dir) is printed on stdout at start and announced to --discovery.
    /// Tunnels arriving there are served like any other: TLS with --tls-cert, then the bind
    #[arg(long, env = "SHROUD_ONION_TUNNEL", requires = "state_dir")]
    pub onion_tunnel: bool,

    /// The port the onion service serves, as clients dial it (ADDRESS.onion:PORT)
    #[arg(long, env = "SHROUD_ONION_PORT", value_name = "PORT",
          default_value_t = crate::onion::DEFAULT_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub onion_port: u16,

    /// How often, in seconds, the onion service checks that Tor clients reach it, by opening a
    /// stream to its own address through Tor. After 3 failed checks in a row it relaunches
    /// with new introduction points (same key, same address), so it comes back within minutes
    /// when the relays holding its introduction points die, where Tor alone takes 15. 0 turns
    /// the checks off
    #[arg(long, env = "SHROUD_ONION_PROBE_INTERVAL_SECS", value_name = "SECS",
          default_value_t = shroud_tor::onion_service::DEFAULT_PROBE_INTERVAL.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub onion_probe_interval_secs: u64,

    /// Where the proxy keeps its state: with --onion-tunnel, Tor's state and cache and the
    /// onion service's identity key, under DIR/tor. Created mode 0700; refused if others may
    /// enter it. Keep it across restarts, or the onion address changes
    #[arg(long, env = "SHROUD_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// With --onion-tunnel, use another Tor network than the public one: a file in Arti's TOML
    /// config form (its [tor_network] section, and optionally [path_rules], [address_filter]
    /// and [override_net_params]), as the client's --tor-network takes
    #[arg(
        long,
        env = "SHROUD_TOR_NETWORK",
        value_name = "FILE",
        requires = "onion_tunnel"
    )]
    pub tor_network: Option<PathBuf>,

    /// With --onion-tunnel, the service's vanguards: `full` (4 second-hop relays kept for
    /// days, 8 third-hop relays kept for hours, both kept under --state-dir across restarts)
    /// is Tor's advice for a long-lived service; `lite` (4 second-hop relays, chosen anew at
    /// each start) is Tor's default for clients
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        env = "SHROUD_VANGUARDS",
        default_value_t = shroud_tor::Vanguards::Full
    )]
    pub vanguards: shroud_tor::Vanguards,

    /// With --onion-tunnel, seconds Tor may take to bootstrap before the proxy gives up and
    /// says why
    #[arg(long, env = "SHROUD_TOR_BOOTSTRAP_TIMEOUT_SECS", value_name = "SECS",
          default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub tor_bootstrap_timeout_secs: u64,
}

/// A count of 1 or more.
fn at_least_one() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::new().range(1..)
}

/// A stream buffer size yamux can honour; shared with the client's flag of the same name.
pub fn stream_buffer_bytes() -> clap::builder::RangedU64ValueParser<usize> {
    use shroud_mux::session::{MAX_STREAM_BUFFER, MIN_STREAM_BUFFER};
    clap::builder::RangedU64ValueParser::new()
        .range(MIN_STREAM_BUFFER as u64..=MAX_STREAM_BUFFER as u64)
}

/// The subcommands, each instead of running the proxy.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a shell completion script, e.g. `shroud-proxy completions bash >
    /// /usr/share/bash-completion/completions/shroud-proxy`
    Completions(shroud_process::packaging::CompletionsArgs),
    /// Print the man page (roff: `shroud-proxy man | man -l -`), or write every page into
    /// --out DIR
    Man(shroud_process::packaging::ManArgs),
}

impl Command {
    /// Prints what the subcommand asks for.
    pub fn run(self) -> anyhow::Result<()> {
        let command = <Cli as clap::CommandFactory>::command();
        match self {
            Command::Completions(args) => {
                shroud_process::packaging::print_completions(command, args.shell)?
            }
            Command::Man(args) => shroud_process::packaging::write_man_pages(command, &args)?,
        }
        Ok(())
    }
}

impl Cli {
    /// Checks the arguments and loads the files they name.
    pub fn config(&self) -> anyhow::Result<ProxyConfig> {
        // clap requires all three whenever no subcommand is given.
        let (Some(name), Some(cert), Some(key)) =
            (&self.tunnel_name, &self.tls_cert, &self.tls_key)
        else {
            anyhow::bail!("give --tunnel-name, --tls-cert and --tls-key");
        };
        let tunnel_name = shroud_mux::hostname::normalize(name)
            .with_context(|| format!("--tunnel-name {name:?}"))?;
        let tls = server::tunnel_tls_config(cert, key)?;
        let Authorization {
            policy,
            word_domains,
        } = self.authorization()?;
        let dns = if self.authorize_dns {
            let authorizer = DnsAuthorizer::new(self.dns_server, DnsAuthLimits::default())
                .context("--authorize-dns")?;
            Some(authorizer)
        } else {
            None
        };
        if self.max_streams_per_tunnel == 0 || self.max_connections == 0 {
            anyhow::bail!("--max-streams-per-tunnel and --max-connections must be at least 1");
        }
        let limits = Limits {
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            route_wait: Duration::from_secs(self.route_wait_secs),
            tunnel_idle_timeout: Duration::from_secs(self.tunnel_idle_timeout_secs),
            max_streams_per_tunnel: self.max_streams_per_tunnel,
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            max_connections_per_hostname: self.max_connections_per_hostname,
            max_tunnels_per_key: self.max_tunnels_per_key,
            max_hostnames_per_key: self.max_hostnames_per_key,
            stream_buffer: self.stream_buffer_bytes,
            ..Limits::default()
        };
        Ok(ProxyConfig {
            tunnel_name,
            tls,
            policy,
            dns,
            word_domains,
            limits,
            fleet: None,
        })
    }

    /// The authorized file's policy and the word-name domains these settings name: what
    /// decides, besides DNS, which key may bind which name. Loaded at start and by each reload.
    pub fn authorization(&self) -> anyhow::Result<Authorization> {
        let policy = match &self.authorized {
            Some(path) => {
                Policy::load(path).with_context(|| format!("--authorized {}", path.display()))?
            }
            None if self.authorize_dns || !self.word_names.is_empty() => Policy::default(),
            None => anyhow::bail!(
                "no client can be authorized: give --authorized FILE, --authorize-dns, \
                 --word-names DOMAIN, or several"
            ),
        };
        let word_domains = self
            .word_names
            .iter()
            .map(|domain| {
                shroud_mux::hostname::normalize(domain)
                    .with_context(|| format!("--word-names {domain:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Authorization {
            policy,
            word_domains,
        })
    }

    /// Membership of the fleet's gossip and links, when --listen-peer is given; `bound` is
    /// where the peer listener is bound (its port, when --listen-peer asked for port 0).
    pub fn fleet(&self, bound: Option<SocketAddr>) -> anyhow::Result<Option<FleetConfig>> {
        let (Some(_), Some(bound)) = (self.listen_peer, bound) else {
            return Ok(None);
        };
        let advertise = match self.advertise_peer {
            Some(addr) => addr,
            None if bound.ip().is_unspecified() => anyhow::bail!(
                "--listen-peer {bound} is a wildcard address: give --advertise-peer IP:PORT, \
                 the address the other members reach it at"
            ),
            None => bound,
        };
        let secret_path = self
            .fleet_secret_file
            .as_deref()
            .context("--listen-peer needs --fleet-secret-file")?;
        let secret = shroud_discovery::secret::FleetSecret::load(secret_path)
            .with_context(|| format!("--fleet-secret-file {}", secret_path.display()))?;
        for peer in &self.peers {
            let valid = peer
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                anyhow::bail!("--peer {peer:?}: expected HOST:PORT");
            }
        }
        Ok(Some(FleetConfig {
            advertise,
            seeds: self.peers.clone(),
            secret,
        }))
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
            peer: bind(self.listen_peer, "--listen-peer").await?,
            onion: None,
        };
        if listeners.https.is_none() && listeners.tunnel.is_none() && !self.onion_tunnel {
            anyhow::bail!(
                "give --listen-https, --listen-tunnel or --onion-tunnel, or clients cannot reach \
                 this proxy"
            );
        }
        Ok(listeners)
    }
}

/// Runs the proxy as the command line says, until SIGTERM or SIGINT; reloads on SIGHUP.
pub async fn run(mut cli: Cli) -> anyhow::Result<()> {
    if let Some(command) = cli.command.take() {
        return command.run();
    }
    // First of all, so that a SIGHUP from here on reloads rather than ends the process.
    let reloads =
        shroud_process::reload::Reloads::listen(cli.watch.every(), crate::reload::files(&cli))
            .context("listening for SIGHUP")?;
    let mut config = cli.config()?;
    let mut listeners = cli.listeners().await?;
    let peer_addr = listeners.peer.as_ref().map(TcpListener::local_addr);
    config.fleet = cli.fleet(peer_addr.transpose()?)?;
    // Last, because Tor may take a while to bootstrap: every local check has passed by now.
    listeners.onion = cli.onion(&config.tunnel_name).await?;
    let onion = listeners
        .onion
        .as_ref()
        .map(|onion| format!("{}:{}", onion.address(), onion.port()));
    info!(
        tunnel_name = %config.tunnel_name,
        bindings = config.policy.len(),
        "starting"
    );
    let shutdown = CancellationToken::new();
    tokio::spawn(shroud_process::signal::shutdown_on_signal(shutdown.clone()));
    let shared = Shared::new(config, shutdown.clone());
    if let Some(onion) = &listeners.onion {
        shared.metrics.onion.set(onion.health());
    }
    // The endpoint outlives the drain, so that /readyz says "draining" while it lasts.
    let metrics_stop = CancellationToken::new();
    let metrics = start_metrics(&cli.metrics, &shared, metrics_stop.clone())?;
    let announce = cli
        .announcement(&shared, onion)?
        .map(|announce| tokio::spawn(announce.run(shutdown.clone())));
    let reloader = crate::reload::Reloader::new(cli, shared.clone());
    tokio::spawn(shroud_process::reload::serve(
        reloader,
        reloads,
        shutdown.clone(),
    ));
    let result = server::serve(listeners, shared, shutdown).await;
    if let Some(announce) = announce {
        // It says goodbye to the discovery services on shutdown, within its own deadline.
        let _ = announce.await;
    }
    metrics_stop.cancel();
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    result
}

/// Serves the proxy's metrics, health and readiness when `--metrics-listen` asks for them,
/// until `stop`.
pub fn start_metrics(
    args: &shroud_process::metrics::MetricsArgs,
    shared: &Arc<Shared>,
    stop: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if args.metrics_listen.is_none() {
        return Ok(None);
    }
    let mut registry = shroud_process::metrics::registry("shroud_proxy");
    let readiness = crate::metrics::register(shared, &mut registry);
    Ok(shroud_process::metrics::spawn(
        args, registry, readiness, stop,
    )?)
}

/// What the proxy tells its discovery services about itself.
pub struct Announcement {
    endpoints: Vec<shroud_discovery::announce::Endpoint>,
    secret: shroud_discovery::secret::FleetSecret,
    presence: Arc<shroud_discovery::announce::Presence>,
    interval: Duration,
}

impl Announcement {
    /// Heartbeats to every service until `shutdown`, then leaves each.
    pub async fn run(self, shutdown: CancellationToken) {
        let tasks: Vec<_> = self
            .endpoints
            .into_iter()
            .map(|endpoint| {
                let (secret, presence) = (self.secret.clone(), self.presence.clone());
                let (interval, shutdown) = (self.interval, shutdown.clone());
                tokio::spawn(async move {
                    shroud_discovery::announce::run(
                        &endpoint, secret, &presence, interval, shutdown,
                    )
                    .await;
                })
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Cli {
    /// The onion service --onion-tunnel asks for, launched, its address printed on stdout; or
    /// `None` without the flag.
    pub async fn onion(&self, tunnel_name: &str) -> anyhow::Result<Option<OnionTunnels>> {
        if !self.onion_tunnel {
            return Ok(None);
        }
        let state_dir = self
            .state_dir
            .clone()
            .context("--onion-tunnel needs --state-dir DIR, where its key is kept")?;
        let options = OnionOptions {
            state_dir,
            network_file: self.tor_network.clone(),
            vanguards: self.vanguards,
            bootstrap_timeout: Duration::from_secs(self.tor_bootstrap_timeout_secs),
            port: self.onion_port,
            probe_interval: (self.onion_probe_interval_secs > 0)
                .then(|| Duration::from_secs(self.onion_probe_interval_secs)),
        };
        let onion = OnionTunnels::start(options)
            .await
            .context("--onion-tunnel")?;
        let (address, port) = (onion.address(), onion.port());
        info!(
            onion = %address,
            port,
            client_proxy = %format!("{tunnel_name}@{address}:{port}"),
            "tunnel listener published as an onion service"
        );
        // The address alone on stdout, for whoever started the proxy (and scripts) to take.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{address}").and_then(|()| stdout.flush());
        Ok(Some(onion))
    }

    /// The discovery announcement the flags ask for, if any; the names it announces are those
    /// bound in `shared`'s registry at each heartbeat. `onion` is the onion service's
    /// `ADDRESS.onion:PORT`, when the tunnel listener is one, for lists to carry.
    pub fn announcement(
        &self,
        shared: &Arc<Shared>,
        onion: Option<String>,
    ) -> anyhow::Result<Option<Announcement>> {
        if self.discovery.is_empty() {
            return Ok(None);
        }
        let secret_path = self
            .fleet_secret_file
            .as_deref()
            .context("--discovery needs --fleet-secret-file")?;
        let secret = shroud_discovery::secret::FleetSecret::load(secret_path)
            .with_context(|| format!("--fleet-secret-file {}", secret_path.display()))?;
        let public = self
            .public_name
            .as_deref()
            .context("--discovery needs --public-name NAME:PORT")?;
        let (name, port) = public
            .rsplit_once(':')
            .and_then(|(name, port)| Some((name, port.parse::<u16>().ok().filter(|p| *p != 0)?)))
            .with_context(|| format!("--public-name {public:?}: expected NAME:PORT"))?;
        let name = shroud_mux::hostname::normalize(name)
            .with_context(|| format!("--public-name {public:?}"))?;
        let region = self
            .region
            .clone()
            .filter(|r| !r.trim().is_empty())
            .context("--discovery needs --region")?;
        let tls = shroud_discovery::announce::client_tls(self.discovery_ca.as_deref())?;
        let resolve = shroud_process::resolve::Resolve::from_entries(&self.resolve)?;
        let endpoints = self
            .discovery
            .iter()
            .map(|url| {
                let url = url
                    .parse()
                    .with_context(|| format!("--discovery {url:?}"))?;
                Ok(shroud_discovery::announce::Endpoint {
                    url,
                    tls: tls.clone(),
                    resolve: resolve.clone(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let peers = shared.peers().cloned();
        let shared = shared.clone();
        let presence = shroud_discovery::announce::Presence {
            entry: shroud_discovery::signed::ProxyEntry {
                name,
                port,
                region,
                onion,
            },
            addrs: self.public_addr.clone(),
            changes: Some(shared.watch_names()),
            names: Box::new(move || shared.bound_names()),
            // A fleet member tells the service where its link listens, and joins through
            // the members the service knows.
            peer: peers.as_ref().map(|peers| peers.advertise()),
            on_peers: peers.map(|peers| {
                Box::new(move |found: &[SocketAddr]| peers.learn_seeds(found))
                    as shroud_discovery::announce::PeersFound
            }),
        };
        Ok(Some(Announcement {
            endpoints,
            secret,
            presence: Arc::new(presence),
            interval: Duration::from_secs(self.heartbeat_secs),
        }))
    }
}

#[cfg(test)]
mod limit_flag_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use clap::CommandFactory as _;

    use super::*;

    const REQUIRED: [&str; 7] = [
        "shroud-proxy",
        "--tunnel-name",
        "proxy.test",
        "--tls-cert",
        "/c.pem",
        "--tls-key",
        "/k.pem",
    ];

    fn parse(extra: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(REQUIRED.iter().chain(extra))
    }

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_flags_alone_run_the_proxy() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.tunnel_name.as_deref(), Some("proxy.test"));
        let err = Cli::try_parse_from(["shroud-proxy", "--tls-cert", "/c", "--tls-key", "/k"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(err.to_string().contains("--tunnel-name"), "{err}");
    }

    #[test]
    fn the_packaging_subcommands_need_no_flags_and_take_none() {
        let cli = Cli::try_parse_from(["shroud-proxy", "completions", "fish"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Completions(_))));
        assert!(cli.tunnel_name.is_none());
        let cli = Cli::try_parse_from(["shroud-proxy", "man"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Man(ref args)) if args.out.is_none()));
        // Run flags before a subcommand, or after it, are refused.
        let mut mixed = REQUIRED.to_vec();
        mixed.extend(["completions", "bash"]);
        assert!(Cli::try_parse_from(&mixed).is_err());
        let err =
            Cli::try_parse_from(["shroud-proxy", "man", "--tunnel-name", "p.test"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "{err}");
    }

    #[test]
    fn limits_have_their_defaults() {
        let cli = parse(&[]).unwrap();
        assert_eq!(cli.max_connections_per_address, 512);
        assert_eq!(cli.max_connections_per_hostname, 10_000);
        assert_eq!(cli.max_tunnels_per_key, 8);
        assert_eq!(cli.max_hostnames_per_key, 64);
        assert_eq!(cli.stream_buffer_bytes, 16 * 1024 * 1024);
        let defaults = Limits::default();
        assert_eq!(
            defaults.max_connections_per_address,
            cli.max_connections_per_address
        );
        assert_eq!(
            defaults.max_connections_per_hostname,
            cli.max_connections_per_hostname
        );
        assert_eq!(defaults.max_tunnels_per_key, cli.max_tunnels_per_key);
        assert_eq!(defaults.max_hostnames_per_key, cli.max_hostnames_per_key);
        assert_eq!(defaults.stream_buffer, cli.stream_buffer_bytes);
    }

    #[test]
    fn limits_parse_and_are_bounded() {
        let cli = parse(&[
            "--max-connections-per-address=3",
            "--max-connections-per-hostname",
            "4",
            "--max-tunnels-per-key=5",
            "--max-hostnames-per-key=6",
            "--stream-buffer-bytes=1048576",
        ])
        .unwrap();
        assert_eq!(
            (
                cli.max_connections_per_address,
                cli.max_connections_per_hostname,
                cli.max_tunnels_per_key,
                cli.max_hostnames_per_key,
                cli.stream_buffer_bytes
            ),
            (3, 4, 5, 6, 1 << 20)
        );
        for bad in [
            "--max-connections-per-address=0",
            "--max-connections-per-hostname=0",
            "--max-tunnels-per-key=0",
            "--max-hostnames-per-key=0",
            "--stream-buffer-bytes=262143",
            "--stream-buffer-bytes=16777217",
            "--max-tunnels-per-key=-1",
        ] {
            let err = parse(&[bad]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
        }
    }

    #[test]
    fn every_limit_flag_has_its_variable() {
        let command = Cli::command();
        for (flag, env) in [
            (
                "max-connections-per-address",
                "SHROUD_MAX_CONNECTIONS_PER_ADDRESS",
            ),
            (
                "max-connections-per-hostname",
                "SHROUD_MAX_CONNECTIONS_PER_HOSTNAME",
            ),
            ("max-tunnels-per-key", "SHROUD_MAX_TUNNELS_PER_KEY"),
            ("max-hostnames-per-key", "SHROUD_MAX_HOSTNAMES_PER_KEY"),
            ("stream-buffer-bytes", "SHROUD_STREAM_BUFFER_BYTES"),
        ] {
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .unwrap_or_else(|| panic!("no --{flag}"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(env),
                "--{flag}"
            );
        }
    }

    #[test]
    fn the_onion_tunnel_needs_a_state_directory_for_its_key() {
        let cli = parse(&[]).unwrap();
        assert!(!cli.onion_tunnel);
        assert_eq!(cli.onion_port, 443);
        let err = parse(&["--onion-tunnel"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(err.to_string().contains("--state-dir"), "{err}");
        // The Tor network is the onion service's: meaningless without it.
        let err = parse(&["--tor-network", "/net.toml"]).unwrap_err();
        assert!(err.to_string().contains("--onion-tunnel"), "{err}");
        let cli = parse(&[
            "--onion-tunnel",
            "--state-dir",
            "/var/lib/shroud-proxy",
            "--onion-port",
            "8443",
            "--tor-network",
            "/net.toml",
        ])
        .unwrap();
        assert!(cli.onion_tunnel);
        assert_eq!(cli.onion_port, 8443);
        assert_eq!(
            cli.state_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/shroud-proxy"))
        );
        for bad in ["0", "65536", "https"] {
            assert!(parse(&["--onion-port", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_onion_service_has_full_vanguards_unless_lite_is_asked_for() {
        let cli = parse(&["--onion-tunnel", "--state-dir", "/s"]).unwrap();
        assert_eq!(cli.vanguards, shroud_tor::Vanguards::Full);
        let cli = parse(&["--onion-tunnel", "--state-dir", "/s", "--vanguards", "lite"]).unwrap();
        assert_eq!(cli.vanguards, shroud_tor::Vanguards::Lite);
        let err = parse(&["--vanguards", "disabled"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue, "{err}");
    }

    #[tokio::test]
    async fn a_state_directory_others_may_enter_is_refused_before_tor_starts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let cli = parse(&["--onion-tunnel", "--state-dir", state.to_str().unwrap()]).unwrap();
        let err = cli.onion("proxy.test").await.err().expect("refused");
        assert!(format!("{err:#}").contains("chmod 700"), "{err:#}");
    }

    #[test]
    fn peer_flags_need_a_listener_a_secret_and_an_address_others_can_reach() {
        // --peer and --advertise-peer mean nothing without --listen-peer, which needs the
        // secret the links prove.
        assert!(parse(&["--peer", "192.0.2.1:7443"]).is_err());
        assert!(parse(&["--advertise-peer", "192.0.2.1:7443"]).is_err());
        assert!(parse(&["--listen-peer", "127.0.0.1:7443"]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("fleet.secret");
        std::fs::write(&secret, "a-fleet-secret-of-some-length").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let secret = secret.to_str().unwrap();
        let fleet = |extra: &[&str], bound: &str| {
            let mut args = vec!["--fleet-secret-file", secret];
            args.extend_from_slice(extra);
            parse(&args).unwrap().fleet(Some(bound.parse().unwrap()))
        };

        // The bound address is advertised, its real port when port 0 was asked for.
        let joined = fleet(&["--listen-peer", "127.0.0.1:0"], "127.0.0.1:40001").unwrap();
        assert_eq!(
            joined.unwrap().advertise,
            "127.0.0.1:40001".parse().unwrap()
        );
        // A wildcard cannot be advertised: the others could not reach it.
        let err = fleet(&["--listen-peer", "0.0.0.0:7443"], "0.0.0.0:7443").unwrap_err();
        assert!(err.to_string().contains("--advertise-peer"), "{err}");
        let joined = fleet(
            &[
                "--listen-peer",
                "0.0.0.0:7443",
                "--advertise-peer",
                "198.51.100.1:7443",
                "--peer",
                "peer.example.net:7443,198.51.100.2:7443",
            ],
            "0.0.0.0:7443",
        )
        .unwrap()
        .unwrap();
        assert_eq!(joined.advertise, "198.51.100.1:7443".parse().unwrap());
        assert_eq!(joined.seeds, ["peer.example.net:7443", "198.51.100.2:7443"]);
        // A seed must say where: HOST:PORT.
        let err = fleet(
            &["--listen-peer", "127.0.0.1:0", "--peer", "peer.example.net"],
            "127.0.0.1:40001",
        )
        .unwrap_err();
        assert!(err.to_string().contains("HOST:PORT"), "{err}");
    }
}
