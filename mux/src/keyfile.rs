//! Key files: one ed25519 key, stored as PKCS#8 PEM with mode 0600.
//!
//! Clients keep their identity this way (a proxy's authorized file names the public half, and
//! `shroud key` prints it), and the discovery service its signing key. The file is made
//! on first use and refused afterwards if anyone but its owner could read it, the way `ssh`
//! treats private keys. Errors name the file and the problem, never the key.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::auth::SecretKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
pub use ed25519_dalek::pkcs8::spki::der::zeroize::Zeroizing;
use ed25519_dalek::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};

/// A PKCS#8 PEM ed25519 key is about 120 bytes; anything far larger is not a key file.
const MAX_KEY_FILE_LEN: u64 = 16 * 1024;

/// Why the identity key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No home directory was found to hold the default key file.
    #[error(
        "could not find a home directory for the default key location; give the key file's path"
    )]
    NoHomeDirectory,
    /// The directory meant to hold the key file could not be created.
    #[error("could not create the directory {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The operating system's random source failed while making a new key.
    #[error("could not get randomness from the operating system to make a new key")]
    Random {
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The new key could not be encoded as PKCS#8 PEM.
    #[error("could not encode the new key as PKCS#8")]
    Encode {
        /// What went wrong.
        #[source]
        source: ed25519_dalek::pkcs8::Error,
    },
    /// The key file could not be created or written.
    #[error("could not write the key file {}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The key file could not be opened or read.
    #[error("could not read the key file {}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// The key file grants some permission to its group or to other users.
    #[error(
        "the key file {path} has mode {mode:04o}, so other users may read it; \
         run `chmod 600 {path}`",
        path = path.display()
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file's contents are not a PKCS#8 PEM ed25519 private key.
    #[error("the key file {} is not a PKCS#8 PEM ed25519 private key", path.display())]
    Parse {
        /// The key file.
        path: PathBuf,
        /// What the decoder said; it describes the structure, never the contents.
        #[source]
        source: Option<ed25519_dalek::pkcs8::Error>,
    },
}

/// Loads the key at `path`, or makes a new one there if there is no file.
///
/// Returns the key and whether it was just created. Missing parent directories are created with
/// mode 0700 and the file with mode 0600. If another process creates the file at the same time,
/// this one loads what that process wrote.
pub fn load_or_create(path: &Path) -> Result<(SecretKey, bool), KeyError> {
    if path.symlink_metadata().is_ok() {
        return load(path).map(|key| (key, false));
    }
    match create(path) {
        Ok(key) => Ok((key, true)),
        Err(KeyError::Write { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            load(path).map(|key| (key, false))
        }
        Err(err) => Err(err),
    }
}

/// Why a private file could not be read; callers name the file in their own errors.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    /// The file could not be opened or read.
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The file grants some permission (these bits) to its group or to other users.
    #[error("mode {0:04o} lets other users read it")]
    Permissions(u32),
}

/// Reads at most `limit` bytes of the file at `path`, refusing a file that its group or other
/// users have any access to, the way `ssh` treats private keys. The bytes are wiped when
/// dropped.
pub fn read_private(path: &Path, limit: u64) -> Result<Zeroizing<Vec<u8>>, PrivateFileError> {
    let file = File::open(path).map_err(PrivateFileError::Io)?;
    // Check the file we opened, not the path again, so a swap in between changes nothing.
    let mode = file
        .metadata()
        .map_err(PrivateFileError::Io)?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Permissions(mode));
    }
    let mut contents = Zeroizing::new(Vec::new());
    file.take(limit)
        .read_to_end(&mut contents)
        .map_err(PrivateFileError::Io)?;
    Ok(contents)
}

/// Loads the key at `path`, refusing a file that its group or other users have any access to.
pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
    let contents = read_private(path, MAX_KEY_FILE_LEN + 1).map_err(|err| match err {
        PrivateFileError::Io(source) => KeyError::Read {
            path: path.to_owned(),
            source,
        },
        PrivateFileError::Permissions(mode) => KeyError::Permissions {
            path: path.to_owned(),
            mode,
        },
    })?;
    let parse_error = |source| KeyError::Parse {
        path: path.to_owned(),
        source,
    };
    if contents.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(parse_error(None));
    }
    let pem = std::str::from_utf8(&contents).map_err(|_| parse_error(None))?;
    let signing_key =
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem).map_err(|err| parse_error(Some(err)))?;
    let seed = Zeroizing::new(signing_key.to_bytes());
    Ok(SecretKey::from_seed(&seed))
}

/// Makes a new key and writes it to `path`, which must not exist yet.
fn create(path: &Path) -> Result<SecretKey, KeyError> {
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty());
    if let Some(parent) = parent {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|source| KeyError::CreateDir {
                path: parent.to_owned(),
                source,
            })?;
    }

    let key = SecretKey::generate().map_err(|err| KeyError::Random {
        // This build of getrandom's error is not a std error; keep the OS code where there is one.
        source: match err.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::other(err.to_string()),
        },
    })?;
    let seed = Zeroizing::new(key.to_seed());
    let pem = ed25519_dalek::SigningKey::from_bytes(&seed)
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|source| KeyError::Encode { source })?;

    let write_error = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(write_error)?;
    let written = file
        .write_all(pem.as_bytes())
        .and_then(|()| file.sync_all());
    if let Err(source) = written {
        // A half-written file would make every later start fail to parse it; better none.
        drop(file);
        if let Err(err) = std::fs::remove_file(path) {
            tracing::warn!(%err, path = %path.display(), "could not remove a partly written key file");
        }
        return Err(write_error(source));
    }
    if let Some(parent) = parent {
        // Make the new directory entry durable too. Some filesystems refuse to sync a
        // directory; the key itself is already on disk, so that is worth a note, not a failure.
        if let Err(err) = File::open(parent).and_then(|dir| dir.sync_all()) {
            tracing::debug!(%err, dir = %parent.display(), "could not sync the key's directory");
        }
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_a_private_file_then_loads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/state/client.key");

        let (created_key, created) = load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(mode_of(path.parent().unwrap()) & 0o077, 0);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{text}");

        let (loaded_key, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(loaded_key.public(), created_key.public());
        assert_eq!(load(&path).unwrap().public(), created_key.public());
    }

    #[test]
    fn loads_a_key_written_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        let seed = [7u8; 32];
        let pem = ed25519_dalek::SigningKey::from_bytes(&seed)
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap();
        fs::write(&path, pem.as_bytes()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            load(&path).unwrap().public(),
            SecretKey::from_seed(&seed).public()
        );
    }

    #[test]
    fn refuses_a_file_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.key");
        load_or_create(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();

        let err = load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::Permissions { mode: 0o644, .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains(&format!("chmod 600 {}", path.display())),
            "{err}"
        );
        // load_or_create must not paper over it by making a new key.
        assert!(matches!(
            load_or_create(&path),
            Err(KeyError::Permissions { .. })
        ));
    }

    #[test]
    fn refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in [
            ("text", &b"not a key\n"[..]),
            ("binary", &[0xff, 0xfe, 0x00][..]),
            (
                "wrong-label",
                &b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"[..],
            ),
            ("huge", &vec![b'A'; 100_000][..]),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, contents).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let err = load(&path).unwrap_err();
            assert!(matches!(err, KeyError::Parse { .. }), "{name}: {err:?}");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn missing_file_is_a_read_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.key");
        let err = load(&path).unwrap_err();
        assert!(matches!(err, KeyError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("absent.key"), "{err}");
    }
}
