//! What the ACME client keeps on disk, and the certificate it serves.
//!
//! Under the state directory: `acme/account-<hash of the directory URL>.json` (the account's
//! credentials, its private key included) and `acme/<hostname>/fullchain.pem` with
//! `privkey.pem`. Directories are made 0700 and files 0600, every file written atomically
//! (a temporary file in the same directory, synced, then renamed over the old one), so a crash
//! leaves the old file or the new one, never half of either.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

use super::AcmeError;

/// A certificate chain with its key, as served, and when it is valid.
#[derive(Clone)]
pub(crate) struct Issued {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// The chain as PEM, leaf first, as the CA sent it.
    pub(crate) chain_pem: String,
    /// The private key as PEM. Never logged, and [`Issued`] has no `Debug`.
    pub(crate) key_pem: String,
}

impl Issued {
    /// Parses a PEM chain (leaf first) and its PEM private key, checking that they belong
    /// together and reading the leaf's validity.
    pub(crate) fn from_pem(chain_pem: String, key_pem: String) -> Result<Self, String> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| format!("the certificate chain is not PEM: {err}"))?;
        let leaf = chain
            .first()
            .ok_or_else(|| "the certificate chain is empty".to_owned())?;
        let (not_before, not_after) = validity(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|err| format!("the private key is not PEM: {err}"))?;
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = CertifiedKey::from_der(chain, key, &provider)
            .map_err(|err| format!("the certificate and key are unusable together: {err}"))?;
        Ok(Self {
            key: Arc::new(key),
            not_before,
            not_after,
            chain_pem,
            key_pem,
        })
    }

    /// The leaf certificate.
    pub(crate) fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.key.cert.first()
    }
}

/// A certificate's notBefore and notAfter.
fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|err| format!("the certificate cannot be parsed: {err}"))?;
    let validity = parsed.validity();
    Ok((
        system_time(validity.not_before.timestamp()),
        system_time(validity.not_after.timestamp()),
    ))
}

/// Seconds since the epoch as a [`SystemTime`] (times before it become the epoch).
pub(crate) fn system_time(unix: i64) -> SystemTime {
    u64::try_from(unix).map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs))
}

/// Where the ACME client's files live.
#[derive(Debug, Clone)]
pub(crate) struct Store {
    /// `STATE/acme/HOSTNAME`.
    host_dir: PathBuf,
    /// `STATE/acme/account-HASH.json`.
    account: PathBuf,
}

impl Store {
    /// The files for `hostname` (already normalised, so a safe path component) and the CA at
    /// `directory`; makes the directories, 0700.
    pub(crate) fn open(
        state_dir: &Path,
        hostname: &str,
        directory: &str,
    ) -> Result<Self, AcmeError> {
        let root = state_dir.join("acme");
        let host_dir = root.join(hostname);
        private_dir(&root)?;
        private_dir(&host_dir)?;
        let digest = Sha256::digest(directory.as_bytes());
        let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            account: root.join(format!("account-{hash}.json")),
            host_dir,
        })
    }

    /// The account credentials' file.
    pub(crate) fn account_path(&self) -> &Path {
        &self.account
    }

    /// The stored account credentials (JSON), if any.
    pub(crate) fn read_account(&self) -> Result<Option<Vec<u8>>, AcmeError> {
        read_optional(&self.account)
    }

    /// Stores the account credentials (JSON), 0600.
    pub(crate) fn write_account(&self, json: &[u8]) -> Result<(), AcmeError> {
        write_atomic(&self.account, json)
    }

    /// Moves unusable account credentials aside (`.json.stale`), so the next attempt creates a
    /// new account and the old key is kept for a human to look at.
    pub(crate) fn discard_account(&self) -> Result<(), AcmeError> {
        let stale = self.account.with_extension("json.stale");
        fs::rename(&self.account, &stale)
            .or_else(ignore_missing)
            .map_err(|source| AcmeError::State {
                action: "moving aside",
                path: self.account.clone(),
                source,
            })
    }

    /// The chain file.
    pub(crate) fn chain_path(&self) -> PathBuf {
        self.host_dir.join("fullchain.pem")
    }

    /// The key file.
    pub(crate) fn key_path(&self) -> PathBuf {
        self.host_dir.join("privkey.pem")
    }

    /// The stored certificate and key, if both files are there. A pair that does not parse
    /// or match is an error, which the caller may treat as no certificate.
    pub(crate) fn read_certificate(&self) -> Result<Option<Issued>, AcmeError> {
        let (chain_path, key_path) = (self.chain_path(), self.key_path());
        let (Some(chain), Some(key)) = (read_optional(&chain_path)?, read_optional(&key_path)?)
        else {
            return Ok(None);
        };
        let text = |bytes: Vec<u8>, path: &Path| {
            String::from_utf8(bytes).map_err(|_| AcmeError::StoredCertificate {
                path: path.to_owned(),
                reason: "not UTF-8 text".to_owned(),
            })
        };
        let (chain, key) = (text(chain, &chain_path)?, text(key, &key_path)?);
        Issued::from_pem(chain, key)
            .map(Some)
            .map_err(|reason| AcmeError::StoredCertificate {
                path: chain_path,
                reason,
            })
    }

    /// Stores a certificate and key, the key first: a crash in between leaves a pair that
    /// does not match, which loading refuses, rather than a new key paired with an old chain
    /// that would be served.
    pub(crate) fn write_certificate(&self, issued: &Issued) -> Result<(), AcmeError> {
        write_pair(&self.host_dir, issued)
    }
}

