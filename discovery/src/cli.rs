//! The command line of `shroud-discovery`.
//!
//! ```text
//! shroud-discovery --listen ADDR --tls-cert FILE --tls-key FILE --signing-key FILE [OPTIONS]
//! shroud-discovery key --signing-key FILE
//! shroud-discovery completions SHELL
//! shroud-discovery man [--out DIR]
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::dns::DnsZone;
use crate::fleet::{Fleet, FleetFile};
use crate::secret::FleetSecret;
use crate::server::{self, DnsService, Limits, RequireCname, ServerConfig};

/// shroud's discovery service: tells shroud clients which proxies to hold tunnels to, in lists
/// signed with a key the clients pin.
#[derive(Debug, Parser)]
#[command(
    name = "shroud-discovery",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Log format and level.
    #[command(flatten)]
    pub log: shroud_process::logging::LogArgs,

    /// `--config FILE`: flags from a TOML file.
    #[command(flatten)]
    pub config: shroud_process::config::ConfigArgs,

    /// Where to serve metrics, health and readiness (--metrics-listen); for serving only.
    #[command(flatten)]
    pub metrics: shroud_process::metrics::MetricsArgs,

    /// A subcommand, if one was given instead of the options to serve.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The options to serve with: `Some` exactly when `command` is `None`. An `Option` because
    /// clap cannot fill required fields when a subcommand stands in their place.
    #[command(flatten)]
    pub serve: Option<ServeArgs>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the signing key's public half, for clients' --discovery-key (makes the key if
    /// missing).
    Key(KeyArgs),
    /// Print a shell completion script, e.g. `shroud-discovery completions bash >
    /// /usr/share/bash-completion/completions/shroud-discovery`
    Completions(shroud_process::packaging::CompletionsArgs),
    /// Print the man page (roff: `shroud-discovery man | man -l -`), or write every page into
    /// --out DIR
    Man(shroud_process::packaging::ManArgs),
}

/// Options of `shroud-discovery key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The signing key file; created with mode 0600 if missing.
    #[arg(long, value_name = "FILE", env = "SHROUD_DISCOVERY_SIGNING_KEY")]
    pub signing_key: PathBuf,
}

