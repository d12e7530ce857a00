//! `shroud`: see the library crate.

use std::process::ExitCode;

/// mimalloc keeps freed memory for the next allocation, where glibc's malloc gave the memory of
/// yamux's frame bodies back to the kernel and faulted it in again (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // Flags from the command line, the environment and the --config file, in that order.
    let cli = shroud_process::config::parse::<shroud_client::cli::Cli>();
    shroud_process::logging::init("info", &cli.log);
    shroud_process::limits::raise_open_file_limit();
    shroud_process::exit::status("shroud", shroud_client::app::main(cli).await)
}
