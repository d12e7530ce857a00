//! The fleet secret: the bearer token proxies present with their heartbeats.
//!
//! It lives in a file readable by its owner only (mode 0600, like key files), is compared in
//! constant time, and never reaches a log: its `Debug` prints a mask.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use shroud_mux::keyfile::{read_private, PrivateFileError};

/// Shortest secret accepted, in bytes: anything shorter could be guessed.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest secret accepted, in bytes.
pub const MAX_SECRET_LEN: usize = 1024;

/// The shared secret that authorises heartbeats.
#[derive(Clone, PartialEq, Eq)]
pub struct FleetSecret(String);

/// Why a fleet secret could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be opened or read.
    #[error("could not read the fleet secret file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The file grants some permission to its group or to other users.
    #[error(
        "the fleet secret file {path} has mode {mode:04o}, so other users may read it; \
         run `chmod 600 {path}`",
        path = path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The secret is too short, too long, or holds characters other than printable ASCII.
    #[error(
        "a fleet secret is {MIN_SECRET_LEN} to {MAX_SECRET_LEN} printable ASCII characters \
         without spaces (for example from `openssl rand -hex 32`)"
    )]
    Invalid,
}

impl FleetSecret {
    /// Wraps a secret, checking its length and characters.
    pub fn new(secret: String) -> Result<Self, SecretError> {
        let valid = (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&secret.len())
            && secret.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(secret))
        } else {
            Err(SecretError::Invalid)
        }
    }

    /// Reads a secret from a file only its owner may access. Surrounding whitespace (a final
    /// newline) is ignored.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let bytes = read_private(path, MAX_SECRET_LEN as u64 * 2).map_err(|err| match err {
            PrivateFileError::Io(source) => SecretError::Read {
                path: path.to_owned(),
                source,
            },
            PrivateFileError::Permissions(mode) => SecretError::Permissions {
                path: path.to_owned(),
                mode,
            },
        })?;
        let text = std::str::from_utf8(&bytes).map_err(|_| SecretError::Invalid)?;
        Self::new(text.trim().to_owned())
    }

    /// The secret itself, to put in an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is the secret, in time that depends only on the secret's length.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        let secret = self.0.as_bytes();
        let mut diff = u8::from(candidate.len() != secret.len());
        for (i, &byte) in secret.iter().enumerate() {
            let other = candidate.get(i).copied().unwrap_or(0);
            diff |= std::hint::black_box(byte ^ other);
        }
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetSecret(***)")
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn compares_whole_secrets_only() {
        let secret = FleetSecret::new("0123456789abcdef".into()).unwrap();
        assert!(secret.matches(b"0123456789abcdef"));
        assert!(!secret.matches(b"0123456789abcdeF"));
        assert!(!secret.matches(b"0123456789abcde"));
        assert!(!secret.matches(b"0123456789abcdef0"));
        assert!(!secret.matches(b""));
        assert_eq!(format!("{secret:?}"), "FleetSecret(***)");
    }

    #[test]
    fn refuses_weak_secrets() {
        assert!(matches!(
            FleetSecret::new("short".into()),
            Err(SecretError::Invalid)
        ));
        assert!(matches!(
            FleetSecret::new("has a space in the middle".into()),
            Err(SecretError::Invalid)
        ));
    }

    #[test]
    fn loads_a_private_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.secret");
        fs::write(&path, "0123456789abcdef0123\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = FleetSecret::load(&path).unwrap_err();
        assert!(
            matches!(err, SecretError::Permissions { mode: 0o640, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let secret = FleetSecret::load(&path).unwrap();
        assert_eq!(secret.expose(), "0123456789abcdef0123");

        let missing = FleetSecret::load(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(missing, SecretError::Read { .. }), "{missing:?}");
    }
}
