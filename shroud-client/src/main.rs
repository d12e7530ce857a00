//! `shroud`: see the library crate.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = shroud_client::cli::Cli::parse();
    shroud_client::init_logging();
    match shroud_client::app::main(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shroud: {err:#}");
            ExitCode::FAILURE
        }
    }
}
