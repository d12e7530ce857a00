//! `shroud-proxy`: see the library crate.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = shroud_proxy::cli::Cli::parse();
    shroud_proxy::init_logging();
    match shroud_proxy::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shroud-proxy: {err:#}");
            ExitCode::FAILURE
        }
    }
}
