//! A state directory that holds keys: only its owner may enter it.
//!
//! Arti checks its own storage too (fs-mistrust: no directory on the path writable by others,
//! key files written mode 0600 in directories it makes 0700), but it accepts a state
//! directory that others can *read*, and an onion service's identity key is the service: a copy
//! is the address. So shroud makes the directory 0700 itself, refuses one that group or others
//! may enter, and [`check_tree`] verifies what Arti wrote.

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::Path;

use crate::TorError;

/// Permission bits group and others must not have on anything under a private directory.
const OTHERS: u32 = 0o077;

/// Creates `dir` if it is missing (its parents as needed, the directory itself mode 0700), and
/// refuses it if group or others may access it.
pub fn ensure(dir: &Path) -> Result<(), TorError> {
    let err = |reason: String| TorError::StateDir {
        path: dir.to_owned(),
        reason,
    };
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(err("not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent)
                    .map_err(|e| err(format!("creating its parent directories: {e}")))?;
            }
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .or_else(|e| match e.kind() {
                    // Made by someone else meanwhile: checked below like any other.
                    std::io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(e),
                })
                .map_err(|e| err(format!("creating it: {e}")))?;
        }
        Err(e) => return Err(err(format!("cannot read it: {e}"))),
    }
    let mode = fs::metadata(dir)
        .map_err(|e| err(format!("cannot read it: {e}")))?
        .permissions()
        .mode();
    if mode & OTHERS != 0 {
        return Err(err(format!(
            "it holds private keys but has mode {:o}, which lets others in; run `chmod 700 {}`",
            mode & 0o777,
            dir.display()
        )));
    }
    Ok(())
}

/// Checks that nothing under `dir` (itself included) lets group or others in; returns the
/// first path that does. Symbolic links are not followed; files that vanish while it looks
/// (Arti replaces files through temporary ones) are skipped.
pub fn check_tree(dir: &Path) -> Result<(), TorError> {
    check_path(dir, true)
}

fn check_path(dir: &Path, root: bool) -> Result<(), TorError> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if !root && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(TorError::StateDir {
                path: dir.to_owned(),
                reason: format!("cannot read it: {e}"),
            })
        }
    };
    let mode = meta.permissions().mode();
    if !meta.file_type().is_symlink() && mode & OTHERS != 0 {
        return Err(TorError::StateDir {
            path: dir.to_owned(),
            reason: format!(
                "mode {:o} lets others read or enter it; it must be private to its owner",
                mode & 0o777
            ),
        });
    }
    if meta.is_dir() {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if !root && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(TorError::StateDir {
                    path: dir.to_owned(),
                    reason: format!("cannot list it: {e}"),
                })
            }
        };
        for entry in entries.flatten() {
            check_path(&entry.path(), false)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_a_missing_directory_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/state");
        ensure(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // Again: already there, still fine.
        ensure(&dir).unwrap();
        check_tree(&dir).unwrap();
    }

    #[test]
    fn refuses_a_directory_others_may_enter() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = ensure(&dir).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
        let file = root.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(ensure(&file)
            .unwrap_err()
            .to_string()
            .contains("not a directory"));
    }

    #[test]
    fn finds_a_readable_key_file_deep_inside() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        ensure(&dir).unwrap();
        let keys = dir.join("keystore/hss/svc");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&keys)
            .unwrap();
        let key = keys.join("ks_hs_id.ed25519_expanded_private");
        fs::write(&key, "secret").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        check_tree(&dir).unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_tree(&dir).unwrap_err();
        assert!(
            matches!(&err, TorError::StateDir { path, .. } if path == &key),
            "{err}"
        );
    }
}
