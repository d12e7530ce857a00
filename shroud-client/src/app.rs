//! What the `shroud` binary does with its command line.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::acme::{self, Acme, AcmeConfig, AcmeError};
use crate::cli::{self, Cli, Command, RunArgs};
use crate::client::Client;
use crate::discovery::DiscoverySource;
use crate::fleet::ProxySource;
use crate::metrics::{ClientMetrics, Sources};
use crate::shared::{AcmeTls, ClientConfig, States, Target, Timing, TunnelState};
use crate::srv::SrvSource;
use crate::tor::{TorOptions, TorTransport};
use crate::transport::{DirectTransport, Resolve, Transport, TransportKind};
use crate::{key, onion, reload, socks, tls};
use shroud_mux::auth::PublicKey;
use shroud_process::reload::{watch_every, Reloads};
use shroud_process::tls::CertSlot;

/// Runs the command line to completion.
pub async fn main(cli: Cli) -> anyhow::Result<()> {
    match (cli.command, cli.run) {
        (Some(Command::Key(args)), _) => print_key(args.key),
        (Some(Command::Completions(args)), _) => Ok(shroud_process::packaging::print_completions(
            <Cli as clap::CommandFactory>::command(),
            args.shell,
        )?),
        (Some(Command::Man(args)), _) => Ok(shroud_process::packaging::write_man_pages(
            <Cli as clap::CommandFactory>::command(),
            &args,
        )?),
        (None, Some(run)) => {
            // First of all, so that a SIGHUP from here on (while Tor bootstraps, say) reloads
            // rather than ends the process.
            let config_file = cli.config.config.clone();
            let reloads = Reloads::listen(
                watch_every(run.watch, run.watch_interval_secs),
                reload::files(&run)
                    .into_iter()
                    .chain(config_file.clone())
                    .collect(),
            )
            .context("listening for SIGHUP")?;
            let shutdown = CancellationToken::new();
            tokio::spawn(shroud_process::signal::shutdown_on_signal(shutdown.clone()));
            // Checked and bound before Tor bootstraps, so a mistake shows at once.
            let socks_listener = bind_socks(&run).await?;
            if run.onion && run.transport != TransportKind::Tor {
                anyhow::bail!("--onion publishes through Tor: it needs --transport tor");
            }
            let tunnels = Arc::new(OnceLock::new());
            // The endpoint starts first, so that it reports Tor's bootstrap, and ends last.
            let metrics = Arc::new(ClientMetrics::new());
            let sources = Sources {
                states: tunnels.clone(),
                acme: Arc::default(),
            };
            let metrics_stop = CancellationToken::new();
            let _stop_metrics = metrics_stop.clone().drop_guard();
            let endpoint = start_metrics(&cli.metrics, &metrics, &sources, metrics_stop.clone())?;
            let Prepared {
                config,
                source,
                certificate,
                tor,
            } = config(&run, &shutdown, tunnels.clone(), &metrics).await?;
            let config = Arc::new(config);
            let acme = config.acme.as_ref().map(|tls| tls.acme.clone());
            if let Some(acme) = &acme {
                let _ = sources.acme.set(acme.clone());
            }
            let client = Client::spawn(config.clone(), source, shutdown.clone())?;
            let _ = tunnels.set(client.watch_states());
            let beside = start_beside_tunnels(&run, tor, &config, socks_listener, &shutdown)?;
            let reloader = reload::Reloader::new(run, certificate, client.retry_refused())
                .with_metrics(metrics.clone())
                .with_config_file(config_file);
            tokio::spawn(shroud_process::reload::serve(
                reloader,
                reloads,
                shutdown.clone(),
            ));
            tokio::select! {
                joined = client.join() => joined?,
                refused = never_certified(acme) => return Err(refused.into()),
            }
            // The client has stopped (shutdown is cancelled): so do the onion service and the
            // SOCKS proxy, each within a few seconds.
            shutdown.cancel();
            for task in beside {
                let _ = task.await;
            }
            metrics_stop.cancel();
            if let Some(endpoint) = endpoint {
                let _ = endpoint.await;
            }
            Ok(())
        }
        (None, None) => anyhow::bail!("give HOSTNAME and TARGET, or a subcommand; see --help"),
    }
}

/// Serves the client's metrics, health and readiness when `--metrics-listen` asks for them,
/// until `stop`.
fn start_metrics(
    args: &shroud_process::metrics::MetricsArgs,
    metrics: &Arc<ClientMetrics>,
    sources: &Sources,
    stop: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if args.metrics_listen.is_none() {
        return Ok(None);
    }
    let mut registry = shroud_process::metrics::registry("shroud_client");
    let readiness = crate::metrics::register(metrics, sources, &mut registry);
    Ok(shroud_process::metrics::spawn(
        args, registry, readiness, stop,
    )?)
}

