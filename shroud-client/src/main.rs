//! `shroud`: see the library crate.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = shroud_client::cli::Cli::parse();
    shroud_client::init_logging();
    raise_open_file_limit();
    match shroud_client::app::main(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shroud: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard limit, best effort: every visitor holds a
/// descriptor here, and the soft limit shells commonly start with (1024) would cap the client at
/// about a thousand visitors at once while the hard limit allows far more.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        if soft < hard {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            if let Err(err) = setrlimit(Resource::Nofile, raised) {
                tracing::debug!(%err, soft, hard, "could not raise the open file limit");
            }
        }
    }
    let limit = getrlimit(Resource::Nofile);
    tracing::debug!(soft = ?limit.current, hard = ?limit.maximum, "open file limit");
}
