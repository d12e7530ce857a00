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
use shroud_process::reload::{changed_settings, reread, Reload, ReloadCounts, Settings};
use shroud_process::tls::{fingerprint, CertSlot};
use tracing::{error, info, warn};

use crate::cli::RunArgs;
use crate::client::RetryRefused;
use crate::metrics::ClientMetrics;

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
    /// Where the new certificate's expiry goes, when the client serves metrics.
    metrics: Option<Arc<ClientMetrics>>,
    /// The config file the settings came from, read anew at each reload.
    settings_file: Option<PathBuf>,
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
            metrics: None,
            settings_file: None,
        }
    }

    /// Reads the settings anew from `file` (`--config`) at each reload, when there is one.
    pub fn with_config_file(mut self, file: Option<PathBuf>) -> Self {
        self.settings_file = file;
        self
    }

    /// Reports each replaced certificate's expiry to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ClientMetrics>) -> Self {
        self.counts = Arc::new(metrics.reloads.clone());
        self.metrics = Some(metrics);
        self
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
                if reloaded.certificate_replaced {
                    self.report_expiry(new.as_ref().unwrap_or(&self.settings));
                }
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

impl Reloader {
    /// Gives the metrics the expiry of the certificate `settings` name.
    fn report_expiry(&self, settings: &RunArgs) {
        let expiry = settings
            .tls_cert
            .as_deref()
            .and_then(crate::tls::leaf_expiry);
        if let (Some(metrics), Some(expiry)) = (&self.metrics, expiry) {
            metrics.set_certificate_expiry(expiry);
        }
    }
}

impl Reload for Reloader {
    fn reload(&mut self) {
        // Logged already; a failure keeps the certificate in place.
        let config_file = self.settings_file.clone();
        match reread::<crate::cli::Cli>(config_file.as_deref(), &self.counts) {
            Some(Settings::Anew(crate::cli::Cli { run: Some(run), .. })) => drop(self.apply(run)),
            Some(_) => drop(Reloader::reload(self)),
            None => {}
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = Reloader::files(self);
        files.extend(self.settings_file.clone());
        files
    }
}

/// The files `settings` have a reload read: the visitors' certificate and key, when given.
pub fn files(settings: &RunArgs) -> Vec<PathBuf> {
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => vec![cert.clone(), key.clone()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use clap::Parser as _;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls_pki_types::ServerName;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    /// A CA, written to `ca.pem` in `dir`, that issues certificates for `example.test`.
    struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
        pem: PathBuf,
    }

    impl Ca {
        fn new(dir: &Path, name: &str) -> Self {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let issuer =
                CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
            let pem = dir.join(format!("{name}.pem"));
            std::fs::write(&pem, issuer.pem()).unwrap();
            Self { issuer, pem }
        }

        /// Writes a fresh certificate for `example.test` and its key over `cert` and `key`.
        fn issue(&self, cert: &Path, key: &Path) {
            let leaf_key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec!["example.test".to_owned()])
                .unwrap()
                .signed_by(&leaf_key, &self.issuer)
                .unwrap();
            std::fs::write(cert, leaf.pem()).unwrap();
            std::fs::write(key, leaf_key.serialize_pem()).unwrap();
        }
    }

    /// Whether a visitor trusting only `ca` completes a handshake with `server`.
    async fn visitor_trusts(server: Arc<rustls::ServerConfig>, ca: &Path) -> bool {
        let client = crate::tls::https_client_config(Some(ca)).unwrap();
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let server = tokio::spawn(TlsAcceptor::from(server).accept(server_io));
        let name = ServerName::try_from("example.test").unwrap();
        let trusted = TlsConnector::from(client)
            .connect(name, client_io)
            .await
            .is_ok();
        drop(server.await.unwrap());
        trusted
    }

    fn settings(cert: &Path, key: &Path, extra: &[&str]) -> RunArgs {
        let mut args = vec![
            "shroud".to_owned(),
            "example.test".into(),
            "127.0.0.1:8080".into(),
            "--proxy".into(),
            "proxy.test".into(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ];
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        crate::cli::Cli::try_parse_from(args).unwrap().run.unwrap()
    }

    #[tokio::test]
    async fn a_reload_serves_the_new_certificate_and_a_bad_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (old_ca, new_ca) = (Ca::new(dir.path(), "old"), Ca::new(dir.path(), "new"));
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        old_ca.issue(&cert, &key);
        let (server, slot) = crate::tls::origin_tls(&cert, &key).unwrap();
        let retry = RetryRefused::new();
        let mut asked = retry.subscribe();
        let mut reloader = Reloader::new(settings(&cert, &key, &[]), Some(slot), retry);
        assert_eq!(reloader.files(), [cert.clone(), key.clone()]);
        assert!(visitor_trusts(server.clone(), &old_ca.pem).await);

        // Nothing changed on disk: nothing is replaced, and refused proxies are asked again.
        let reloaded = reloader.reload().unwrap();
        assert!(!reloaded.certificate_replaced);
        assert!(asked.has_changed().unwrap());
        asked.borrow_and_update();

        new_ca.issue(&cert, &key);
        assert!(reloader.reload().unwrap().certificate_replaced);
        assert!(visitor_trusts(server.clone(), &new_ca.pem).await);
        assert!(!visitor_trusts(server.clone(), &old_ca.pem).await);

        // A key that is not the certificate's: refused, the certificate in place stays.
        let (other_cert, other_key) = (dir.path().join("o.pem"), dir.path().join("o.key"));
        new_ca.issue(&other_cert, &other_key);
        std::fs::copy(&other_key, &key).unwrap();
        let err = reloader.reload().unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot be used together"),
            "{err:#}"
        );
        assert!(visitor_trusts(server.clone(), &new_ca.pem).await);
        // An unreadable key: refused, named.
        std::fs::remove_file(&key).unwrap();
        let err = reloader.reload().unwrap_err();
        assert!(format!("{err:#}").contains("key.pem"), "{err:#}");
        assert!(visitor_trusts(server, &new_ca.pem).await);
        // Refused proxies are asked again all the same.
        assert!(asked.has_changed().unwrap());

        let counts = reloader.counts();
        assert_eq!((counts.succeeded(), counts.failed()), (2, 2));
    }

    #[tokio::test]
    async fn applied_settings_say_which_changes_need_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "ca");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        ca.issue(&cert, &key);
        let (_, slot) = crate::tls::origin_tls(&cert, &key).unwrap();
        let mut reloader =
            Reloader::new(settings(&cert, &key, &[]), Some(slot), RetryRefused::new());
        let (new_cert, new_key) = (dir.path().join("new.pem"), dir.path().join("new.key"));
        ca.issue(&new_cert, &new_key);
        let changed = settings(&new_cert, &new_key, &["--keepalive-secs", "5", "-v"]);
        let reloaded = reloader.apply(changed).unwrap();
        assert!(reloaded.certificate_replaced);
        assert_eq!(reloaded.needs_restart, ["--keepalive-secs"]);
        // The new paths are the ones read from now on.
        assert_eq!(reloader.files(), [new_cert, new_key]);

        // Without a certificate from files, there is nothing to re-read.
        let mut passthrough = Reloader::new(settings(&cert, &key, &[]), None, RetryRefused::new());
        assert!(passthrough.files().is_empty());
        assert!(!passthrough.reload().unwrap().certificate_replaced);
    }
}
