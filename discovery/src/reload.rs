//! Live reload of a running discovery service: SIGHUP (or an edit `--watch` sees) re-reads its
//! HTTPS certificate (`--tls-cert`, `--tls-key`) and its fleet file (`--fleet`), and puts them
//! in place together, or neither: a file that does not load (a TOML error, an entry that is
//! not valid, a certificate that does not match its key) changes nothing and is logged with
//! its line or entry.
//!
//! The signing key is not reloaded. Every client pins its public half, so a new one would make
//! every client refuse every list until each is given the new key: changing it is a planned
//! migration, and a reload, which anyone may trigger by editing a file, must not do it by
//! accident. The fleet secret and the other settings need a restart too; [`Reloader::apply`]
//! logs the ones that changed.

use std::path::PathBuf;

use anyhow::Context as _;
use shroud_process::reload::{changed_settings, reread, Reload, Settings};
use shroud_process::tls::{fingerprint, load_certified_key};
use tracing::{error, info, warn};

use crate::cli::ServeArgs;
use crate::fleet::{FleetFile, StaticsChange};
use crate::server::ServiceHandle;

/// The settings a reload applies, as [`ServeArgs`] field names; every other changed setting
/// needs a restart.
pub const RELOADABLE: [&str; 3] = ["tls_cert", "tls_key", "fleet"];

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// How the fleet file's proxies changed.
    pub statics: StaticsChange,
    /// Whether the HTTPS certificate is another one now.
    pub certificate_replaced: bool,
    /// Changed settings that take effect only after a restart, as flags.
    pub needs_restart: Vec<String>,
}

/// Reloads a running service.
pub struct Reloader {
    settings: ServeArgs,
    service: ServiceHandle,
    /// The SHA-256 of the certificate in place, to tell whether a reload replaced it.
    leaf: Option<String>,
    /// The config file the settings came from, read anew at each reload.
    settings_file: Option<PathBuf>,
}

/// What a reload loaded, before anything is put in place.
struct Loaded {
    fleet: FleetFile,
    tls: std::sync::Arc<rustls::ServerConfig>,
    leaf: String,
}

impl Reloader {
    /// A reloader of the service `service` reaches into, started with `settings`.
    pub fn new(settings: ServeArgs, service: ServiceHandle) -> Self {
        let leaf = load_certified_key(&settings.tls_cert, &settings.tls_key)
            .ok()
            .map(|key| fingerprint(&key));
        Self {
            settings,
            service,
            leaf,
            settings_file: None,
        }
    }

    /// Reads the settings anew from `file` (`--config`) at each reload, when there is one.
    pub fn with_config_file(mut self, file: Option<PathBuf>) -> Self {
        self.settings_file = file;
        self
    }

    /// The files a reload reads.
    pub fn files(&self) -> Vec<PathBuf> {
        files(&self.settings)
    }

    /// Re-reads the files the running settings name: what SIGHUP does.
    pub fn reload(&mut self) -> anyhow::Result<Reloaded> {
        self.put_in_place(None)
    }

    /// Applies `settings`: loads the certificate and fleet file they name and, if both load,
    /// puts them in place and keeps `settings` as the running ones; otherwise changes nothing.
    /// Logs what changed (counts, never a key), the changed settings that need a restart, or
    /// why nothing did.
    pub fn apply(&mut self, settings: ServeArgs) -> anyhow::Result<Reloaded> {
        self.put_in_place(Some(settings))
    }

    fn put_in_place(&mut self, new: Option<ServeArgs>) -> anyhow::Result<Reloaded> {
        // Heartbeats are on or off as the service started: the secret is not reloaded.
        let heartbeats = self.settings.fleet_secret_file.is_some();
        let result = load(new.as_ref().unwrap_or(&self.settings), heartbeats).map(|loaded| {
            let needs_restart = new.as_ref().map_or_else(Vec::new, |new| {
                changed_settings(&self.settings, new, &RELOADABLE)
            });
            let certificate_replaced = self.leaf.as_deref() != Some(loaded.leaf.as_str());
            self.service.set_tls(loaded.tls);
            self.leaf = Some(loaded.leaf);
            Reloaded {
                statics: self.service.replace_statics(loaded.fleet),
                certificate_replaced,
                needs_restart,
            }
        });
        self.service.reload_counts().record(result.is_ok());
        match &result {
            Ok(reloaded) => {
                info!(
                    static_proxies = reloaded.statics.total,
                    added = reloaded.statics.added,
                    removed = reloaded.statics.removed,
                    changed = reloaded.statics.changed,
                    certificate = if reloaded.certificate_replaced {
                        "replaced"
                    } else {
                        "unchanged"
                    },
                    certificate_sha256 = self.leaf.as_deref().unwrap_or_default(),
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
        // Logged already; a failure keeps the service as it was.
        let config_file = self.settings_file.clone();
        match reread::<crate::cli::Cli>(config_file.as_deref(), self.service.reload_counts()) {
            Some(Settings::Anew(crate::cli::Cli {
                serve: Some(serve), ..
            })) => drop(self.apply(serve)),
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

/// The files `settings` have a reload read.
pub fn files(settings: &ServeArgs) -> Vec<PathBuf> {
    let mut files = vec![settings.tls_cert.clone(), settings.tls_key.clone()];
    files.extend(settings.fleet.iter().cloned());
    files
}

/// The certificate and fleet file `settings` name, loaded and checked; `heartbeats` says
/// whether proxies can announce themselves, without which the fleet file may not be empty.
fn load(settings: &ServeArgs, heartbeats: bool) -> anyhow::Result<Loaded> {
    let fleet = match &settings.fleet {
        Some(path) => {
            FleetFile::load(path).with_context(|| format!("--fleet {}", path.display()))?
        }
        None => FleetFile::default(),
    };
    if fleet.proxy.is_empty() && !heartbeats {
        anyhow::bail!(
            "the fleet file lists no proxy and heartbeats are off (no --fleet-secret-file): \
             there would be no proxies to list"
        );
    }
    let certified = load_certified_key(&settings.tls_cert, &settings.tls_key)
        .context("the HTTPS certificate (--tls-cert, --tls-key)")?;
    let leaf = fingerprint(&certified);
    let tls = crate::server::tls_config_for(certified)?;
    Ok(Loaded { fleet, tls, leaf })
}
