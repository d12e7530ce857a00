//! How a binary ends.

use std::process::ExitCode;

/// The exit status of a binary named `program` whose run ended with `result`: success, or the
/// error's whole chain on stderr (`program: what failed: why`) and a failure status.
pub fn status<E: std::fmt::Display>(program: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints an anyhow error's causes after its context.
            eprintln!("{program}: {err:#}");
            ExitCode::FAILURE
        }
    }
}
