//! Certificates for the published hostname from an ACME CA (RFC 8555), proven with
//! TLS-ALPN-01 (RFC 8737) through the tunnels themselves.
//!
//! The CA's validator connects to `HOSTNAME:443` offering ALPN `acme-tls/1`; the proxies route
//! that connection by SNI onto a tunnel like any visitor's, and the client answers it with the
//! challenge certificate from [`Acme::challenge_config`]. Every request to the CA leaves
//! through the client's [`Transport`] ([`http`]: through Tor by default, so the CA never learns
//! the origin's address, and never through this machine's resolver).
//!
//! [`Acme::start`] loads what the state directory holds ([`store`]: the account, the
//! certificate and its key) and spawns the manager ([`manager`]), which obtains a certificate,
//! renews it when a third of its lifetime is left (or when the CA's renewal information says),
//! and retries failures with backoff while the certificate it holds keeps being served.
//! Visitors get the current certificate through [`Acme::visitor_config`], picked per handshake,
//! so a renewal applies to new connections without touching live ones.

mod http;
mod manager;
mod store;
mod tls;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::transport::Transport;

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737): a ClientHello offering it is the CA's
/// validator, to be answered with [`Acme::challenge_config`].
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Let's Encrypt's production directory.
pub const LETSENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory: untrusted certificates, generous rate limits.
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// The directory URL a flag names: `letsencrypt` and `letsencrypt-staging` are shorthands for
/// Let's Encrypt's; anything else is taken as the URL itself.
pub fn directory_url(flag: &str) -> String {
    match flag {
        "letsencrypt" => LETSENCRYPT_PRODUCTION.to_owned(),
        "letsencrypt-staging" => LETSENCRYPT_STAGING.to_owned(),
        url => url.to_owned(),
    }
}

/// What to ask for, from whom, and where to keep it.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The name to certify (normalised again here: lower case, no trailing dot).
    pub hostname: String,
    /// The account's contact address (`mailto:` is added); empty for none.
    pub email: String,
    /// The CA's directory URL, `https://...` (see [`directory_url`]).
    pub directory: String,
    /// A PEM file of trust anchors for the CA's own HTTPS, besides the web's roots (for a
    /// private or test CA).
    pub extra_ca: Option<PathBuf>,
    /// The user agreed to the CA's terms of service. Without it, a CA that has terms is not
    /// asked for anything and [`Acme::start`] fails with [`AcmeError::TermsNotAgreed`].
    pub agree_tos: bool,
    /// Where the account, the certificate and its key are kept, under `acme/` (directories
    /// 0700, files 0600).
    pub state_dir: PathBuf,
    /// Also write each certificate for another server to use.
    pub export: Option<Export>,
    /// Renew when this much of the certificate's lifetime is left, instead of a third of it
    /// (or the CA's renewal window). Mostly for tests; a value longer than the CA's lifetime
    /// renews after every [`Timing::retry_base`].
    pub renew_before: Option<Duration>,
    /// Delays and deadlines.
    pub timing: Timing,
}

impl AcmeConfig {
    /// A configuration with no extra CA, terms not agreed, no export, and default timing.
    pub fn new(hostname: &str, email: &str, directory: &str, state_dir: PathBuf) -> Self {
        Self {
            hostname: hostname.to_owned(),
            email: email.to_owned(),
            directory: directory.to_owned(),
            extra_ca: None,
            agree_tos: false,
            state_dir,
            export: None,
            renew_before: None,
            timing: Timing::default(),
        }
    }
}

/// Where to export each certificate (a server of the operator's own terminates visitors' TLS).
#[derive(Debug, Clone)]
pub struct Export {
    /// Receives `fullchain.pem` and `privkey.pem` (0600), each replaced atomically; created
    /// 0700 if missing.
    pub dir: PathBuf,
    /// Run with `sh -c` after each export (to reload the server), for at most
    /// [`Timing::reload_timeout`]; its exit status is logged.
    pub reload_cmd: Option<String>,
}

/// Delays and deadlines of the ACME client. The defaults suit a public CA; tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// The first delay after a failed attempt, before jitter (30 s); it doubles up to
    /// `retry_cap`. Also the least time between two orders.
    pub retry_base: Duration,
    /// The longest delay between attempts (1 h); also the delay after a refusal.
    pub retry_cap: Duration,
    /// Each HTTP request to the CA, connection included (30 s).
    pub request_timeout: Duration,
    /// How long the CA may take to validate, and then to issue (2 min each).
    pub validation_timeout: Duration,
    /// How often the tunnels are asked whether they are all bound (500 ms)...
    pub tunnel_poll: Duration,
    /// ...and how long before validation is asked for anyway (60 s).
    pub tunnel_wait: Duration,
    /// How long the export's reload command may run before it is killed (60 s).
    pub reload_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            retry_base: Duration::from_secs(30),
            retry_cap: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(30),
            validation_timeout: Duration::from_secs(120),
            tunnel_poll: Duration::from_millis(500),
            tunnel_wait: Duration::from_secs(60),
            reload_timeout: Duration::from_secs(60),
        }
    }
}

