//! A DNS resolver that asks either a server the user named or the system's.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;

/// Why a resolver could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// No DNS server was given and the system's resolver configuration could not be read.
    #[error("could not read the system's DNS resolver configuration (/etc/resolv.conf)")]
    SystemConfig(#[source] NetError),
    /// The resolver could not be built from its configuration.
    #[error("could not set up the DNS resolver")]
    Build(#[source] NetError),
}

/// A resolver asking `server` directly from this machine (over UDP, then TCP for answers too
/// large for UDP), or the servers in `/etc/resolv.conf` when `None`. Never `/etc/hosts`: what
/// it answers comes from DNS. One lookup tries each server up to twice, `try_timeout` each;
/// `cache` says whether answers are kept for their TTL.
pub fn resolver(
    server: Option<SocketAddr>,
    try_timeout: Duration,
    cache: bool,
) -> Result<TokioResolver, ResolverError> {
    let (config, mut options) = match server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            (
                ResolverConfig::from_name_servers(vec![server]),
                ResolverOpts::default(),
            )
        }
        None => hickory_resolver::system_conf::read_system_conf()
            .map_err(ResolverError::SystemConfig)?,
    };
    options.timeout = try_timeout;
    options.attempts = 2;
    options.use_hosts_file = ResolveHosts::Never;
    if !cache {
        options.cache_size = 0;
    }
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(options)
        .build()
        .map_err(ResolverError::Build)
}