/// Writes `privkey.pem` then `fullchain.pem` into `dir`, each atomically, 0600.
pub(crate) fn write_pair(dir: &Path, issued: &Issued) -> Result<(), AcmeError> {
    write_atomic(&dir.join("privkey.pem"), issued.key_pem.as_bytes())?;
    write_atomic(&dir.join("fullchain.pem"), issued.chain_pem.as_bytes())
}

/// Creates `dir` (and its parents) if missing, and makes it 0700.
pub(crate) fn private_dir(dir: &Path) -> Result<(), AcmeError> {
    let error = |action, source| AcmeError::State {
        action,
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| error("creating", source))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|source| error("setting the mode of", source))
}

/// A file's content, or `None` if it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, AcmeError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AcmeError::State {
            action: "reading",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Replaces `path` with `data`: a 0600 temporary file beside it, synced, then renamed.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AcmeError> {
    let error = |action, source| AcmeError::State {
        action,
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        fastrand::u64(..)
    ));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(data)?;
        file.sync_all()
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&temp);
        return Err(error("writing", source));
    }
    if let Err(source) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(error("replacing", source));
    }
    // The rename is durable only once the directory is synced; a failure here is not worth
    // failing the write for.
    if let Ok(dir) = fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn ignore_missing(err: io::Error) -> io::Result<()> {
    if err.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn files_are_private_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "example.test", "https://ca.test/dir").unwrap();
        assert_eq!(mode(&dir.path().join("acme")), 0o700);
        assert_eq!(mode(&dir.path().join("acme/example.test")), 0o700);
        let name = store.account_path().file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("account-") && name.ends_with(".json"),
            "{name}"
        );

        assert!(store.read_account().unwrap().is_none());
        store.write_account(b"{\"a\":1}").unwrap();
        store.write_account(b"{\"a\":2}").unwrap();
        assert_eq!(store.read_account().unwrap().unwrap(), b"{\"a\":2}");
        assert_eq!(mode(store.account_path()), 0o600);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path().join("acme"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        store.discard_account().unwrap();
        assert!(store.read_account().unwrap().is_none());
        // Discarding what is not there is no error.
        store.discard_account().unwrap();
    }

    #[test]
    fn another_directory_has_another_account_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path(), "example.test", "https://a.test/dir").unwrap();
        let b = Store::open(dir.path(), "example.test", "https://b.test/dir").unwrap();
        assert_ne!(a.account_path(), b.account_path());
    }

    #[test]
    fn a_certificate_round_trips_and_a_mismatched_pair_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), "example.test", "https://ca.test/dir").unwrap();
        assert!(store.read_certificate().unwrap().is_none());

        let one = rcgen::generate_simple_self_signed(vec!["example.test".into()]).unwrap();
        let issued = Issued::from_pem(one.cert.pem(), one.signing_key.serialize_pem()).unwrap();
        assert!(issued.not_before < issued.not_after);
        store.write_certificate(&issued).unwrap();
        assert_eq!(mode(&store.key_path()), 0o600);
        assert_eq!(mode(&store.chain_path()), 0o600);
        let loaded = store.read_certificate().unwrap().unwrap();
        assert_eq!(loaded.leaf(), issued.leaf());

        let other = rcgen::generate_simple_self_signed(vec!["example.test".into()]).unwrap();
        write_atomic(
            &store.key_path(),
            other.signing_key.serialize_pem().as_bytes(),
        )
        .unwrap();
        let err = match store.read_certificate() {
            Err(err) => err,
            Ok(_) => panic!("a key of another certificate was accepted"),
        };
        assert!(matches!(err, AcmeError::StoredCertificate { .. }), "{err}");
    }
}
