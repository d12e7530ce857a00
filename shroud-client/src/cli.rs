//! The command line: what `shroud` accepts, and nothing about what it then does.
//!
//! ```text
//! shroud [OPTIONS] --proxy NAME[:PORT] <HOSTNAME> <TARGET>
//! shroud key [--key FILE]
//! shroud completions SHELL
//! shroud man [--out DIR]
//! ```

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::proxy_protocol::Version;
use crate::shared::ProxyAddr;
use crate::transport::TransportKind;

/// Publish a service that has no public address under a public hostname, through shroud proxies.
///
/// shroud keeps one TLS connection open to each proxy; the proxies send visitors of HOSTNAME
/// down those connections, and shroud passes them on to TARGET.
#[derive(Debug, Parser)]
#[command(
    name = "shroud",
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

    /// Where to serve metrics, health and readiness (--metrics-listen); for running only.
    #[command(flatten)]
    pub metrics: shroud_process::metrics::MetricsArgs,

    /// A subcommand, if one was given instead of the options to run a tunnel.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// The options to run a tunnel with: `Some` exactly when `command` is `None` (clap refuses
    /// run options beside a subcommand, and requires them without one).
    ///
    /// An `Option` because clap cannot fill the required fields of a plain `RunArgs` when a
    /// subcommand stands in their place.
    #[command(flatten)]
    pub run: Option<RunArgs>,
}

/// shroud's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print this client's public key, for a proxy's authorized file (makes the key if missing).
    Key(KeyArgs),
    /// Print a shell completion script, e.g. `shroud completions bash >
    /// ~/.local/share/bash-completion/completions/shroud`
    Completions(shroud_process::packaging::CompletionsArgs),
    /// Print the man page (roff: `shroud man | man -l -`), or write every page into --out DIR
    Man(shroud_process::packaging::ManArgs),
}

/// Options of `shroud key`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The client's key file; created with mode 0600 if missing [default: client.key in the
    /// user's state directory, e.g. ~/.local/state/shroud]
    #[arg(long, value_name = "FILE", env = "SHROUD_KEY")]
    pub key: Option<PathBuf>,
}

