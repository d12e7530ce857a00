//! Stopping on a signal, and hearing SIGHUP.

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Cancels `shutdown` on the first SIGTERM or SIGINT. If the handlers cannot be installed it
/// says so and returns without cancelling: the process then stops only by SIGKILL.
pub async fn shutdown_on_signal(shutdown: CancellationToken) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop this process with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
    shutdown.cancel();
}

/// Every SIGHUP from now on. Installing the handler is what stops SIGHUP's default action,
/// which ends the process; it stays installed for the life of the process, even once the
/// returned stream is dropped. Call it (through [`crate::reload::Reloads::listen`]) before
/// the process says it is ready. Needs a tokio runtime.
pub fn hangups() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}
