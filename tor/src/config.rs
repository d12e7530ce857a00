//! Arti's configuration: the real Tor network by default, or another one from a file in Arti's
//! own TOML form (`--tor-network`), with storage under the caller's state directory.
//!
//! The file may hold `[tor_network]` (authorities, fallback caches), `[path_rules]`,
//! `[address_filter]`, and `[override_net_params]`: a private network built with
//! `TestingTorNetwork` computes onion-service time periods from its voting interval, so Arti
//! there needs `hsdir_interval` set to match (24 voting intervals, in minutes), or no onion
//! service descriptor is ever found.

use std::path::Path;

use arti_client::config::{CfgPath, TorClientConfigBuilder};
use arti_client::TorClientConfig;

use crate::TorError;

/// Builds Arti's configuration: the network file's settings if given, storage under
/// `state_dir` (`state_dir/cache` and `state_dir/state`; Arti keeps onion service keys in
/// `state_dir/state/keystore`).
pub fn arti_config(
    network_file: Option<&Path>,
    state_dir: &Path,
) -> Result<TorClientConfig, TorError> {
    let mut builder = match network_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| TorError::ReadNetwork {
                path: path.to_owned(),
                source,
            })?;
            toml::from_str::<TorClientConfigBuilder>(&text).map_err(|err| {
                TorError::ParseNetwork {
                    path: path.to_owned(),
                    reason: err.to_string(),
                }
            })?
        }
        None => TorClientConfigBuilder::default(),
    };
    builder
        .storage()
        .cache_dir(CfgPath::new_literal(state_dir.join("cache")))
        .state_dir(CfgPath::new_literal(state_dir.join("state")));
    builder
        .build()
        .map_err(|err| TorError::Config(err.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_network_file_with_net_params_parses() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("net.toml");
        std::fs::write(
            &file,
            "[override_net_params]\nhsdir_interval = 8\n\n[address_filter]\nallow_local_addrs = true\n",
        )
        .unwrap();
        let config = arti_config(Some(&file), &dir.path().join("tor"));
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn a_file_that_is_not_arti_config_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("net.toml");
        std::fs::write(&file, "[tor_network]\nno_such_key = [").unwrap();
        let err = arti_config(Some(&file), dir.path()).unwrap_err();
        assert!(matches!(err, TorError::ParseNetwork { .. }), "{err}");
        assert!(err.to_string().contains("net.toml"), "{err}");
        let err = arti_config(Some(&dir.path().join("missing.toml")), dir.path()).unwrap_err();
        assert!(matches!(err, TorError::ReadNetwork { .. }), "{err}");
    }
}