/// Options for running a tunnel.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The public hostname visitors use, e.g. app.example.com (with --fleet-name, leave it
    /// out and give TARGET alone)
    #[arg(
        value_name = "HOSTNAME",
        required_unless_present = "fleet_name",
        env = "SHROUD_HOSTNAME"
    )]
    pub hostname: Option<String>,

    /// Where visitors' TLS connections go, as HOST:PORT, e.g. 127.0.0.1:443 or [::1]:443
    #[arg(
        value_name = "TARGET",
        required_unless_present = "fleet_name",
        env = "SHROUD_TARGET"
    )]
    pub target: Option<String>,

    /// Publish without a domain of your own, at WORDS.DOMAIN: DOMAIN is one the proxies offer
    /// (their --word-names), WORDS four words derived from this client's key, the same at every
    /// start. The URL is printed on stdout. Give TARGET alone, no HOSTNAME
    #[arg(long, value_name = "DOMAIN", env = "SHROUD_FLEET_NAME")]
    pub fleet_name: Option<String>,

    /// A proxy to hold a tunnel to, as NAME or NAME:PORT (port 443 if omitted); repeat for
    /// several proxies. A proxy run with --onion-tunnel is NAME@ADDRESS.onion[:PORT]: the tunnel
    /// goes to its onion service through Tor, no exit on the way, and the certificate is still
    /// checked for NAME (for a bare ADDRESS.onion, it must name the onion address). Takes
    /// precedence over --discovery and --srv
    #[arg(
        long,
        value_name = "NAME[:PORT]",
        env = "SHROUD_PROXY",
        value_delimiter = ','
    )]
    pub proxy: Vec<String>,

    /// Ask this discovery service which proxies to use, e.g. https://discovery.example.net;
    /// the list is fetched through the transport in use and must be signed by --discovery-key.
    /// Repeat for each instance of a replicated service: when one fails, the next is asked.
    /// Takes precedence over --srv
    #[arg(
        long,
        value_name = "URL",
        env = "SHROUD_DISCOVERY",
        value_delimiter = ',',
        requires = "discovery_key"
    )]
    pub discovery: Vec<String>,

    /// The discovery service's public key (`ed25519:...`, as `shroud-discovery key` prints);
    /// lists signed by any other key are refused
    #[arg(long, value_name = "KEY", env = "SHROUD_DISCOVERY_KEY")]
    pub discovery_key: Option<String>,

    /// Find proxies in DNS: SRV records `_shroud._tcp.HOSTNAME`, in priority and weight order.
    /// With tor the query goes through Tor, to --dns-server
    #[arg(long, env = "SHROUD_SRV")]
    pub srv: bool,

    /// The DNS server the client asks, as IP:PORT: for --srv records (over TCP; required with
    /// tor, where the query crosses Tor to it), and with direct also for the proxies' own
    /// addresses (SRV targets, --proxy names), instead of the system's resolver. With direct
    /// and no --dns-server, --srv asks the first nameserver of /etc/resolv.conf
    #[arg(long, value_name = "ADDR", env = "SHROUD_DNS_SERVER")]
    pub dns_server: Option<std::net::SocketAddr>,

    /// With --discovery or --srv, hold tunnels to at most this many proxies
    #[arg(
        long,
        value_name = "N",
        default_value_t = 3,
        env = "SHROUD_MAX_PROXIES",
        value_parser = clap::value_parser!(u16).range(1..=32)
    )]
    pub max_proxies: u16,

    /// Connect to NAME:PORT at ADDR instead of looking NAME up; the certificate is still checked
    /// against NAME. Repeatable
    #[arg(
        long,
        value_name = "NAME:PORT:ADDR",
        env = "SHROUD_RESOLVE",
        value_delimiter = ','
    )]
    pub resolve: Vec<String>,

    /// A PEM file of extra CA certificates to trust for proxies, besides the usual public roots
    #[arg(long, value_name = "FILE", env = "SHROUD_PROXY_CA")]
    pub proxy_ca: Option<PathBuf>,

    /// How to reach the proxies: `tor` (the default) through embedded Tor, so that no proxy
    /// learns where this machine is; `direct` dials them straight from this machine, and so
    /// shows this machine's address to every proxy
    #[arg(
        long,
        value_enum,
        value_name = "TRANSPORT",
        env = "SHROUD_TRANSPORT",
        default_value_t = TransportKind::Tor
    )]
    pub transport: TransportKind,

    /// Where the client keeps Tor's state and directory cache [default: the user's state
    /// directory, e.g. ~/.local/state/shroud]
    #[arg(long, value_name = "DIR", env = "SHROUD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Use another Tor network than the public one: a file in Arti's TOML config form (its
    /// `[tor_network]` section, and optionally `[path_rules]`, `[address_filter]` and
    /// `[override_net_params]`). Only then may circuits lead to loopback or private addresses,
    /// and --resolve be used
    #[arg(long, value_name = "FILE", env = "SHROUD_TOR_NETWORK")]
    pub tor_network: Option<PathBuf>,

    /// Seconds Tor may take to bootstrap before the client gives up and says why
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 300,
        env = "SHROUD_TOR_BOOTSTRAP_TIMEOUT_SECS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub tor_bootstrap_timeout_secs: u64,

    /// Vanguards on every onion-service circuit: tunnels to .onion proxies and the --onion
    /// service. `full` (4 second-hop relays kept for days, 8 third-hop relays kept for hours,
    /// both kept in the state directory across restarts) is Tor's advice for a long-lived
    /// service; `lite` (4 second-hop relays, chosen anew at each start) is Tor's default for
    /// clients. Circuits through an exit have none either way
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        env = "SHROUD_VANGUARDS",
        default_value_t = shroud_tor::Vanguards::Full
    )]
    pub vanguards: shroud_tor::Vanguards,

    /// The client's key file; created with mode 0600 if missing [default: client.key in the
    /// user's state directory, e.g. ~/.local/state/shroud]
    #[arg(long, value_name = "FILE", env = "SHROUD_KEY")]
    pub key: Option<PathBuf>,

    /// Where visitors' plain-HTTP connections go, as HOST:PORT; without it the proxy redirects them to HTTPS
    #[arg(long, value_name = "ADDR", env = "SHROUD_HTTP_TARGET")]
    pub http_target: Option<String>,

    /// Terminate visitors' TLS here with this PEM certificate chain, and send TARGET the
    /// decrypted bytes (needs --tls-key)
    #[arg(
        long,
        value_name = "FILE",
        env = "SHROUD_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key for --tls-cert
    #[arg(
        long,
        value_name = "FILE",
        env = "SHROUD_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Get a certificate for HOSTNAME from an ACME CA (Let's Encrypt by default), EMAIL its
    /// contact, and terminate visitors' TLS with it, sending TARGET plaintext. The CA's
    /// TLS-ALPN-01 check arrives through the proxies and is answered here; every request to
    /// the CA goes through the transport (Tor by default), so the CA never learns this
    /// machine's address. Renewed when a third of its lifetime is left. Needs
    /// --acme-agree-tos
    #[arg(
        long,
        value_name = "EMAIL",
        env = "SHROUD_ACME",
        conflicts_with = "tls_cert"
    )]
    pub acme: Option<String>,

    /// Agree to the ACME CA's terms of service (without it, --acme prints where to read them
    /// and exits)
    #[arg(long, env = "SHROUD_ACME_AGREE_TOS", requires = "acme")]
    pub acme_agree_tos: bool,

    /// The ACME CA's directory URL; `letsencrypt` and `letsencrypt-staging` are shorthands
    #[arg(
        long,
        value_name = "URL",
        env = "SHROUD_ACME_DIRECTORY",
        default_value = "letsencrypt",
        requires = "acme"
    )]
    pub acme_directory: String,

    /// Also trust the CA certificates in FILE (PEM) for the ACME server's own TLS: for a
    /// private CA or a test server
    #[arg(long, value_name = "FILE", env = "SHROUD_ACME_CA", requires = "acme")]
    pub acme_ca: Option<PathBuf>,

    /// Let TARGET terminate TLS itself: write the certificate to DIR/fullchain.pem and its key
    /// to DIR/privkey.pem (mode 0600, replaced atomically on renewal) and pass visitors' TLS
    /// through; only the CA's checks are answered here
    #[arg(
        long,
        value_name = "DIR",
        env = "SHROUD_ACME_EXPORT",
        requires = "acme"
    )]
    pub acme_export: Option<PathBuf>,

    /// After a failed attempt to get a certificate, wait this long before the next, doubling
    /// each time up to an hour
    #[arg(long, value_name = "SECS", env = "SHROUD_ACME_RETRY_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600), requires = "acme")]
    pub acme_retry_secs: u64,

    /// With --acme-export, run CMD (with `sh -c`) after each new certificate is written, to
    /// make TARGET load it
    #[arg(
        long,
        value_name = "CMD",
        env = "SHROUD_ACME_RELOAD_CMD",
        requires = "acme_export"
    )]
    pub acme_reload_cmd: Option<String>,

    /// Start each connection to TARGET and --http-target with a PROXY protocol header
    /// (HAProxy's, v1 text or v2 binary) carrying the visitor's address and port, before any
    /// of the visitor's bytes (with --tls-cert, before the decrypted bytes); the origin must
    /// expect it. The destination address is 0.0.0.0 or :: (the visitor's family: the client
    /// does not know the proxy's public address), the destination port the proxy's public
    /// port. Off by default: no header
    #[arg(
        long,
        value_enum,
        value_name = "VERSION",
        env = "SHROUD_PROXY_PROTOCOL"
    )]
    pub proxy_protocol: Option<Version>,

    /// Seconds to wait for the connection to a proxy to open, Tor circuit included (the TLS
    /// handshake and bind that follow have their own deadline) [default: 60 with tor, 15 with
    /// direct]
    #[arg(
        long,
        value_name = "SECS",
        env = "SHROUD_CONNECT_TIMEOUT_SECS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub connect_timeout_secs: Option<u64>,

    /// Seconds between pings on each tunnel; a tunnel is declared dead after two intervals
    /// without a pong
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 10,
        env = "SHROUD_KEEPALIVE_SECS",
        value_parser = clap::value_parser!(u64).range(1..=15)
    )]
    pub keepalive_secs: u64,

    /// Longest wait, in seconds, between attempts to reconnect to a proxy
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60,
        env = "SHROUD_MAX_BACKOFF_SECS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub max_backoff_secs: u64,

    /// Most bytes one visitor's stream may hold here received from the proxy but not yet
    /// passed to TARGET: the cap on its yamux receive window, 262144 (256 KiB, the fixed
    /// initial window) to 16777216. A stream's window grows from 256 KiB towards it only while
    /// the stream is read quickly, so that one upload over a slow, distant tunnel (Tor) is not
    /// held to 256 KiB per round trip; growth comes from one pool per tunnel, so a tunnel
    /// holds at most this much more than 256 KiB per stream
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = shroud_mux::session::DEFAULT_STREAM_BUFFER,
        env = "SHROUD_STREAM_BUFFER_BYTES",
        value_parser = stream_buffer_bytes()
    )]
    pub stream_buffer_bytes: usize,

    /// Most streams (visitor connections, plus the control stream) open at once on each
    /// tunnel; a stream the proxy opens beyond it is reset. Each visitor also holds a
    /// connection to TARGET, hence a file descriptor
    #[arg(
        long,
        value_name = "N",
        default_value_t = 8192,
        env = "SHROUD_MAX_STREAMS",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=1_000_000)
    )]
    pub max_streams: usize,

    /// After a proxy's policy refuses the hostname (not authorized, at bind time or later when
    /// the proxy reloads its authorized file), seconds before asking that proxy again; SIGHUP
    /// asks at once
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 120,
        env = "SHROUD_REFUSED_RETRY_SECS",
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub refused_retry_secs: u64,

    /// Also reload, as SIGHUP does, when --tls-cert or --tls-key changes: its size, time or
    /// content, looked at every --watch-interval-secs
    // Not a flattened shroud_process::reload::WatchArgs: see its documentation.
    #[arg(long, env = "SHROUD_WATCH")]
    pub watch: bool,

    /// How often --watch looks at the files, in seconds
    #[arg(long, env = "SHROUD_WATCH_INTERVAL_SECS", value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub watch_interval_secs: u64,

    /// Also publish TARGET as this client's own onion service, through its embedded Tor:
    /// visitors with a Tor client reach the origin at ADDRESS.onion (port 443 to TARGET, port
    /// 80 to --http-target), through no proxy and no exit. The address is printed on stdout
    /// at start; its key lives in the state directory and keeps it the same across restarts.
    /// Needs the tor transport
    #[arg(long, env = "SHROUD_ONION")]
    pub onion: bool,

    /// How often, in seconds, the --onion service checks that visitors reach it, by opening a
    /// stream to its own address through Tor. After 3 failed checks in a row it relaunches
    /// with new introduction points (same key, same address), so it comes back within minutes
    /// when the relays holding its introduction points die, where Tor alone takes 15. 0 turns
    /// the checks off
    #[arg(long, env = "SHROUD_ONION_PROBE_INTERVAL_SECS", value_name = "SECS",
          default_value_t = shroud_tor::onion_service::DEFAULT_PROBE_INTERVAL.as_secs(),
          value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub onion_probe_interval_secs: u64,

    /// Serve SOCKS5 and HTTP CONNECT on ADDR (e.g. 127.0.0.1:9050) for the origin's own
    /// programs: their connections leave through the client's Tor (names resolved by the
    /// exit, never here), each destination on circuits of its own. Destinations on this
    /// machine or a local network are refused unless --tor-network is given. Needs the tor
    /// transport
    #[arg(long, value_name = "ADDR", env = "SHROUD_SOCKS_LISTEN")]
    pub socks_listen: Option<std::net::SocketAddr>,

    /// Let --socks-listen take an address that is not loopback. Anyone who can reach it can
    /// then use this machine's Tor, their traffic leaving as the origin's: only where every
    /// host that can reach it is yours
    #[arg(
        long,
        env = "SHROUD_SOCKS_ALLOW_NON_LOOPBACK",
        requires = "socks_listen"
    )]
    pub socks_allow_non_loopback: bool,

    /// Most connections --socks-listen serves at once; one more is closed at once
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1024,
        env = "SHROUD_SOCKS_MAX_CONNECTIONS",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536)
    )]
    pub socks_max_connections: usize,

    /// With tor: most new Tor circuits one proxy's tunnel may cost in any hour. A tunnel keeps
    /// its circuit across reconnects for as long as the circuit works, so a proxy that drops,
    /// drains or stalls its tunnels costs none; a new circuit is built only when the old one
    /// fails (closed, or no answer from the exit), and past this many the tunnel waits (and
    /// with --discovery or --srv another proxy of the list is used instead) rather than give
    /// a hostile proxy one fresh middle relay after another next to this machine's guard
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::circuits::DEFAULT_PER_PROXY,
        env = "SHROUD_MAX_CIRCUITS_PER_PROXY_PER_HOUR",
        value_parser = clap::value_parser!(u32).range(1..=3600)
    )]
    pub max_circuits_per_proxy_per_hour: u32,

    /// With tor: most new Tor circuits all tunnels together may cost in any hour (see
    /// --max-circuits-per-proxy-per-hour)
    #[arg(
        long,
        value_name = "N",
        default_value_t = crate::circuits::DEFAULT_TOTAL,
        env = "SHROUD_MAX_CIRCUITS_PER_HOUR",
        value_parser = clap::value_parser!(u32).range(1..=36000)
    )]
    pub max_circuits_per_hour: u32,
}

