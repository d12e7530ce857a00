//! Arti's configuration: the real Tor network by default, or another one from a file in Arti's
//! own TOML form (`--tor-network`), with storage under the caller's state directory.
//!
//! The file may hold `[tor_network]` (authorities, fallback caches), `[path_rules]`,
//! `[address_filter]`, and `[override_net_params]`: a private network built with
//! `TestingTorNetwork` computes onion-service time periods from its voting interval, so Arti
//! there needs `hsdir_interval` set to match (24 voting intervals, in minutes), or no onion
//! service descriptor is ever found.
//!
//! Vanguards ([`Vanguards`], `--vanguards`) are set here too, after the file, so the flag
//! always decides. They cover every onion-service circuit this Tor builds (to an onion
//! service, and those of a service it hosts), never a circuit that leaves through an exit.

use std::path::Path;

use arti_client::config::{CfgPath, TorClientConfigBuilder};
use arti_client::TorClientConfig;
use tor_config::ExplicitOrAuto;
use tor_guardmgr::VanguardMode;

use crate::TorError;

/// Which vanguards Arti uses on onion-service circuits: fixed relays in the second (and, in
/// full mode, third) position, so that an adversary who makes a service build many circuits
/// (or a client reach one often) sees the same few relays next to its guard rather than a
/// fresh random middle each time, and cannot walk its own middle relays up to the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Vanguards {
    /// Vanguards-lite, Tor's default for clients: a set of 4 second-hop relays, each kept
    /// for 1 to 12 days. Arti does not persist it: a restart picks a new set.
    Lite,
    /// Full vanguards, Tor's advice for long-lived onion services: 4 second-hop relays kept 1
    /// to 12 days and 8 third-hop relays kept 1 to 48 hours, persisted in the state
    /// directory (Arti's `state/vanguards.json`) across restarts.
    #[default]
    Full,
}

impl Vanguards {
    /// Arti's name for this mode.
    fn mode(self) -> VanguardMode {
        match self {
            Vanguards::Lite => VanguardMode::Lite,
            Vanguards::Full => VanguardMode::Full,
        }
    }

    /// The mode `config` carries, as Arti will use it; `None` if Arti's is neither of ours
    /// (vanguards disabled, as a build without Arti's `vanguards` feature has them).
    pub fn of(config: &TorClientConfig) -> Option<Vanguards> {
        let vanguards: &tor_guardmgr::VanguardConfig = config.as_ref();
        match vanguards.mode() {
            VanguardMode::Lite => Some(Vanguards::Lite),
            VanguardMode::Full => Some(Vanguards::Full),
            _ => None,
        }
    }
}

impl std::fmt::Display for Vanguards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Vanguards::Lite => "lite",
            Vanguards::Full => "full",
        })
    }
}

/// Builds Arti's configuration: the network file's settings if given, storage under
/// `state_dir` (`state_dir/cache` and `state_dir/state`; Arti keeps onion service keys in
/// `state_dir/state/keystore`, its guards in `state_dir/state/state/guards.json` and full
/// vanguards in `state_dir/state/state/vanguards.json`), and `vanguards`.
pub fn arti_config(
    network_file: Option<&Path>,
    state_dir: &Path,
    vanguards: Vanguards,
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
        .vanguards()
        .mode(ExplicitOrAuto::Explicit(vanguards.mode()));
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
        let config = arti_config(Some(&file), &dir.path().join("tor"), Vanguards::Full);
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn a_file_that_is_not_arti_config_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("net.toml");
        std::fs::write(&file, "[tor_network]\nno_such_key = [").unwrap();
        let err = arti_config(Some(&file), dir.path(), Vanguards::Full).unwrap_err();
        assert!(matches!(err, TorError::ParseNetwork { .. }), "{err}");
        assert!(err.to_string().contains("net.toml"), "{err}");
        let err = arti_config(
            Some(&dir.path().join("missing.toml")),
            dir.path(),
            Vanguards::Full,
        )
        .unwrap_err();
        assert!(matches!(err, TorError::ReadNetwork { .. }), "{err}");
    }

    #[test]
    fn the_config_as_built_carries_the_chosen_vanguards() {
        let dir = tempfile::tempdir().unwrap();
        for chosen in [Vanguards::Lite, Vanguards::Full] {
            let config = arti_config(None, dir.path(), chosen).unwrap();
            assert_eq!(Vanguards::of(&config), Some(chosen));
        }
        assert_eq!(Vanguards::default(), Vanguards::Full);
    }

    #[test]
    fn the_flag_beats_a_vanguards_section_in_the_network_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("net.toml");
        std::fs::write(&file, "[vanguards]\nmode = \"lite\"\n").unwrap();
        let config = arti_config(Some(&file), dir.path(), Vanguards::Full).unwrap();
        assert_eq!(Vanguards::of(&config), Some(Vanguards::Full));
        std::fs::write(&file, "[vanguards]\nmode = \"disabled\"\n").unwrap();
        let config = arti_config(Some(&file), dir.path(), Vanguards::Lite).unwrap();
        assert_eq!(Vanguards::of(&config), Some(Vanguards::Lite));
    }
}