/// Options for serving.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve HTTPS on, e.g. 0.0.0.0:443.
    #[arg(
        long,
        value_name = "ADDR",
        required = true,
        env = "SHROUD_DISCOVERY_LISTEN"
    )]
    pub listen: SocketAddr,

    /// Certificate chain (PEM) for the service's name.
    #[arg(
        long,
        value_name = "FILE",
        required = true,
        env = "SHROUD_DISCOVERY_TLS_CERT"
    )]
    pub tls_cert: PathBuf,

    /// Private key (PEM) for the certificate.
    #[arg(
        long,
        value_name = "FILE",
        required = true,
        env = "SHROUD_DISCOVERY_TLS_KEY"
    )]
    pub tls_key: PathBuf,

    /// The ed25519 key lists are signed with (mode 0600; make it with `shroud-discovery key`).
    #[arg(
        long,
        value_name = "FILE",
        required = true,
        env = "SHROUD_DISCOVERY_SIGNING_KEY"
    )]
    pub signing_key: PathBuf,

    /// Static proxies, always listed: a TOML file of `[[proxy]]` tables with `name`, `port`
    /// and `region`.
    #[arg(long, value_name = "FILE", env = "SHROUD_DISCOVERY_FLEET")]
    pub fleet: Option<PathBuf>,

    /// The secret proxies' heartbeats must present (a file of mode 0600). Without it,
    /// heartbeats are refused and only the static fleet is listed.
    #[arg(long, value_name = "FILE", env = "SHROUD_DISCOVERY_FLEET_SECRET_FILE")]
    pub fleet_secret_file: Option<PathBuf>,

    /// Most proxies in one list.
    #[arg(long, value_name = "N", default_value_t = 3, env = "SHROUD_DISCOVERY_MAX_PROXIES",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub max_proxies: u16,

    /// How long a list stays valid, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300, env = "SHROUD_DISCOVERY_LIST_TTL_SECS",
          value_parser = clap::value_parser!(u64).range(10..=86_400))]
    pub list_ttl_secs: u64,

    /// A proxy not heard from for this long is delisted, in seconds. Proxies send a heartbeat
    /// every 10 s by default.
    #[arg(long, value_name = "SECS", default_value_t = 30,
          env = "SHROUD_DISCOVERY_HEARTBEAT_TIMEOUT_SECS",
          value_parser = clap::value_parser!(u64).range(5..=86_400))]
    pub heartbeat_timeout_secs: u64,

    /// List proxies for HOST only if HOST is a DNS CNAME to HOST.DOMAIN. When DNS cannot be
    /// asked, the service answers 503 rather than the list.
    #[arg(long, value_name = "DOMAIN", env = "SHROUD_DISCOVERY_REQUIRE_CNAME")]
    pub require_cname: Option<String>,

    /// DNS server for --require-cname, as IP or IP:PORT, asked over UDP and TCP; repeatable
    /// [default: the nameservers in /etc/resolv.conf].
    #[arg(
        long,
        value_name = "ADDR",
        env = "SHROUD_DISCOVERY_DNS_SERVER",
        value_delimiter = ',',
        requires = "require_cname",
        value_parser = parse_dns_server
    )]
    pub dns_server: Vec<SocketAddr>,

    /// Most connections served at once.
    #[arg(long, value_name = "N", default_value_t = 1024, env = "SHROUD_DISCOVERY_MAX_CONNECTIONS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Also answer DNS, over UDP and TCP on this address (e.g. 0.0.0.0:53), as the
    /// authoritative server of --dns-zone
    #[arg(long, value_name = "ADDR", env = "SHROUD_DISCOVERY_DNS_LISTEN",
          requires_all = ["dns_zone", "dns_ns"])]
    pub dns_listen: Option<SocketAddr>,

    /// The zone to answer, e.g. proxy.example.net: HOST.ZONE resolves to the public addresses
    /// of the proxies holding HOST's tunnels
    #[arg(
        long,
        value_name = "ZONE",
        env = "SHROUD_DISCOVERY_DNS_ZONE",
        requires = "dns_listen"
    )]
    pub dns_zone: Option<String>,

    /// A name server of the zone, for its NS records: every discovery instance's name, each
    /// outside the zone; repeatable
    #[arg(
        long,
        value_name = "NAME",
        env = "SHROUD_DISCOVERY_DNS_NS",
        value_delimiter = ',',
        requires = "dns_listen"
    )]
    pub dns_ns: Vec<String>,

    /// TTL of DNS answers, and of negative answers, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30, env = "SHROUD_DISCOVERY_DNS_TTL_SECS",
          value_parser = clap::value_parser!(u32).range(1..=86_400))]
    pub dns_ttl_secs: u32,

    /// Also reload, as SIGHUP does, when --tls-cert, --tls-key or --fleet changes: its size,
    /// time or content, looked at every --watch-interval-secs
    // Not a flattened shroud_process::reload::WatchArgs: see its documentation.
    #[arg(long, env = "SHROUD_DISCOVERY_WATCH")]
    pub watch: bool,

    /// How often --watch looks at the files, in seconds
    #[arg(long, env = "SHROUD_DISCOVERY_WATCH_INTERVAL_SECS", value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub watch_interval_secs: u64,
}

/// Reads `IP` (port 53) or `IP:PORT`.
fn parse_dns_server(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{text:?} is not IP or IP:PORT"))
}

/// The nameservers of a resolv.conf text, on port 53.
fn resolv_conf_servers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            // Drop an IPv6 zone ("fe80::1%eth0"): the socket address type cannot carry its name.
            let addr = words.next()?.split('%').next()?;
            addr.parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