/// A stream buffer size yamux can honour.
fn stream_buffer_bytes() -> clap::builder::RangedU64ValueParser<usize> {
    use shroud_mux::session::{MAX_STREAM_BUFFER, MIN_STREAM_BUFFER};
    clap::builder::RangedU64ValueParser::new()
        .range(MIN_STREAM_BUFFER as u64..=MAX_STREAM_BUFFER as u64)
}

/// The port proxies listen on unless told otherwise: 443, which Tor exits commonly allow.
pub const DEFAULT_PROXY_PORT: u16 = 443;

/// Reads a `--proxy` value: `NAME[:PORT]`, `ADDRESS.onion[:PORT]`, or
/// `NAME@ADDRESS.onion[:PORT]` (port 443 if absent), normalised.
///
/// An onion address is dialed through Tor; the proxy's certificate is checked against NAME,
/// or against the onion address itself when no NAME is given.
pub fn parse_proxy(s: &str) -> Result<ProxyAddr, String> {
    let (name, rest) = match s.split_once('@') {
        Some((name, rest)) => (Some(name), rest),
        None => (None, s),
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (host, parse_port(s, port)?),
        None => (rest, DEFAULT_PROXY_PORT),
    };
    if !shroud_mux::onion::is_onion(host) {
        if name.is_some() {
            return Err(format!(
                "{s:?}: NAME@ADDRESS is for onion addresses: {host:?} does not end in .onion"
            ));
        }
        let name = shroud_mux::hostname::normalize(host)
            .map_err(|err| format!("{s:?}: {host:?} is not a hostname: {err}"))?;
        return Ok(ProxyAddr::new(name, port));
    }
    let onion = shroud_mux::onion::normalize(host).map_err(|err| format!("{s:?}: {err}"))?;
    let name = match name {
        None => onion.clone(),
        Some(name) if shroud_mux::onion::is_onion(name) => {
            return Err(format!(
                "{s:?}: before the @ goes the name the proxy's certificate is for, not an onion \
                 address"
            ))
        }
        Some(name) => shroud_mux::hostname::normalize(name)
            .map_err(|err| format!("{s:?}: {name:?} is not a hostname: {err}"))?,
    };
    Ok(ProxyAddr {
        name,
        port,
        onion: Some(onion),
    })
}

