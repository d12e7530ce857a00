//! Live reload of a running client: SIGHUP (or an edit `--watch` sees) re-reads the certificate
//! and key the client terminates visitors' TLS with (`--tls-cert`, `--tls-key`), and asks again
//! at once every proxy whose policy refused the hostname ([`RetryRefused`]).
//!
//! New visitors' handshakes get the new certificate; connected ones keep theirs. A certificate
//! that cannot be read, or does not match its key, changes nothing and is logged with the
//! file. A certificate from ACME renews itself and is not reloaded; with none (the origin
//! terminates TLS) there is nothing to re-read. [`Reloader::apply`] takes the client's settings
//! (freshly parsed ones, say from a config file) and logs the changed ones that need a restart.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use shroud_process::reload::{changed_settings, Reload, ReloadCounts};
use shroud_process::tls::{fingerprint, CertSlot};
use tracing::{error, info, warn};

use crate::cli::RunArgs;
use crate::client::RetryRefused;

/// The settings a reload applies when the client terminates visitors' TLS with files, as
/// [`RunArgs`] field names; every other changed setting needs a restart.
pub const RELOADABLE: [&str; 2] = ["tls_cert", "tls_key"];

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Whether visitors are served another certificate now.
    pub certificate_replaced: bool,
    /// Changed settings that take effect only after a restart, as flags.
    pub needs_restart: Vec<String>,
}

/// Reloads a running client.
pub struct Reloader {
    settings: RunArgs,
    /// The certificate visitors' TLS is terminated with, when it comes from files.
    certificate: Option<Arc<CertSlot>>,
    retry: RetryRefused,
    counts: Arc<ReloadCounts>,
}

impl Reloader {
    /// A reloader of the client started with `settings`, serving visitors the certificate in
    /// `certificate` (when it terminates their TLS with files), whose refused tunnels `retry`
    /// wakes.
    pub fn new(settings: RunArgs, certificate: Option<Arc<CertSlot>>, retry: RetryRefused) -> Self {
        Self {
            settings,
            certificate,
            retry,
            counts: Arc::default(),
        }
    }

    /// The files a reload reads.
    pub fn files(&self) -> Vec<PathBuf> {
        match self.certificate {
            Some(_) => files(&self.settings),
            None => Vec::new(),
        }
    }

    /// How many reloads took effect, and how many failed.
    pub fn counts(&self) -> Arc<ReloadCounts> {
        self.counts.clone()
    }

    /// Re-reads the files the running settings name: what SIGHUP does.
    pub fn reload(&mut self) -> anyhow::Result<Reloaded> {
        self.put_in_place(None)
    }

    /// Applies `settings`: re-reads the certificate they name and, if it loads, serves it to
    /// new visitors and keeps `settings` as the running ones; otherwise changes nothing. Either
    /// way, tunnels that wait after a policy refusal ask their proxy again now. Logs what
    /// changed, the changed settings that need a restart, or why nothing did.
    pub fn apply(&mut self, settings: RunArgs) -> anyhow::Result<Reloaded> {
        self.put_in_place(Some(settings))
    }

    fn put_in_place(&mut self, new: Option<RunArgs>) -> anyhow::Result<Reloaded> {
        let settings = new.as_ref().unwrap_or(&self.settings);
        let loaded = match (&self.certificate, &settings.tls_cert, &settings.tls_key) {
            (Some(_), Some(cert), Some(key)) => crate::tls::origin_certificate(cert, key)
                .map(Some)
                .context("the visitors' certificate (--tls-cert, --tls-key)"),
            _ => Ok(None),
        };
        // The proxy's operator may have authorized the hostname meanwhile: a reload is the
        // client's operator saying so.
        self.retry.now();
        let result = loaded.map(|certified| {
            let (certificate_replaced, reloadable) = match (&self.certificate, certified) {
                (Some(slot), Some(certified)) => (slot.replace(certified), &RELOADABLE[..]),
                (Some(_), None) => (false, &RELOADABLE[..]),
                (None, _) => (false, &[][..]),
            };
            let needs_restart = new.as_ref().map_or_else(Vec::new, |new| {
                changed_settings(&self.settings, new, reloadable)
            });
            Reloaded {
                certificate_replaced,
                needs_restart,
            }
        });
        self.counts.record(result.is_ok());
        match &result {
            Ok(reloaded) => {
                let certificate = match (&self.certificate, reloaded.certificate_replaced) {
                    (None, _) => "not from files",
                    (Some(_), true) => "replaced",
                    (Some(_), false) => "unchanged",
                };
                let sha256 = self
                    .certificate
                    .as_ref()
                    .map(|slot| fingerprint(&slot.current()));
                info!(
                    certificate,
                    certificate_sha256 = sha256.as_deref().unwrap_or_default(),
                    "reloaded"
                );
                if !reloaded.needs_restart.is_empty() {
                    warn!(
                        settings = %reloaded.needs_restart.join(" "),
                        "changed settings take effect only after a restart"
                    );
                }
                if let Some(new) = new {
                    self.settings = new;
                }
            }
            Err(err) => error!(err = %format!("{err:#}"), "reload failed; nothing changed"),
        }
        result
    }
}

impl Reload for Reloader {
    fn reload(&mut self) {
        // Logged already; a failure keeps the certificate in place.
        let _ = Reloader::reload(self);
    }

    fn files(&self) -> Vec<PathBuf> {
        Reloader::files(self)
    }
}

/// The files `settings` have a reload read: the visitors' certificate and key, when given.
pub fn files(settings: &RunArgs) -> Vec<PathBuf> {
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => vec![cert.clone(), key.clone()],
        _ => Vec::new(),
    }
}