impl ServeArgs {
    /// Checks the arguments and loads the files they name.
    pub fn config(&self) -> anyhow::Result<ServerConfig> {
        let tls = server::tls_config(&self.tls_cert, &self.tls_key)?;
        let signing_key = shroud_mux::keyfile::load(&self.signing_key).with_context(|| {
            format!(
                "--signing-key (make one with `shroud-discovery key --signing-key {}`)",
                self.signing_key.display()
            )
        })?;
        let fleet_file = match &self.fleet {
            Some(path) => {
                FleetFile::load(path).with_context(|| format!("--fleet {}", path.display()))?
            }
            None => FleetFile::default(),
        };
        let fleet_secret = self
            .fleet_secret_file
            .as_deref()
            .map(|path| {
                FleetSecret::load(path)
                    .with_context(|| format!("--fleet-secret-file {}", path.display()))
            })
            .transpose()?;
        if fleet_file.proxy.is_empty() && fleet_secret.is_none() {
            anyhow::bail!(
                "give --fleet or --fleet-secret-file (or both); without either there are no \
                 proxies to list"
            );
        }
        let require_cname = match &self.require_cname {
            None => None,
            Some(domain) => {
                let domain = shroud_mux::hostname::normalize(domain)
                    .with_context(|| format!("--require-cname {domain:?}"))?;
                let dns_servers = if self.dns_server.is_empty() {
                    system_dns_servers(Path::new("/etc/resolv.conf"))?
                } else {
                    self.dns_server.clone()
                };
                Some(RequireCname {
                    domain,
                    dns_servers,
                })
            }
        };
        let fleet = Fleet::new(fleet_file, Duration::from_secs(self.heartbeat_timeout_secs));
        Ok(ServerConfig {
            tls,
            signing_key: Arc::new(signing_key),
            fleet,
            fleet_secret,
            max_proxies: usize::from(self.max_proxies),
            list_ttl: Duration::from_secs(self.list_ttl_secs),
            require_cname,
            limits: Limits {
                max_connections: self.max_connections as usize,
                ..Limits::default()
            },
            dns: None,
            metrics: Arc::default(),
        })
    }

    /// The DNS zone and its bound sockets, when --dns-listen asks for them.
    pub fn dns(&self) -> anyhow::Result<Option<DnsService>> {
        let (Some(listen), Some(zone)) = (self.dns_listen, &self.dns_zone) else {
            return Ok(None);
        };
        let zone = DnsZone::new(
            zone,
            &self.dns_ns,
            self.dns_ttl_secs,
            usize::from(self.max_proxies),
        )
        .context("--dns-zone")?;
        let (udp, tcp) =
            crate::dns::bind(listen).with_context(|| format!("--dns-listen {listen}"))?;
        Ok(Some(DnsService { zone, udp, tcp }))
    }
}

fn system_dns_servers(path: &Path) -> anyhow::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {} for --require-cname; or give --dns-server",
            path.display()
        )
    })?;
    let servers = resolv_conf_servers(&text);
    if servers.is_empty() {
        anyhow::bail!(
            "{} names no nameserver; give --dns-server for --require-cname",
            path.display()
        );
    }
    Ok(servers)
}

/// Runs what the command line says: serves until SIGTERM or SIGINT, or prints the key.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match (cli.command, cli.serve) {
        (Some(Command::Key(args)), _) => print_key(&args.signing_key),
        (Some(Command::Completions(args)), _) => Ok(shroud_process::packaging::print_completions(
            <Cli as clap::CommandFactory>::command(),
            args.shell,
        )?),
        (Some(Command::Man(args)), _) => Ok(shroud_process::packaging::write_man_pages(
            <Cli as clap::CommandFactory>::command(),
            &args,
        )?),
        (None, Some(serve)) => {
            // First of all, so that a SIGHUP from here on reloads rather than ends the process.
            let config_file = cli.config.config.clone();
            let reloads = shroud_process::reload::Reloads::listen(
                shroud_process::reload::watch_every(serve.watch, serve.watch_interval_secs),
                crate::reload::files(&serve)
                    .into_iter()
                    .chain(config_file.clone())
                    .collect(),
            )
            .context("listening for SIGHUP")?;
            let mut config = serve.config()?;
            config.dns = serve.dns()?;
            let listener = TcpListener::bind(serve.listen)
                .await
                .with_context(|| format!("--listen {}", serve.listen))?;
            info!(
                public_key = %config.signing_key.public(),
                static_proxies = config.fleet.statics().len(),
                heartbeats = config.fleet_secret.is_some(),
                require_cname = config.require_cname.as_ref().map(|r| r.domain.as_str()),
                "starting"
            );
            let shutdown = CancellationToken::new();
            tokio::spawn(shroud_process::signal::shutdown_on_signal(shutdown.clone()));
            // The endpoint outlives the drain, so that /readyz says so while it lasts.
            let metrics_stop = CancellationToken::new();
            let _stop_metrics = metrics_stop.clone().drop_guard();
            let endpoint = if cli.metrics.metrics_listen.is_some() {
                let mut registry = shroud_process::metrics::registry("shroud_discovery");
                let readiness = crate::metrics::register(&config.metrics, &mut registry);
                shroud_process::metrics::spawn(
                    &cli.metrics,
                    registry,
                    readiness,
                    metrics_stop.clone(),
                )?
            } else {
                None
            };
            let service = server::Service::new(config)?;
            let reloader =
                crate::reload::Reloader::new(serve, service.handle()).with_config_file(config_file);
            tokio::spawn(shroud_process::reload::serve(
                reloader,
                reloads,
                shutdown.clone(),
            ));
            let result = service.run(listener, shutdown).await;
            metrics_stop.cancel();
            if let Some(endpoint) = endpoint {
                let _ = endpoint.await;
            }
            result
        }
        (None, None) => {
            anyhow::bail!("give --listen and the other options, or a subcommand; see --help")
        }
    }
}

