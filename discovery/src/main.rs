//! `shroud-discovery`: see the library crate.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = shroud_discovery::cli::Cli::parse();
    shroud_process::logging::init("info");
    shroud_process::exit::status("shroud-discovery", shroud_discovery::cli::run(cli).await)
}
