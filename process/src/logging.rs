//! Logging to stderr through `tracing`.

/// Sets up logging to stderr, filtered by `RUST_LOG`, or by `default` (an `EnvFilter`
/// directive such as `info`) when it is unset. Colours only on a terminal. A subscriber that is
/// already installed (by a test, say) is kept.
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
