//! `shroud-discovery`: see the library crate.

use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Flags from the command line, the environment and the --config file, in that order.
    let cli = shroud_process::config::parse::<shroud_discovery::cli::Cli>();
    // hickory-server logs every DNS question at info, with the asker's address: that is a
    // resolver's, often a visitor's own, and no business of the log by default.
    shroud_process::logging::init("info,hickory_server=warn", &cli.log);
    shroud_process::exit::status("shroud-discovery", shroud_discovery::cli::run(cli).await)
}
