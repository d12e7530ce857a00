//! shroud's wire protocol, as specified in `PROTOCOL.md` beside this crate.
//!
//! - [`auth`]: client keys and the bind proof that ties a key to one TLS connection.
//! - [`hostname`]: the one normalisation every hostname goes through.
//! - [`keyfile`]: ed25519 keys on disk (PKCS#8 PEM, mode 0600).
//! - [`onion`]: v3 onion addresses, as proxies announce them and clients dial them.
//! - [`control`]: the control stream's messages and their framing.
//! - [`header`]: the header that opens each data stream, and the client's acknowledgement.
//! - [`session`]: a yamux session driven by its own task, with handles to open and accept streams.
//! - [`peer`]: the authenticated link between two proxies of a fleet.
//! - [`replay`]: bytes read to route a connection, and a stream that yields them again first.
//! - [`quickack`]: TCP streams that acknowledge what they read at once (links to Tor relays).
//! - [`splice`]: copying both ways between a visitor's connection and its stream.
//! - [`words`]: word names, a hostname a client key proves by itself.
//!
//! No CLI, configuration or transport lives here: callers bring a connected, TLS-protected byte
//! stream and get a session back.

pub mod auth;
pub mod hostname;
pub mod keyfile;
pub mod onion;

/// The ALPN protocol identifier a client offers, and the proxy uses to recognise tunnels.
pub const ALPN: &[u8] = b"shroud/1";

mod coalesce;
mod codec;
pub mod control;
pub mod header;
pub mod peer;
pub mod quickack;
pub mod replay;
pub mod session;
pub mod splice;
pub mod words;

pub use codec::DecodeError;
pub use session::{Incoming, MuxStream, Role, Session, SessionConfig, SessionError};