/// Reads a `HOST:PORT` target: an IPv4 address, a bracketed IPv6 address or a hostname, then a
/// port. Returns the host without brackets.
pub fn parse_target(s: &str) -> Result<(String, u16), String> {
    let shape =
        || format!("{s:?}: expected HOST:PORT, like 127.0.0.1:443, [::1]:443 or localhost:8080");
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, port) = rest.split_once("]:").ok_or_else(shape)?;
        let addr: std::net::Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IPv6 address"))?;
        return Ok((addr.to_string(), parse_port(s, port)?));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(shape)?;
    if host.contains(':') {
        return Err(format!(
            "{s:?}: put an IPv6 address in brackets, like [::1]:443"
        ));
    }
    let port = parse_port(s, port)?;
    if let Ok(addr) = host.parse::<IpAddr>() {
        return Ok((addr.to_string(), port));
    }
    let host = shroud_mux::hostname::normalize(host)
        .map_err(|err| format!("{s:?}: {host:?} is neither an IP address nor a hostname: {err}"))?;
    Ok((host, port))
}

fn parse_port(whole: &str, port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!(
            "{whole:?}: {port:?} is not a port number from 1 to 65535"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_full_run_args() {
        let cli = Cli::try_parse_from([
            "shroud",
            "--proxy",
            "p1.example:443",
            "--proxy=p2.example:8443",
            "--resolve",
            "p1.example:443:127.0.0.1",
            "--proxy-ca",
            "/etc/ca.pem",
            "--transport",
            "direct",
            "--key",
            "/tmp/k",
            "--http-target",
            "127.0.0.1:80",
            "--tls-cert",
            "/c.pem",
            "--tls-key",
            "/k.pem",
            "--proxy-protocol",
            "v2",
            "--connect-timeout-secs",
            "5",
            "--keepalive-secs",
            "3",
            "--max-backoff-secs",
            "30",
            "--stream-buffer-bytes",
            "524288",
            "app.example",
            "127.0.0.1:443",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let run = cli.run.unwrap();
        assert_eq!(run.hostname.as_deref(), Some("app.example"));
        assert_eq!(run.target.as_deref(), Some("127.0.0.1:443"));
        assert_eq!(run.proxy, ["p1.example:443", "p2.example:8443"]);
        assert_eq!(run.resolve, ["p1.example:443:127.0.0.1"]);
        assert_eq!(run.proxy_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(run.transport, TransportKind::Direct);
        assert_eq!(run.key, Some(PathBuf::from("/tmp/k")));
        assert_eq!(run.http_target.as_deref(), Some("127.0.0.1:80"));
        assert_eq!(run.tls_cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(run.tls_key, Some(PathBuf::from("/k.pem")));
        assert_eq!(run.proxy_protocol, Some(Version::V2));
        assert_eq!(run.connect_timeout_secs, Some(5));
        assert_eq!(run.keepalive_secs, 3);
        assert_eq!(run.max_backoff_secs, 30);
        assert_eq!(run.stream_buffer_bytes, 512 * 1024);
    }

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from([
            "shroud",
            "--proxy=p.example:443,q.example:443",
            "--transport=tor",
            "app.example",
            "[::1]:443",
        ])
        .unwrap();
        let run = cli.run.unwrap();
        assert_eq!(run.proxy, ["p.example:443", "q.example:443"]);
        assert_eq!(run.transport, TransportKind::Tor);
        assert_eq!(run.key, None);
        assert_eq!(run.tls_cert, None);
        assert_eq!(run.proxy_protocol, None);
        assert_eq!(run.connect_timeout_secs, None);
        assert_eq!(run.keepalive_secs, 10);
        assert_eq!(run.max_backoff_secs, 60);
        assert_eq!(run.stream_buffer_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn stream_buffer_is_bounded() {
        for bad in ["0", "262143", "16777217", "lots"] {
            let err = Cli::try_parse_from([
                "shroud",
                "--proxy=p.example",
                "--stream-buffer-bytes",
                bad,
                "a.example",
                "h:1",
            ])
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}: {err}");
        }
    }

    #[test]
    fn max_streams_defaults_to_8192_and_is_bounded() {
        let parse = |extra: &[&str]| {
            let args = ["shroud", "--proxy=p.example", "a.example", "h:1"];
            Cli::try_parse_from(args.iter().chain(extra))
        };
        assert_eq!(parse(&[]).unwrap().run.unwrap().max_streams, 8192);
        let run = parse(&["--max-streams", "20000"]).unwrap().run.unwrap();
        assert_eq!(run.max_streams, 20_000);
        for bad in ["0", "1", "1000001", "many"] {
            let err = parse(&["--max-streams", bad]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}: {err}");
        }
    }

    #[test]
    fn parses_the_key_subcommand() {
        let cli = Cli::try_parse_from(["shroud", "key"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Key(KeyArgs { key: None }))
        ));

        let cli = Cli::try_parse_from(["shroud", "key", "--key", "/tmp/k"]).unwrap();
        let Some(Command::Key(args)) = cli.command else {
            panic!("not the key subcommand");
        };
        assert_eq!(args.key, Some(PathBuf::from("/tmp/k")));
    }

    #[test]
    fn parses_the_packaging_subcommands() {
        let cli = Cli::try_parse_from(["shroud", "completions", "zsh"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Completions(ref args)) if args.shell == shroud_process::packaging::Shell::Zsh
        ));
        assert!(cli.run.is_none());
        let cli = Cli::try_parse_from(["shroud", "man", "--out", "/tmp/man1"]).unwrap();
        let Some(Command::Man(args)) = cli.command else {
            panic!("not the man subcommand");
        };
        assert_eq!(args.out, Some(PathBuf::from("/tmp/man1")));
        let err = Cli::try_parse_from(["shroud", "completions", "tcsh"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidValue, "{err}");
    }

    #[test]
    fn run_args_do_not_mix_with_the_subcommand() {
        // After a run option, `key` is just the HOSTNAME, and the rest is missing.
        let err = Cli::try_parse_from(["shroud", "--transport", "direct", "key"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{err}");
        // After `key`, run options are unknown.
        let err = Cli::try_parse_from(["shroud", "key", "--transport", "direct"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument, "{err}");
    }

    #[test]
    fn nothing_at_all_is_an_error() {
        let err = Cli::try_parse_from(["shroud"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{err}");
    }

    #[test]
    fn transport_defaults_to_tor() {
        let cli = Cli::try_parse_from(["shroud", "--proxy", "p.example:443", "a.example", "h:1"])
            .unwrap();
        assert_eq!(cli.run.unwrap().transport, TransportKind::Tor);
    }

    #[test]
    fn tls_cert_needs_tls_key() {
        let err = Cli::try_parse_from([
            "shroud",
            "--proxy",
            "p.example:443",
            "--transport",
            "direct",
            "--tls-cert",
            "/c.pem",
            "a.example",
            "h:1",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{err}");
        assert!(err.to_string().contains("--tls-key"), "{err}");
    }

    #[test]
    fn proxy_protocol_is_v1_or_v2() {
        let parse = |version: &str| {
            let args = ["shroud", "--proxy=p.example", "--proxy-protocol", version];
            Cli::try_parse_from(args.iter().chain(&["a.example", "h:1"]))
        };
        let run = parse("v1").unwrap().run.unwrap();
        assert_eq!(run.proxy_protocol, Some(Version::V1));
        let err = parse("v3").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidValue, "{err}");
    }

    #[test]
    fn vanguards_are_full_unless_lite_is_asked_for() {
        let parse = |extra: &[&str]| {
            let args = ["shroud", "--proxy=p.example", "a.example", "h:1"];
            Cli::try_parse_from(args.iter().chain(extra))
        };
        let run = parse(&[]).unwrap().run.unwrap();
        assert_eq!(run.vanguards, shroud_tor::Vanguards::Full);
        let run = parse(&["--vanguards", "lite"]).unwrap().run.unwrap();
        assert_eq!(run.vanguards, shroud_tor::Vanguards::Lite);
        // Turning them off is not offered.
        for bad in ["disabled", "none", ""] {
            let err = parse(&["--vanguards", bad]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidValue, "{bad}: {err}");
        }
    }

    #[test]
    fn onion_and_socks_flags() {
        let parse = |extra: &[&str]| {
            let args = ["shroud", "--proxy=p.example", "a.example", "h:1"];
            Cli::try_parse_from(args.iter().chain(extra))
        };
        let run = parse(&[]).unwrap().run.unwrap();
        assert!(!run.onion);
        assert_eq!(run.socks_listen, None);
        assert_eq!(run.socks_max_connections, 1024);
        let run = parse(&["--onion", "--socks-listen", "127.0.0.1:9050"])
            .unwrap()
            .run
            .unwrap();
        assert!(run.onion);
        assert_eq!(run.socks_listen, Some("127.0.0.1:9050".parse().unwrap()));
        assert!(!run.socks_allow_non_loopback);
        // Allowing a non-loopback address means nothing without an address.
        let err = parse(&["--socks-allow-non-loopback"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument, "{err}");
        for bad in ["0", "65537"] {
            let err = parse(&["--socks-max-connections", bad]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{bad}: {err}");
        }
        let err = parse(&["--socks-listen", "localhost:9050"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation, "{err}");
    }

    #[test]
    fn transport_help_warns_about_direct() {
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains("shows this machine's address to every proxy"),
            "{help}"
        );
    }

    #[test]
    fn parses_proxies() {
        let plain = |name: &str, port| Ok(ProxyAddr::new(name.to_owned(), port));
        assert_eq!(
            parse_proxy("Proxy.Example.:443"),
            plain("proxy.example", 443)
        );
        assert_eq!(parse_proxy("proxy.example"), plain("proxy.example", 443));
        for bad in ["proxy.example:0", "proxy.example:65536", ":443", "a b:1"] {
            assert!(parse_proxy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_onion_proxies_with_the_name_their_certificate_is_for() {
        let onion = shroud_mux::onion::from_public_key(&[5; 32]);
        let shouted = onion.to_ascii_uppercase();
        // NAME@ADDRESS.onion[:PORT]: dial the onion, check the certificate for NAME.
        let proxy = parse_proxy(&format!("Proxy.Example@{shouted}:8443")).unwrap();
        assert_eq!(
            proxy,
            ProxyAddr {
                name: "proxy.example".into(),
                port: 8443,
                onion: Some(onion.clone()),
            }
        );
        assert_eq!(proxy.dial_host(), onion);
        assert_eq!(proxy.to_string(), format!("proxy.example@{onion}:8443"));
        // A bare onion address: the certificate must name the onion address; port 443.
        let bare = parse_proxy(&onion).unwrap();
        assert_eq!((bare.name.as_str(), bare.port), (onion.as_str(), 443));
        assert_eq!(bare.onion.as_deref(), Some(onion.as_str()));
        assert_eq!(bare.to_string(), format!("{onion}:443"));
        for (bad, says) in [
            (onion.replacen('a', "b", 1), "checksum"),
            ("p.example@q.example:443".to_owned(), "onion addresses"),
            (format!("{onion}@{onion}"), "not an onion address"),
            (format!("a b@{onion}"), "not a hostname"),
            (format!("p.example@{onion}:0"), "port"),
            ("abc.onion".to_owned(), "56 characters"),
        ] {
            let err = parse_proxy(&bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_targets() {
        assert_eq!(
            parse_target("127.0.0.1:443"),
            Ok(("127.0.0.1".to_owned(), 443))
        );
        assert_eq!(parse_target("[::1]:443"), Ok(("::1".to_owned(), 443)));
        assert_eq!(
            parse_target("localhost:8080"),
            Ok(("localhost".to_owned(), 8080))
        );
        assert_eq!(
            parse_target("Web.Internal:80"),
            Ok(("web.internal".to_owned(), 80))
        );
        for (bad, says) in [
            ("127.0.0.1", "expected HOST:PORT"),
            ("::1:443", "brackets"),
            ("[::1]443", "expected HOST:PORT"),
            ("[127.0.0.1]:443", "not an IPv6 address"),
            ("localhost:0", "not a port number"),
            ("localhost:http", "not a port number"),
            (":443", "neither an IP address nor a hostname"),
        ] {
            let err = parse_target(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