/// Checks `--socks-listen` (loopback unless allowed otherwise, and Tor) and binds it.
async fn bind_socks(run: &RunArgs) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = run.socks_listen else {
        return Ok(None);
    };
    if run.transport != TransportKind::Tor {
        anyhow::bail!(
            "--socks-listen sends programs' connections through Tor: it needs --transport tor"
        );
    }
    socks::check_listen_addr(addr, run.socks_allow_non_loopback).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--socks-listen {addr}: binding"))?;
    Ok(Some(listener))
}

/// Starts what runs beside the tunnels on the client's Tor: its onion service (`--onion`,
/// whose address goes to stdout) and the proxy for local programs (`--socks-listen`).
/// Returns their tasks, which end after `shutdown`.
fn start_beside_tunnels(
    run: &RunArgs,
    tor: Option<Arc<shroud_tor::Tor>>,
    config: &Arc<ClientConfig>,
    socks_listener: Option<tokio::net::TcpListener>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    let Some(tor) = tor else {
        return Ok(tasks);
    };
    if run.onion {
        let settings = onion::OnionSettings {
            tor_dir: match &run.state_dir {
                Some(dir) => dir.join("tor"),
                None => key::default_state_dir()?.join("tor"),
            },
            probe_interval: (run.onion_probe_interval_secs > 0)
                .then(|| Duration::from_secs(run.onion_probe_interval_secs)),
        };
        let onion = onion::launch(tor.clone(), settings, config.clone(), shutdown.clone())
            .context("--onion")?;
        let ports = if config.http_target.is_some() {
            "443 to TARGET, 80 to --http-target"
        } else {
            "443 to TARGET"
        };
        info!(address = %onion.address, ports, "onion service address");
        // The address goes to stdout, for whoever started the client (and scripts) to take.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{}", onion.address).and_then(|()| stdout.flush());
        tasks.push(onion.task);
    }
    if let Some(listener) = socks_listener {
        let addr = listener.local_addr().context("--socks-listen")?;
        let options = socks::SocksOptions {
            allow_local: run.tor_network.is_some(),
            max_connections: run.socks_max_connections,
            connect_timeout: config.timing.connect_timeout,
            copy_buffer: shroud_mux::session::copy_buffer_len(config.timing.stream_buffer),
            ..socks::SocksOptions::default()
        };
        info!(%addr, "SOCKS5 and HTTP CONNECT proxy for local programs listening (through Tor)");
        let outbound = Arc::new(socks::TorOutbound::new(tor));
        tasks.push(tokio::spawn(socks::serve(
            listener,
            outbound,
            options,
            shutdown.clone(),
        )));
    }
    Ok(tasks)
}

/// Resolves only when ACME has failed for good with no certificate in hand: the client then
/// has nothing to serve visitors' TLS with, and exits with the CA's reason.
async fn never_certified(acme: Option<Arc<Acme>>) -> AcmeError {
    if let Some(acme) = acme {
        match acme.ready().await {
            Err(err @ AcmeError::Refused { .. }) if acme.certificate().is_none() => return err,
            // A certificate is in hand, the refusal came later (a renewal), or the client is
            // stopping: serve on.
            Ok(()) | Err(_) => {}
        }
    }
    std::future::pending().await
}

/// Whether every tunnel of the current list is bound: the moment to ask the CA to validate,
/// since its check may arrive at any of the proxies.
fn all_bound(tunnels: &OnceLock<watch::Receiver<States>>) -> bool {
    tunnels.get().is_some_and(|states| {
        let states = states.borrow();
        !states.is_empty() && states.values().all(|state| *state == TunnelState::Bound)
    })
}

/// `shroud key`: the public key alone on stdout's first line, then how to use it.
fn print_key(path: Option<PathBuf>) -> anyhow::Result<()> {
    let path = key_path(path)?;
    shroud_process::key::print_public(&path, "key", |public| {
        vec![
            "To let this client publish example.com, add this line to the proxy's --authorized \
             file:"
                .to_owned(),
            format!("example.com {public}"),
        ]
    })?;
    Ok(())
}

fn key_path(path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match path {
        Some(path) => Ok(path),
        None => key::default_key_path().context("finding the default key location; give --key"),
    }
}

/// What [`config`] makes of the run arguments.
pub struct Prepared {
    /// The client's configuration.
    pub config: ClientConfig,
    /// Where its proxies come from.
    pub source: ProxySource,
    /// The certificate visitors' TLS is terminated with, when it comes from files.
    pub certificate: Option<Arc<CertSlot>>,
    /// The Arti client, with the tor transport.
    pub tor: Option<Arc<shroud_tor::Tor>>,
}

