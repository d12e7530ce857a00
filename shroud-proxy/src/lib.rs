//! shroud's public proxy.
//!
//! Visitors arrive on the public listeners. [`tls_sniff`] reads a TLS ClientHello without
//! terminating it and [`http_sniff`] reads an HTTP request head; [`visitor`] uses the SNI or
//! Host to pick a tunnel from the [`registry`], opens a stream on it and splices the visitor
//! onto it, replaying the bytes it read. Shroud clients arrive on the same TLS port, told apart
//! by ALPN `shroud/1`; [`tunnel`] terminates their TLS, checks their bind against the
//! [`policy`] and registers the names. [`dns_auth`] reads the client keys a name's owner lists
//! in DNS TXT records. [`admission`] holds the limits on new work (connections per address
//! and per hostname, tunnels and hostnames per key) and documents the order of every check.
//! [`shared`] holds what every task shares (configuration, limits, routing table, admission
//! counts) and imports none of them; [`server`] owns the listeners and graceful shutdown;
//! [`cli`] turns flags into a [`shared::ProxyConfig`]; [`reload`] re-reads the authorized
//! file and the certificate on SIGHUP, without touching a tunnel or a visitor. [`metrics`]
//! counts what happens, for Prometheus on `--metrics-listen`.
//! With `--onion-tunnel`, [`onion`] also hosts the tunnel listener as a Tor onion service, and
//! hands what arrives there to [`tunnel`] like any tunnel connection.
//!
//! A fleet's proxies serve each other's names. [`peers`] is what one knows of the others,
//! kept by [`gossip`] (foca, over [`peer_link`]s whose ends prove the fleet secret);
//! [`forward`] hands a visitor with no tunnel here to a peer holding its name, and
//! [`handoff`] opens the tunnel stream, for visitors here and forwarded ones alike.

pub mod admission;
pub mod cli;
pub mod dns_auth;
pub mod forward;
pub mod gossip;
pub mod handoff;
pub mod http_sniff;
pub mod metrics;
pub mod onion;
pub mod peer_link;
pub mod peers;
pub mod policy;
pub mod registry;
pub mod reload;
pub mod server;
pub mod shared;
#[cfg(test)]
mod testing;
pub mod tls_sniff;
pub mod tunnel;
pub mod visitor;