/// Why the ACME client cannot start, or will never have a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// The hostname cannot be certified.
    #[error("cannot ask for a certificate for {hostname:?}")]
    BadHostname {
        /// The name as given.
        hostname: String,
        /// What is wrong with it.
        #[source]
        source: shroud_mux::hostname::HostnameError,
    },
    /// The directory URL is not `https://`.
    #[error("the ACME directory {url:?} is not an https:// URL")]
    BadDirectory {
        /// The URL as given.
        url: String,
    },
    /// The contact is not an email address.
    #[error("the ACME contact {email:?} is not an email address")]
    BadEmail {
        /// The address as given.
        email: String,
    },
    /// TLS toward the CA could not be set up (the extra CA file, usually).
    #[error("setting up TLS toward the ACME CA")]
    Tls(#[source] crate::tls::TlsSetupError),
    /// rustls refused a server configuration (a bug, not a user error).
    #[error("setting up TLS for visitors")]
    ServerTls(#[source] rustls::Error),
    /// The CA has terms of service, and the user has not said they agree to them.
    #[error(
        "the ACME CA's terms of service are at {terms}: read them, then pass --acme-agree-tos"
    )]
    TermsNotAgreed {
        /// Where the terms are, as the CA's directory says.
        terms: String,
    },
    /// Without --acme-agree-tos, the directory had to be read to show its terms, and could not.
    #[error(
        "could not read the ACME directory {url} to show its terms of service \
         (pass --acme-agree-tos once you have read them)"
    )]
    Directory {
        /// The directory URL.
        url: String,
        /// What went wrong.
        #[source]
        source: instant_acme::Error,
    },
    /// The CA refuses this request for good (its policy forbids the name, a CAA record
    /// forbids the CA, the contact is refused...). The manager still tries again hourly, in
    /// case the cause is fixed.
    #[error("the ACME CA refuses to certify {hostname}: {detail} ({kind})")]
    Refused {
        /// The name asked for.
        hostname: String,
        /// The problem type, `urn:ietf:params:acme:error:...`.
        kind: String,
        /// The CA's explanation.
        detail: String,
    },
    /// A file or directory of the state could not be read or written.
    #[error("{action} {}", path.display())]
    State {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The stored certificate and key cannot be used.
    #[error("the stored certificate {} is unusable: {reason}", path.display())]
    StoredCertificate {
        /// The chain file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The client shut down before it had a certificate.
    #[error("the ACME client stopped before it had a certificate")]
    Stopped,
}

/// What [`Acme::ready`] reports when no certificate will come: a copy that every waiter gets.
#[derive(Debug, Clone)]
enum Fatal {
    Refused { kind: String, detail: String },
    Stopped,
}

/// The ACME client for one hostname: the certificate it serves, the challenges it answers, and
/// the task that keeps the certificate fresh. Share it as `Arc<Acme>`.
pub struct Acme {
    hostname: String,
    slot: Arc<tls::CertSlot>,
    visitor: Arc<ServerConfig>,
    /// Pending TLS-ALPN-01 answers, by name.
    challenges: Mutex<HashMap<String, Arc<ServerConfig>>>,
    /// Counts certificates installed.
    generation: watch::Sender<u64>,
    fatal: watch::Sender<Option<Fatal>>,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme")
            .field("hostname", &self.hostname)
            .field("generation", &*self.generation.borrow())
            .finish_non_exhaustive()
    }
}

impl Acme {
    /// Loads what the state directory holds (a stored certificate still valid is served at
    /// once) and spawns the manager, which obtains and renews the certificate until
    /// `shutdown`.
    ///
    /// Before each order's challenges are declared ready, `ready_to_validate` is asked every
    /// [`Timing::tunnel_poll`] until it says yes (the caller's every tunnel is bound, so the
    /// validator reaches this client whichever proxy it lands on), for at most
    /// [`Timing::tunnel_wait`].
    ///
    /// Contacts the CA only without `agree_tos`, to fail with the terms' URL
    /// ([`AcmeError::TermsNotAgreed`]); otherwise a CA that is down is retried in the background.
    pub async fn start(
        config: AcmeConfig,
        transport: Arc<dyn Transport>,
        ready_to_validate: Box<dyn Fn() -> bool + Send + Sync>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Acme>, AcmeError> {
        let hostname = shroud_mux::hostname::normalize(&config.hostname).map_err(|source| {
            AcmeError::BadHostname {
                hostname: config.hostname.clone(),
                source,
            }
        })?;
        if !config.directory.starts_with("https://") {
            return Err(AcmeError::BadDirectory {
                url: config.directory.clone(),
            });
        }
        let contact = contact(&config.email)?;
        let client_tls =
            crate::tls::https_client_config(config.extra_ca.as_deref()).map_err(AcmeError::Tls)?;
        let http = http::TransportHttp::new(transport, client_tls, config.timing.request_timeout);
        let store = store::Store::open(&config.state_dir, &hostname, &config.directory)?;

        let slot = Arc::new(tls::CertSlot::default());
        let acme = Arc::new(Acme {
            visitor: tls::visitor_config(slot.clone()).map_err(AcmeError::ServerTls)?,
            hostname: hostname.clone(),
            slot,
            challenges: Mutex::new(HashMap::new()),
            generation: watch::Sender::new(0),
            fatal: watch::Sender::new(None),
        });
        let span = tracing::info_span!("acme", host = %hostname);

        let current = span.in_scope(|| match store.read_certificate() {
            Ok(Some(issued)) if issued.not_after > SystemTime::now() => {
                tracing::info!(
                    valid_until = %httpdate::fmt_http_date(issued.not_after),
                    "serving the stored certificate"
                );
                acme.install(&issued);
                Some(issued)
            }
            Ok(Some(issued)) => {
                tracing::info!(
                    expired = %httpdate::fmt_http_date(issued.not_after),
                    "the stored certificate has expired; asking for a new one"
                );
                None
            }
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(%err, "ignoring the stored certificate; asking for a new one");
                None
            }
        });

        if !config.agree_tos {
            manager::check_terms(&http, &config.directory).await?;
        }

        let manager = manager::Manager::new(
            acme.clone(),
            config,
            hostname,
            contact,
            store,
            http,
            ready_to_validate,
            shutdown,
            current,
        );
        tokio::spawn(manager.run().instrument(span));
        Ok(acme)
    }

