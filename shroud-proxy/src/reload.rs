//! Live reload: SIGHUP (or an edit `--watch` sees) re-reads the authorized file and the tunnel
//! certificate, and puts them in place without touching a tunnel or a visitor.
//!
//! [`Reloader::apply`] is the entry point: it takes the proxy's settings (those it runs with,
//! for SIGHUP; freshly parsed ones, say from a config file), loads every file they name, and
//! only when all of them load puts the new [`Authorization`] and certificate in place. A reload
//! that fails (an authorized file with a bad line, a certificate that cannot be read or does
//! not match its key) changes nothing and says why, with the file and the line.
//!
//! Once the authorization is in place, each bound tunnel checks its names against it at once
//! and unbinds, telling its client why, the names it no longer grants ([`crate::tunnel`]); new
//! binds are judged by it. New tunnel handshakes (and peer links) get the new certificate;
//! connections already open keep theirs. Settings a reload cannot apply (listeners, limits,
//! DNS authorization itself) are logged as needing a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use shroud_process::reload::{changed_settings, reread, Reload, Settings};
use shroud_process::tls::{fingerprint, load_certified_key};
use tracing::{error, info, warn};

use crate::cli::Cli;
use crate::shared::{Authorization, Shared};

/// The settings a reload applies, as [`Cli`] field names; every other changed setting needs
/// a restart.
pub const RELOADABLE: [&str; 4] = ["authorized", "tls_cert", "tls_key", "word_names"];

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Bindings (hostname or wildcard, and key) in the authorized file now.
    pub bindings: usize,
    /// Bindings the file has now and had not.
    pub added: usize,
    /// Bindings the file had and has not now.
    pub removed: usize,
    /// Whether the word-name domains changed.
    pub word_domains_changed: bool,
    /// Whether the tunnel certificate is another one now.
    pub certificate_replaced: bool,
    /// Changed settings that take effect only after a restart, as flags.
    pub needs_restart: Vec<String>,
}

/// Reloads a running proxy.
pub struct Reloader {
    settings: Cli,
    shared: Arc<Shared>,
    /// The SHA-256 of the tunnel certificate in place, to tell whether a reload replaced it.
    leaf: Option<String>,
}

/// What a reload loaded, before anything is put in place.
struct Loaded {
    authorization: Authorization,
    tls: Arc<rustls::ServerConfig>,
    leaf: String,
}

impl Reloader {
    /// A reloader of the proxy whose state is `shared`, started with `settings`.
    pub fn new(settings: Cli, shared: Arc<Shared>) -> Self {
        // The files the proxy has just loaded; if they cannot be read now, the first reload
        // that reads them counts as a replacement.
        let leaf = certificate_files(&settings)
            .and_then(|(cert, key)| load_certified_key(cert, key).ok())
            .map(|key| fingerprint(&key));
        Self {
            settings,
            shared,
            leaf,
        }
    }

    /// The files a reload reads.
    pub fn files(&self) -> Vec<PathBuf> {
        files(&self.settings)
    }

    /// Re-reads the files the running settings name: what SIGHUP does.
    pub fn reload(&mut self) -> anyhow::Result<Reloaded> {
        self.put_in_place(None)
    }

    /// Applies `settings`: loads the files they name and, if every one loads, puts the
    /// authorization and the certificate in place, and keeps `settings` as the running ones;
    /// otherwise changes nothing. Logs what changed (counts only, never a key), the changed
    /// settings that need a restart, or why nothing did.
    pub fn apply(&mut self, settings: Cli) -> anyhow::Result<Reloaded> {
        self.put_in_place(Some(settings))
    }

    fn put_in_place(&mut self, new: Option<Cli>) -> anyhow::Result<Reloaded> {
        let loaded = load(new.as_ref().unwrap_or(&self.settings));
        let result = loaded.map(|loaded| {
            let needs_restart = new.as_ref().map_or_else(Vec::new, |new| {
                changed_settings(&self.settings, new, &RELOADABLE)
            });
            self.swap(loaded, needs_restart)
        });
        self.shared.reloads.record(result.is_ok());
        match &result {
            Ok(reloaded) => {
                info!(
                    bindings = reloaded.bindings,
                    added = reloaded.added,
                    removed = reloaded.removed,
                    word_domains_changed = reloaded.word_domains_changed,
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

    /// Puts `loaded` in place and says what changed.
    fn swap(&mut self, loaded: Loaded, needs_restart: Vec<String>) -> Reloaded {
        let old = self.shared.authorization();
        let (added, removed) = loaded.authorization.policy.changes_from(&old.policy);
        let reloaded = Reloaded {
            bindings: loaded.authorization.policy.len(),
            added,
            removed,
            word_domains_changed: loaded.authorization.word_domains != old.word_domains,
            certificate_replaced: self.leaf.as_deref() != Some(loaded.leaf.as_str()),
            needs_restart,
        };
        // The certificate first: a client the new policy admits may connect at once.
        self.shared.set_tunnel_tls(loaded.tls);
        self.leaf = Some(loaded.leaf);
        self.shared.set_authorization(loaded.authorization);
        reloaded
    }
}

impl Reload for Reloader {
    fn reload(&mut self) {
        // Logged already; a failure keeps the proxy as it was.
        let config_file = self.settings.config.config.clone();
        match reread::<Cli>(config_file.as_deref(), &self.shared.reloads) {
            Some(Settings::Running) => drop(Reloader::reload(self)),
            Some(Settings::Anew(settings)) => drop(self.apply(settings)),
            None => {}
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        Reloader::files(self)
    }
}

/// The files `settings` have a reload read.
pub fn files(settings: &Cli) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = settings.authorized.iter().cloned().collect();
    if let Some((cert, key)) = certificate_files(settings) {
        files.extend([cert.to_owned(), key.to_owned()]);
    }
    files.extend(settings.config.config.clone());
    files
}

/// The tunnel certificate's and key's files; clap requires both whenever the proxy runs.
fn certificate_files(settings: &Cli) -> Option<(&Path, &Path)> {
    Some((settings.tls_cert.as_deref()?, settings.tls_key.as_deref()?))
}

/// Everything a reload puts in place, loaded from the files `settings` name.
fn load(settings: &Cli) -> anyhow::Result<Loaded> {
    let authorization = settings.authorization()?;
    let (cert, key) = certificate_files(settings).context("give --tls-cert and --tls-key")?;
    let certified =
        load_certified_key(cert, key).context("the tunnel certificate (--tls-cert, --tls-key)")?;
    let leaf = fingerprint(&certified);
    let tls = crate::server::tunnel_tls_for(certified)?;
    Ok(Loaded {
        authorization,
        tls,
        leaf,
    })
}
