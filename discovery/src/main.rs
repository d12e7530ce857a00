//! `shroud-discovery`: see the library crate.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = shroud_discovery::cli::Cli::parse();
    shroud_discovery::init_logging();
    match shroud_discovery::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shroud-discovery: {err:#}");
            ExitCode::FAILURE
        }
    }
}
