//! shroud's client: publishes a local service through public proxies.
//!
//! [`client::Client`] starts one task per proxy ([`tunnel::hold`]): it reaches the proxy
//! through a [`transport::Transport`], opens TLS with ALPN `shroud/1` ([`tls`]), runs yamux
//! and binds the hostname with the client's key ([`key`]). Each stream the proxy then opens is
//! one visitor, which [`origin`] connects to the local target. Failed tunnels come back with
//! [`backoff`]. [`srv`] finds a hostname's proxies in DNS SRV records, asking through the
//! transport. [`cli`] and [`app`] are the command line.

pub mod app;
pub mod backoff;
pub mod cli;
pub mod client;
pub mod discovery;
pub mod key;
pub mod origin;
pub mod srv;
pub mod tls;
pub mod tor;
pub mod transport;
pub mod tunnel;

/// Sets up logging to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    init_logging_with("info");
}

/// Sets up logging to stderr, filtered by `RUST_LOG`, or by `default` when it is unset.
pub fn init_logging_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
