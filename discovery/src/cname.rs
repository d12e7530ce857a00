//! The optional CNAME check: a list is only given for a hostname whose owner pointed it at the
//! fleet.
//!
//! With `--require-cname shroud.example.net`, `GET /v1/proxies?host=www.example.com` is
//! answered only if `www.example.com` is a CNAME to `www.example.com.shroud.example.net`. When
//! the check cannot be made (the resolver fails or times out) the service answers 503, never
//! the list: it refuses rather than guesses. The answer is only as trustworthy as the resolver
//! asked, so point `--dns-server` at one you trust; answers are cached for their TTL.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;

/// How long one check may take in all, whatever the resolver's own retries.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of a check that could be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The host is a CNAME to the expected name.
    Confirmed,
    /// The host has no CNAME record (or does not exist).
    Absent,
    /// The host is a CNAME to another name.
    Elsewhere {
        /// Where it points.
        target: String,
    },
}

/// Why a check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The hostname cannot be put in a DNS query.
    #[error("the hostname cannot be looked up")]
    BadName(#[source] hickory_resolver::proto::ProtoError),
    /// The resolver failed: no answer, a server failure, a refusal.
    #[error("the DNS lookup failed")]
    Lookup(#[source] hickory_resolver::net::NetError),
    /// The lookup took longer than [`CHECK_TIMEOUT`].
    #[error("the DNS lookup timed out")]
    Timeout,
}

/// Checks hostnames against the required CNAME suffix.
#[derive(Clone)]
pub struct CnameCheck {
    domain: String,
    resolver: TokioResolver,
}

impl std::fmt::Debug for CnameCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CnameCheck")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl CnameCheck {
    /// A check requiring CNAMEs into `domain` (already normalised), asking `dns_servers` over
    /// UDP and TCP.
    pub fn new(
        domain: String,
        dns_servers: &[SocketAddr],
    ) -> Result<Self, hickory_resolver::net::NetError> {
        let name_servers = dns_servers
            .iter()
            .map(|server| {
                let mut config = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut config.connections {
                    connection.port = server.port();
                }
                config
            })
            .collect();
        let config = ResolverConfig::from_name_servers(name_servers);
        let mut options = ResolverOpts::default();
        options.timeout = Duration::from_secs(3);
        options.attempts = 2;
        options.use_hosts_file = ResolveHosts::Never;
        options.ndots = 0;
        let resolver = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(options)
            .build()?;
        Ok(Self { domain, resolver })
    }

    /// The domain CNAME targets must lie under.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Looks up `host`'s CNAME and compares it with `host.DOMAIN`. `host` is normalised.
    pub async fn check(&self, host: &str) -> Result<Verdict, CheckError> {
        let name = Name::from_ascii(format!("{host}.")).map_err(CheckError::BadName)?;
        let lookup = tokio::time::timeout(
            CHECK_TIMEOUT,
            self.resolver.lookup(name.clone(), RecordType::CNAME),
        )
        .await
        .map_err(|_| CheckError::Timeout)?;
        let lookup = match lookup {
            Ok(lookup) => lookup,
            // NXDOMAIN, or the name exists without a CNAME: a definite answer.
            Err(err) if err.is_no_records_found() => return Ok(Verdict::Absent),
            Err(err) => return Err(CheckError::Lookup(err)),
        };
        let expected = format!("{host}.{}", self.domain);
        let mut verdict = Verdict::Absent;
        for record in lookup.answers() {
            let RData::CNAME(cname) = &record.data else {
                continue;
            };
            if record.name.to_lowercase() != name.to_lowercase() {
                continue;
            }
            let target = cname.0.to_ascii();
            let target = target
                .strip_suffix('.')
                .unwrap_or(&target)
                .to_ascii_lowercase();
            if target != expected {
                // Any CNAME elsewhere decides: a name has one CNAME, and a second is suspect.
                return Ok(Verdict::Elsewhere { target });
            }
            verdict = Verdict::Confirmed;
        }
        Ok(verdict)
    }
}