/// `shroud-discovery key`: the public key alone on stdout's first line, then how to use it.
fn print_key(path: &Path) -> anyhow::Result<()> {
    shroud_process::key::print_public(path, "signing key", |public| {
        vec![format!(
            "Clients pin this key with --discovery-key {public}"
        )]
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_flag_has_an_env_var() {
        let command = Cli::command();
        let key = command
            .find_subcommand("key")
            .map(|key| key.get_arguments().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        for arg in command.get_arguments().chain(key.iter()) {
            let id = arg.get_id().as_str();
            // -v and -q are counts, and the variables of the log format and the config file
            // are every binary's.
            if matches!(id, "help" | "version" | "verbose" | "quiet") {
                continue;
            }
            let env = arg.get_env().and_then(|env| env.to_str()).unwrap_or("");
            if id == "log_format" {
                assert_eq!(env, "SHROUD_LOG_FORMAT");
                continue;
            }
            if id == "config" {
                assert_eq!(env, shroud_process::config::CONFIG_ENV);
                continue;
            }
            // So is the metrics endpoint's.
            if id == "metrics_listen" {
                assert_eq!(env, "SHROUD_METRICS_LISTEN");
                continue;
            }
            assert!(
                env.starts_with("SHROUD_DISCOVERY_"),
                "--{id} has env {env:?}"
            );
        }
    }

    #[test]
    fn parses_serve_options() {
        let cli = Cli::try_parse_from([
            "shroud-discovery",
            "--listen",
            "127.0.0.1:8443",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
            "--signing-key",
            "/s.key",
            "--require-cname",
            "shroud.example.net",
            "--dns-server",
            "127.0.0.1:5353",
            "--dns-server",
            "::1",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let serve = cli.serve.unwrap();
        assert_eq!(serve.max_proxies, 3);
        assert_eq!(serve.list_ttl_secs, 300);
        assert_eq!(serve.heartbeat_timeout_secs, 30);
        assert_eq!(
            serve.dns_server,
            vec![
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn parses_the_key_subcommand_and_refuses_mixtures() {
        let cli =
            Cli::try_parse_from(["shroud-discovery", "key", "--signing-key", "/s.key"]).unwrap();
        assert!(
            matches!(cli.command, Some(Command::Key(ref args)) if args.signing_key == Path::new("/s.key"))
        );
        assert!(Cli::try_parse_from(["shroud-discovery", "--listen", "127.0.0.1:1"]).is_err());
        assert!(Cli::try_parse_from([
            "shroud-discovery",
            "key",
            "--signing-key",
            "/s.key",
            "--listen",
            "127.0.0.1:1"
        ])
        .is_err());
        let err = Cli::try_parse_from([
            "shroud-discovery",
            "--listen",
            "127.0.0.1:1",
            "--tls-cert",
            "/c",
            "--tls-key",
            "/k",
            "--signing-key",
            "/s",
            "--dns-server",
            "127.0.0.1",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("--require-cname"), "{err}");
    }

    #[test]
    fn reads_resolv_conf() {
        let text = "# comment\nsearch example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n\
                    nameserver bogus\noptions ndots:2\n";
        assert_eq!(
            resolv_conf_servers(text),
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn key_subcommand_makes_a_private_key_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        print_key(&path).unwrap();
        let first = shroud_mux::keyfile::load(&path).unwrap().public();
        print_key(&path).unwrap();
        assert_eq!(shroud_mux::keyfile::load(&path).unwrap().public(), first);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
