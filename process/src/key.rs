//! The `key` subcommands: a key file's public half on stdout.

use std::io::Write as _;
use std::path::Path;

/// Why a key could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum ShowKeyError {
    /// The key file could not be read or made.
    #[error(transparent)]
    Key(#[from] shroud_mux::keyfile::KeyError),
    /// Stdout failed for a reason other than its reader having gone.
    #[error("writing to stdout: {0}")]
    Stdout(#[source] std::io::Error),
}

/// Loads the key at `path`, making it (mode 0600) if it is missing, and prints its public half
/// alone on the first line of stdout, so that scripts can take it with `head -1`. Then, as
/// comments, whether the `what` file (say "signing key") is new and where it is, and the lines
/// `hints` makes from the public key's text, each prefixed with `# `.
///
/// A reader that closes stdout early (`| head -1`) is no error: what it wanted was printed.
pub fn print_public(
    path: &Path,
    what: &str,
    hints: impl FnOnce(&str) -> Vec<String>,
) -> Result<(), ShowKeyError> {
    let (secret, created) = shroud_mux::keyfile::load_or_create(path)?;
    let public = secret.public().to_string();
    let mut text = format!(
        "{public}\n# {} {what} file: {}\n",
        if created { "new" } else { "existing" },
        path.display()
    );
    for hint in hints(&public) {
        text.push_str("# ");
        text.push_str(&hint);
        text.push('\n');
    }
    write_stdout(text.as_bytes())
}

/// Writes `text` to stdout, treating a closed pipe as success.
fn write_stdout(text: &[u8]) -> Result<(), ShowKeyError> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(ShowKeyError::Stdout(err)),
        _ => Ok(()),
    }
}