/// Turns the run arguments into a client configuration and the source of its proxies, loading
/// the files they name, and the certificate visitors' TLS is terminated with when it comes
/// from files (for a reload to replace). With the tor transport this bootstraps Tor, which can
/// take a while.
///
/// With `--acme` it also starts getting the certificate; `tunnels` is where the client's
/// tunnel states will be, which ACME waits on before asking the CA to validate. What the
/// client counts goes to `metrics`. With Tor, the Arti client comes back too, for what else
/// runs through it.
pub async fn config(
    run: &RunArgs,
    shutdown: &CancellationToken,
    tunnels: Arc<OnceLock<watch::Receiver<States>>>,
    metrics: &Arc<ClientMetrics>,
) -> anyhow::Result<Prepared> {
    let key_path = key_path(run.key.clone())?;
    let (key, created) = key::load_or_create(&key_path)?;
    if created {
        info!(path = %key_path.display(), "created a new client key");
    }
    info!(key = %key.public(), "client identity");
    let (hostname, target) = published(run, &key.public())?;
    let target = parse_target(target, "TARGET")?;
    let http_target = run
        .http_target
        .as_deref()
        .map(|t| parse_target(t, "--http-target"))
        .transpose()?;
    let resolve = Resolve::from_entries(&run.resolve)?;
    let tor = run.transport == TransportKind::Tor;
    let source = proxy_source(run, &hostname, tor)?;
    let default_timing = if tor {
        Timing::tor()
    } else {
        Timing::default()
    };
    let timing = Timing {
        connect_timeout: run
            .connect_timeout_secs
            .map_or(default_timing.connect_timeout, Duration::from_secs),
        keepalive_interval: Duration::from_secs(run.keepalive_secs),
        backoff_cap: Duration::from_secs(run.max_backoff_secs),
        stream_buffer: run.stream_buffer_bytes,
        max_streams: run.max_streams,
        proxy_protocol: run.proxy_protocol,
        refused_retry: Duration::from_secs(run.refused_retry_secs),
        circuits_per_proxy: run.max_circuits_per_proxy_per_hour,
        circuits_total: run.max_circuits_per_hour,
        ..default_timing
    };
    let tls = tls::client_config(run.proxy_ca.as_deref())?;
    let (origin_tls, certificate) = match (&run.tls_cert, &run.tls_key) {
        (Some(cert), Some(key)) => {
            let (config, certificate) = tls::origin_tls(cert, key)?;
            if let Some(expiry) = tls::leaf_expiry(cert) {
                metrics.set_certificate_expiry(expiry);
            }
            (Some(config.into()), Some(certificate))
        }
        _ => (None, None),
    };
    // Last, because it may take a while: every local check has passed by now.
    let mut tor_client = None;
    let transport: Arc<dyn Transport> = match run.transport {
        TransportKind::Direct => {
            let direct = DirectTransport::new(resolve, timing.connect_timeout);
            match run.dns_server {
                Some(server) => Arc::new(direct.with_dns_server(server)?),
                None => Arc::new(direct),
            }
        }
        TransportKind::Tor => {
            let state_dir = match &run.state_dir {
                Some(dir) => dir.clone(),
                None => key::default_state_dir()?,
            };
            let options = TorOptions {
                state_dir: state_dir.join("tor"),
                network_file: run.tor_network.clone(),
                vanguards: run.vanguards,
                resolve,
                bootstrap_timeout: Duration::from_secs(run.tor_bootstrap_timeout_secs),
                progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let tor = TorTransport::bootstrap_reporting(options, Some(metrics.clone())).await?;
            tor_client = Some(tor.client());
            Arc::new(tor)
        }
    };
    let acme = match &run.acme {
        Some(email) => {
            let state_dir = match &run.state_dir {
                Some(dir) => dir.clone(),
                None => key::default_state_dir()?,
            };
            let directory = acme::directory_url(&run.acme_directory);
            let mut acme_config = AcmeConfig::new(&hostname, email, &directory, state_dir);
            acme_config.agree_tos = run.acme_agree_tos;
            acme_config.extra_ca.clone_from(&run.acme_ca);
            acme_config.timing.retry_base = Duration::from_secs(run.acme_retry_secs);
            acme_config.export = run.acme_export.as_ref().map(|dir| acme::Export {
                dir: dir.clone(),
                reload_cmd: run.acme_reload_cmd.clone(),
            });
            let ready = Box::new(move || all_bound(&tunnels));
            let acme = Acme::start(acme_config, transport.clone(), ready, shutdown.clone())
                .await
                .context("--acme")?;
            Some(AcmeTls {
                acme,
                terminate: run.acme_export.is_none(),
            })
        }
        None => None,
    };
    let config = ClientConfig {
        hostname,
        target,
        http_target,
        origin_tls,
        acme,
        transport,
        tls,
        key,
        timing,
        metrics: metrics.clone(),
    };
    Ok(Prepared {
        config,
        source,
        certificate,
        tor: tor_client,
    })
}

/// The hostname to publish and the TARGET text: both as given, or with `--fleet-name`, the
/// key's word name under that domain (printed on stdout as a URL) and the one positional.
fn published<'a>(run: &'a RunArgs, key: &PublicKey) -> anyhow::Result<(String, &'a str)> {
    let (hostname, target) = (run.hostname.as_deref(), run.target.as_deref());
    let Some(domain) = &run.fleet_name else {
        let (Some(hostname), Some(target)) = (hostname, target) else {
            anyhow::bail!("give HOSTNAME and TARGET (or --fleet-name DOMAIN and TARGET)");
        };
        let hostname = shroud_mux::hostname::normalize(hostname)
            .with_context(|| format!("HOSTNAME {hostname:?}"))?;
        return Ok((hostname, target));
    };
    // With --fleet-name, the one positional given is TARGET.
    let target = match (hostname, target) {
        (Some(target), None) | (None, Some(target)) => target,
        _ => anyhow::bail!(
            "--fleet-name publishes at a name derived from the key: give TARGET alone, not \
             HOSTNAME"
        ),
    };
    let domain = shroud_mux::hostname::normalize(domain)
        .with_context(|| format!("--fleet-name {domain:?}"))?;
    let hostname = shroud_mux::words::word_name(key, &domain);
    info!(%hostname, "publishing at this client's word name");
    // The URL goes to stdout, for whoever started the client (and scripts) to take.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "https://{hostname}/").and_then(|()| stdout.flush());
    Ok((hostname, target))
}

