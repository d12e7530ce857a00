//! Embedded Tor (Arti) as shroud's binaries use it, written once for the client and the proxy.
//!
//! - [`config`]: Arti's configuration from a `--tor-network` file (a private network, for tests
//!   and labs) or the real Tor network's defaults, with storage under a state directory and
//!   the vanguards chosen with `--vanguards`.
//! - [`bootstrap`]: starts Arti and waits until it has bootstrapped, showing progress (a bar on
//!   a terminal, log lines otherwise) and saying why when it stalls or times out.
//! - [`private_dir`]: the state directory holds keys: it is created mode 0700, and a directory
//!   or key file others can read is refused.
//! - [`onion_service`]: hosts an onion service (`shroud-proxy --onion-tunnel`, `shroud --onion`)
//!   on one or more ports and yields each stream a Tor client opens to it, to accept as a byte
//!   stream; it checks itself through Tor and relaunches with new introduction points when
//!   Tor clients cannot reach it.
//! - [`runtime`]: the runtime Arti runs on, tokio with Nagle's algorithm off on its connections
//!   to relays, and [`Tor`], the Arti client type every binary holds.
//!
//! Connecting *to* an onion service needs nothing here: Arti's ordinary `connect` takes a
//! `.onion` name (arti-client's `onion-service-client` feature) and never uses an exit.

pub mod bootstrap;
pub mod config;
pub mod onion_service;
pub mod private_dir;
pub mod runtime;

use std::io;
use std::path::PathBuf;

pub use bootstrap::bootstrap;
pub use config::{arti_config, Vanguards};
pub use runtime::{Tor, TorRuntime};

/// Why Tor could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum TorError {
    /// The `--tor-network` file could not be read.
    #[error("reading the Tor network file {path}: {source}")]
    ReadNetwork {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `--tor-network` file is not Arti configuration.
    #[error("the Tor network file {path} is not valid Arti configuration: {reason}")]
    ParseNetwork {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The configuration did not validate.
    #[error("Tor configuration: {0}")]
    Config(String),
    /// `--resolve` was given without a private network.
    #[error(
        "--resolve is refused with the tor transport: names are resolved by the Tor exit, never \
         locally (it is allowed only with --tor-network, for a private Tor network)"
    )]
    ResolveRefused,
    /// Arti failed to start or bootstrap.
    #[error("Tor: {0}")]
    Arti(String),
    /// Bootstrap did not finish in time.
    #[error("Tor bootstrap did not finish within {secs} s (last status: {status})")]
    BootstrapTimeout {
        /// The deadline.
        secs: u64,
        /// Arti's last bootstrap status, with its blocked reason if any.
        status: String,
    },
    /// The state directory, or a file in it, cannot be used: others may read it, or it cannot
    /// be created.
    #[error("state directory {path}: {reason}")]
    StateDir {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong, and how to fix it.
        reason: String,
    },
    /// The onion service could not be launched.
    #[error("launching the onion service: {0}")]
    OnionService(String),
}
