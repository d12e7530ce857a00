//! `shroud`: see the library crate.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Flags from the command line, the environment and the --config file, in that order.
    let cli = shroud_process::config::parse::<shroud_client::cli::Cli>();
    shroud_process::logging::init("info", &cli.log);
    shroud_process::limits::raise_open_file_limit();
    shroud_process::exit::status("shroud", shroud_client::app::main(cli).await)
}