    /// The current certificate, if any.
    pub fn certificate(&self) -> Option<Arc<CertifiedKey>> {
        self.slot.get()
    }

    /// A receiver whose value (a count) changes whenever a new certificate is installed.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The TLS server configuration for visitors whose TLS the client terminates: the current
    /// certificate, picked per handshake; TLS 1.2 and 1.3; ALPN `http/1.1` only, as for
    /// `--tls-cert`. A handshake while there is no certificate yet fails with an alert.
    pub fn visitor_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        self.visitor.clone()
    }

    /// The TLS server configuration answering TLS-ALPN-01 for `sni`, while a challenge for
    /// that name is pending: the challenge certificate, ALPN `acme-tls/1` only. `None` when
    /// none is (a stray `acme-tls/1` connection should then be closed).
    pub fn challenge_config(&self, sni: &str) -> Option<Arc<ServerConfig>> {
        let name = sni.strip_suffix('.').unwrap_or(sni).to_ascii_lowercase();
        self.challenges.lock().ok()?.get(&name).cloned()
    }

    /// Resolves once a certificate is available, or with the error that means there never will
    /// be one: [`AcmeError::Refused`] (the CA refuses the name for good), or
    /// [`AcmeError::Stopped`] (shut down first).
    pub async fn ready(&self) -> Result<(), AcmeError> {
        let mut generation = self.generation.subscribe();
        let mut fatal = self.fatal.subscribe();
        loop {
            if self.slot.get().is_some() {
                return Ok(());
            }
            if let Some(fatal) = fatal.borrow_and_update().clone() {
                return Err(self.error(fatal));
            }
            tokio::select! {
                changed = generation.changed() => changed,
                changed = fatal.changed() => changed,
            }
            // Both senders live as long as `self`: an error cannot happen while borrowed.
            .map_err(|_| AcmeError::Stopped)?;
        }
    }

    /// The hostname certified.
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    fn error(&self, fatal: Fatal) -> AcmeError {
        match fatal {
            Fatal::Refused { kind, detail } => AcmeError::Refused {
                hostname: self.hostname.clone(),
                kind,
                detail,
            },
            Fatal::Stopped => AcmeError::Stopped,
        }
    }

    /// Serves `issued` to new handshakes from now on.
    fn install(&self, issued: &store::Issued) {
        self.slot.set(issued.key.clone());
        self.generation.send_modify(|count| *count += 1);
    }

    fn fail(&self, fatal: Fatal) {
        self.fatal.send_replace(Some(fatal));
    }

    fn set_challenge(&self, name: &str, config: Option<Arc<ServerConfig>>) {
        let mut challenges = match self.challenges.lock() {
            Ok(challenges) => challenges,
            Err(poisoned) => poisoned.into_inner(),
        };
        match config {
            Some(config) => challenges.insert(name.to_owned(), config),
            None => challenges.remove(name),
        };
    }
}

/// The account's contact URIs: `mailto:EMAIL`, or none.
fn contact(email: &str) -> Result<Vec<String>, AcmeError> {
    let address = email.strip_prefix("mailto:").unwrap_or(email).trim();
    if address.is_empty() {
        return Ok(Vec::new());
    }
    let valid = address
        .split_once('@')
        .is_some_and(|(user, domain)| !user.is_empty() && domain.contains('.'))
        && !address.contains(|c: char| c.is_whitespace() || c == ',' || c == '<' || c == '>');
    if !valid {
        return Err(AcmeError::BadEmail {
            email: email.to_owned(),
        });
    }
    Ok(vec![format!("mailto:{address}")])
}
