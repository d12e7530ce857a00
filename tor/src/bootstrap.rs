//! Starting Arti: bootstrap with a deadline, progress shown while it runs.

use std::sync::Arc;
use std::time::Duration;

use arti_client::{TorClient, TorClientConfig};
use futures::StreamExt as _;
use tracing::{info, warn};

use crate::{Tor, TorError};

/// Starts Arti with `config` and waits until it has bootstrapped, for at most `timeout`.
/// Progress goes to a bar on stderr when `progress_bar` (a terminal), to log lines otherwise;
/// a stall is logged with Arti's reason, and a timeout says where bootstrap stood.
pub async fn bootstrap(
    config: TorClientConfig,
    timeout: Duration,
    progress_bar: bool,
    observer: Option<StatusObserver>,
) -> Result<Arc<Tor>, TorError> {
    // Said once bootstrapped, so an operator can see which vanguards onion circuits get.
    let vanguards = crate::Vanguards::of(&config).map_or("disabled".to_owned(), |v| v.to_string());
    let runtime = crate::runtime::current().map_err(|err| TorError::Arti(err.to_string()))?;
    let client = TorClient::with_runtime(runtime)
        .config(config)
        .bootstrap_behavior(arti_client::BootstrapBehavior::Manual)
        .create_unbootstrapped()
        .map_err(|err| TorError::Arti(err.to_string()))?;
    let started = tokio::time::Instant::now();
    // Before bootstrap() is called Arti reports itself "disabled, waiting to be told to
    // bootstrap": that is not a stall worth a warning.
    let not_started = client
        .bootstrap_status()
        .blocked()
        .map(|b| b.to_string())
        .unwrap_or_default();
    let progress = tokio::spawn(show_progress(
        client.bootstrap_events(),
        progress_bar,
        not_started,
        observer.clone(),
    ));
    let bootstrap = tokio::time::timeout(timeout, client.bootstrap()).await;
    progress.abort();
    match bootstrap {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(TorError::Arti(err.to_string())),
        Err(_) => {
            return Err(TorError::BootstrapTimeout {
                secs: timeout.as_secs(),
                status: client.bootstrap_status().to_string(),
            })
        }
    }
    info!(elapsed = ?started.elapsed(), %vanguards, "Tor bootstrapped");
    if let Some(observer) = observer {
        // Arti keeps reporting after the bootstrap (a directory gone stale shows there).
        observer(&client.bootstrap_status());
        let mut events = client.bootstrap_events();
        tokio::spawn(async move {
            while let Some(status) = events.next().await {
                observer(&status);
            }
        });
    }
    Ok(client)
}

/// What is told each bootstrap status Arti reports, during the bootstrap and after it (for
/// metrics, say).
pub type StatusObserver = Arc<dyn Fn(&arti_client::status::BootstrapStatus) + Send + Sync>;

/// A bootstrap status as a percentage, 0 to 100.
pub fn percent(status: &arti_client::status::BootstrapStatus) -> i64 {
    (f64::from(status.as_frac()) * 100.0).round() as i64
}

/// Reports bootstrap progress until it is aborted: a bar on a terminal, log lines otherwise.
/// When progress stalls, says why (Arti's blocked reason).
async fn show_progress(
    mut events: arti_client::status::BootstrapEvents,
    bar: bool,
    not_started: String,
    observer: Option<StatusObserver>,
) {
    let bar = bar.then(|| {
        let bar = indicatif::ProgressBar::new(100);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("Tor bootstrap [{bar:30}] {pos:>3}% {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    let mut last_logged = -1i32;
    let mut last_blocked = not_started;
    loop {
        let status = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
        let status = match status {
            Ok(Some(status)) => status,
            Ok(None) => break,
            Err(_) => {
                // Ten seconds without news: say where it stands.
                warn!("Tor bootstrap is taking a while; still trying");
                continue;
            }
        };
        if let Some(observer) = &observer {
            observer(&status);
        }
        let percent = (status.as_frac() * 100.0).round() as i32;
        let blocked = status.blocked().map(|b| b.to_string()).unwrap_or_default();
        if let Some(bar) = &bar {
            bar.set_position(percent.clamp(0, 100) as u64);
            bar.set_message(if blocked.is_empty() {
                String::new()
            } else {
                format!("(stalled: {blocked})")
            });
        }
        if percent / 10 != last_logged / 10 {
            info!(percent, "Tor bootstrap: {status}");
            last_logged = percent;
        }
        if !blocked.is_empty() && blocked != last_blocked {
            warn!(reason = %blocked, "Tor bootstrap is stalled");
        }
        last_blocked = blocked;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
