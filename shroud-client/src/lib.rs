//! shroud's client: publishes a local service through public proxies.
//!
//! [`client::Client`] starts one task per proxy ([`tunnel::hold`]): it reaches the proxy
//! through a [`transport::Transport`], opens TLS with ALPN `shroud/1` ([`tls`]), runs yamux
//! and binds the hostname with the client's key ([`key`]). Each stream the proxy then opens is
//! one visitor, which [`origin`] connects to the local target (first telling it who the
//! visitor is with a [`proxy_protocol`] header, if asked to). Failed tunnels come back with
//! [`backoff`]; with Tor, each tunnel keeps its circuit across reconnects and new circuits are
//! charged to a churn budget ([`circuits`]). [`srv`] finds a hostname's proxies in DNS SRV records, asking through the
//! transport. [`acme`] obtains and renews the hostname's certificate with TLS-ALPN-01, its
//! requests through the transport and its checks answered through the tunnel ([`hello`] tells
//! a check from a visitor). [`cli`] and [`app`] are the command line; [`reload`] re-reads
//! the visitors' certificate on SIGHUP. [`metrics`] counts what happens, for Prometheus on
//! `--metrics-listen`.
//!
//! Beside the tunnels, with Tor: [`onion`] publishes TARGET as the client's own onion service
//! too (`--onion`), and [`socks`] serves SOCKS5 and HTTP CONNECT to the origin's own programs
//! so that their outbound connections leave through Tor as well (`--socks-listen`).

pub mod acme;
pub mod app;
pub mod backoff;
pub mod circuits;
pub mod cli;
pub mod client;
pub mod discovery;
pub mod fleet;
pub mod hello;
pub mod key;
pub mod metrics;
pub mod onion;
pub mod origin;
pub mod proxy_protocol;
pub mod reload;
pub mod shared;
pub mod socks;
pub mod srv;
pub mod tls;
pub mod tor;
pub mod transport;
pub mod tunnel;
