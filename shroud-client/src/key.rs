//! The client's identity file and default locations. Storage itself (PKCS#8 PEM, mode 0600,
//! refused when others can read it) is [`shroud_mux::keyfile`]'s.

use std::path::PathBuf;

pub use shroud_mux::keyfile::{load, load_or_create, KeyError};

/// Name of the key file inside the default directory.
pub const KEY_FILE_NAME: &str = "client.key";

/// Where the key lives when `--key` is not given: `client.key` in the user's state directory
/// (`~/.local/state/shroud` on Linux), or in the local data directory where there is no state
/// directory (macOS, Windows).
pub fn default_key_path() -> Result<PathBuf, KeyError> {
    Ok(default_state_dir()?.join(KEY_FILE_NAME))
}

/// The user's state directory for shroud (on Linux `~/.local/state/shroud`), where the key and
/// Tor's state live unless told otherwise.
pub fn default_state_dir() -> Result<PathBuf, KeyError> {
    let dirs = directories::ProjectDirs::from("", "", "shroud").ok_or(KeyError::NoHomeDirectory)?;
    Ok(dirs
        .state_dir()
        .unwrap_or_else(|| dirs.data_local_dir())
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_path_ends_in_the_key_file_name() {
        // The environment may have no home directory; only check the shape when it does.
        if let Ok(path) = default_key_path() {
            assert!(path.ends_with(KEY_FILE_NAME), "{}", path.display());
        }
    }
}
