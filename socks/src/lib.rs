//! The local proxy protocols `shroud --socks-listen` serves, so that the origin's own programs
//! (webhooks, API calls, package updates) leave through the client's embedded Tor.
//!
//! - [`request`]: reads one request from a local program, SOCKS5 or HTTP CONNECT (told apart
//!   by the first byte), answering the protocol's own steps on the way, and writes the reply
//!   that tells the program whether its connection is open.
//! - [`socks5`]: SOCKS5 (RFC 1928) with no authentication or username/password (RFC 1929,
//!   accepted whatever the credentials: they only choose which circuit a stream may share).
//! - [`http_connect`]: an HTTP/1.x `CONNECT host:port` head.
//! - [`dest`]: where a program asked to go, and whether that is this machine or its local
//!   networks, which a proxy into Tor must not reach.
//!
//! Nothing here opens a connection or touches Tor: callers bring the stream the program
//! connected on, and decide what to do with the destination.

#![forbid(unsafe_code)]

pub mod dest;
pub mod http_connect;
pub mod request;
pub mod socks5;

pub use dest::{Destination, DestinationError, Host};
pub use request::{read_request, write_reply, Protocol, Reply, Request, RequestError};
