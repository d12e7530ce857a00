//! `shroud-proxy`: see the library crate.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = shroud_proxy::cli::Cli::parse();
    shroud_process::logging::init("info", &cli.log);
    shroud_process::limits::raise_open_file_limit();
    shroud_process::exit::status("shroud-proxy", shroud_proxy::cli::run(cli).await)
}
