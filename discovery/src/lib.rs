//! shroud's discovery service: tells shroud clients which proxies to hold tunnels to.
//!
//! A client asks `GET /v1/proxies?host=HOSTNAME` over HTTPS and gets a short-lived list of
//! proxies, signed with an ed25519 key the client pins, so neither the network nor the
//! service's TLS certificate is trusted for the list's contents. The parts:
//!
//! - [`signed`]: the list ([`signed::ProxyList`]), its wire form, [`signed::sign`] and
//!   [`signed::verify`]. Clients depend on this crate for `verify`.
//! - [`fleet`]: the proxies the service knows: static ones from the fleet file and live ones
//!   that send heartbeats, and the per-host choice among them (rendezvous hashing, spread across
//!   regions).
//! - [`api`]: paths, the heartbeat message, and [`api::fetch_list`], a client's fetch and
//!   verification over any stream.
//! - [`http`]: a minimal bounded HTTP/1.1 client over any byte stream (TLS over Tor included).
//! - [`server`]: the HTTPS API (hyper over tokio-rustls), with its bounds: handshake and header
//!   deadlines, connection cap, body cap, and the per-address [`ratelimit`].
//! - [`cname`]: the optional check that a hostname is a CNAME into the fleet's domain.
//! - [`dns`]: the authoritative DNS zone that answers each hostname with the addresses of the
//!   proxies holding it.
//! - [`secret`]: the fleet secret that authorises heartbeats.
//! - [`announce`]: what a proxy runs to register itself: heartbeats, and a last one saying it
//!   leaves.
//! - [`metrics`]: what it counts, for Prometheus on `--metrics-listen`.
//! - [`cli`]: the `shroud-discovery` command line.
//! - [`reload`]: on SIGHUP, the HTTPS certificate and the fleet file read again while serving.
//!
//! Nothing is persisted: a restarted service rebuilds its state from the fleet file and the
//! next heartbeats. See `README.md` beside this crate for the API and formats.

#![forbid(unsafe_code)]

pub mod announce;
pub mod api;
pub mod cli;
pub mod cname;
pub mod dns;
pub mod fleet;
pub mod http;
pub mod metrics;
pub mod ratelimit;
pub mod reload;
pub mod secret;
pub mod server;
pub mod signed;
