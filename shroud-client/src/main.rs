//! `shroud`: see the library crate.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = shroud_client::cli::Cli::parse();
    shroud_process::logging::init("info", &cli.log);
    shroud_process::limits::raise_open_file_limit();
    shroud_process::exit::status("shroud", shroud_client::app::main(cli).await)
}