/// Where the proxies come from: `--proxy` over `--discovery` over `--srv`.
fn proxy_source(run: &RunArgs, hostname: &str, tor: bool) -> anyhow::Result<ProxySource> {
    let max_proxies = usize::from(run.max_proxies);
    if !run.proxy.is_empty() {
        if !run.discovery.is_empty() || run.srv {
            info!("--proxy given: --discovery and --srv are not used");
        }
        let proxies = run
            .proxy
            .iter()
            .map(|p| cli::parse_proxy(p).map_err(|e| anyhow::anyhow!("--proxy {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(onion) = proxies.iter().find(|p| p.onion.is_some()).filter(|_| !tor) {
            anyhow::bail!(
                "--proxy {onion}: an onion address is reached only through Tor; drop \
                 --transport direct"
            );
        }
        return Ok(ProxySource::Static(proxies));
    }
    if !run.discovery.is_empty() {
        if run.srv {
            info!("--discovery given: --srv is not used");
        }
        let key_text = run
            .discovery_key
            .as_deref()
            .context("--discovery needs --discovery-key KEY, the service's public key")?;
        let key: PublicKey = key_text
            .parse()
            .with_context(|| format!("--discovery-key {key_text:?}"))?;
        let request_timeout = if tor {
            Duration::from_secs(90)
        } else {
            Duration::from_secs(30)
        };
        let mut source = DiscoverySource::new(
            &run.discovery,
            key,
            hostname,
            run.proxy_ca.as_deref(),
            max_proxies,
            request_timeout,
        )?;
        if tor {
            // Proxies that also host their tunnel listener as an onion service are dialed
            // there: no exit on the way.
            source = source.with_onion();
        }
        return Ok(ProxySource::Dynamic(Box::new(source)));
    }
    if run.srv {
        let dns_server = match run.dns_server {
            Some(addr) => addr,
            None if tor => anyhow::bail!(
                "--srv with the tor transport needs --dns-server IP:PORT: the query goes through \
                 Tor to that server, never to this machine's resolver"
            ),
            None => first_system_nameserver()?,
        };
        let source = SrvSource::new(hostname, dns_server, max_proxies, tor);
        return Ok(ProxySource::Dynamic(Box::new(source)));
    }
    anyhow::bail!(
        "no proxies: give --proxy NAME[:PORT], or --discovery URL with --discovery-key KEY, or \
         --srv to find them in DNS"
    )
}

/// The first `nameserver` line of /etc/resolv.conf, on port 53.
fn first_system_nameserver() -> anyhow::Result<std::net::SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf")
        .context("--srv needs --dns-server IP:PORT (no /etc/resolv.conf to take one from)")?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .find_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| std::net::SocketAddr::new(ip, 53))
        .context("--srv needs --dns-server IP:PORT (/etc/resolv.conf names no nameserver)")
}

fn parse_target(text: &str, what: &str) -> anyhow::Result<Target> {
    let (host, port) = cli::parse_target(text).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    Ok(Target { host, port })
}
