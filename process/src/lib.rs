//! What every shroud binary does as a process, apart from its own work.
//!
//! `shroud`, `shroud-proxy` and `shroud-discovery` each parse their command line with its
//! [`config`] file, set up [`logging`], raise their [`limits`], stop on a [`signal`], reload
//! their files on SIGHUP or when they change ([`reload`]), and end with an [`exit`] status.
//! The proxy and the discovery service serve TLS from PEM files ([`tls`]); the client and the
//! discovery service print a key's public half for their `key` subcommands ([`key`]). Each of
//! these, the `--resolve` overrides ([`resolve`]) and the DNS resolver they fall back to
//! ([`dns`]), is written once here, so that the binaries cannot drift apart. So are their
//! shell completions and man pages ([`packaging`]), and the Prometheus metrics, health and
//! readiness each serves on `--metrics-listen` ([`metrics`]).

#![forbid(unsafe_code)]

pub mod config;
pub mod dns;
pub mod exit;
pub mod key;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod packaging;
pub mod reload;
pub mod resolve;
pub mod signal;
pub mod tls;
