//! What the harness's command-line tools (`shroud-load`, `shroud-soak`, `shroud-tor-latency`)
//! share: reading their flags, the start and end of their `main`, and the dates and machine
//! facts their reports give.

use std::fmt::Display;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

/// A tool's arguments, read one flag at a time; a flag's value follows it (`--flag value`) or
/// is joined to it (`--flag=value`).
pub struct Args<I> {
    args: I,
}

/// One flag read by [`Args::next_flag`].
pub struct Flag {
    /// The flag as given, without any `=value`: `--samples`, `-h`.
    pub name: String,
    inline: Option<String>,
}

impl<I: Iterator<Item = String>> Args<I> {
    /// Reads `args` (the program's name already skipped).
    pub fn new(args: I) -> Self {
        Self { args }
    }

    /// The next flag, or `None` once every argument has been read.
    pub fn next_flag(&mut self) -> Option<Flag> {
        let arg = self.args.next()?;
        Some(match arg.split_once('=') {
            Some((name, value)) => Flag {
                name: name.to_owned(),
                inline: Some(value.to_owned()),
            },
            None => Flag {
                name: arg,
                inline: None,
            },
        })
    }

    /// The value of `flag`: the part after its `=`, or else the next argument.
    ///
    /// # Errors
    /// If it has neither.
    pub fn value(&mut self, flag: &Flag) -> anyhow::Result<String> {
        flag.inline
            .clone()
            .or_else(|| self.args.next())
            .with_context(|| format!("{} needs a value", flag.name))
    }

    /// The value of `flag`, read as a number.
    ///
    /// # Errors
    /// If it has no value, or the value is not a number of type `T`.
    pub fn number<T: FromStr>(&mut self, flag: &Flag) -> anyhow::Result<T> {
        let text = self.value(flag)?;
        text.parse()
            .ok()
            .with_context(|| format!("{} {text:?} is not a number", flag.name))
    }
}

/// What a tool's `main` does with the result of parsing its arguments (`None` for `--help`):
/// the options to run with, or else the exit code to leave with at once, having printed the
/// usage (to stdout for `--help`, exit 0; with the error to stderr for a bad argument, exit 2).
pub fn options<T>(
    name: &str,
    usage: &str,
    parsed: anyhow::Result<Option<T>>,
) -> Result<T, ExitCode> {
    match parsed {
        Ok(Some(options)) => Ok(options),
        Ok(None) => {
            println!("{usage}");
            Err(ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("{name}: {err:#}\n\n{usage}");
            Err(ExitCode::from(2))
        }
    }
}

/// Sets a tool up to run: aws-lc-rs as rustls's process-wide provider, and logs to stderr
/// filtered by `RUST_LOG`, or by `default_filter` when it is unset.
pub fn init(default_filter: &str) {
    // Err means a provider is already installed, which is all we need.
    let _already = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Err means a subscriber is already set; keep that one.
    let _already = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The exit code for a tool's run: success, or failure with the error on stderr after the
/// tool's `name`.
pub fn exit<E: Display>(name: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{name}: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// This machine's CPU model, from `/proc/cpuinfo`, for a report's "how it was measured".
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

/// The running Linux kernel's release (`6.1.0-18-amd64`).
pub fn kernel_release() -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    Some(release.trim().to_owned())
}

/// `2026-04-08 10:00:00 UTC`.
pub fn utc(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let rest = secs % 86_400;
    format!(
        "{} {:02}:{:02}:{:02} UTC",
        utc_date(at),
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// `2026-04-08`, the date in UTC, from the civil calendar (no time zone database needed).
pub fn utc_date(at: SystemTime) -> String {
    let days = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        assert_eq!(utc(at(0)), "1970-01-01 00:00:00 UTC");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.
        assert_eq!(utc(at(951_827_696)), "2000-02-29 12:34:56 UTC");
        assert_eq!(utc_date(at(1_775_642_400)), "2026-04-08");
    }

    #[test]
    fn flags_take_values_joined_or_following() {
        let words = ["--a=1", "--b", "2", "-h", "--c"].map(String::from);
        let mut args = Args::new(words.into_iter());
        let mut seen = Vec::new();
        while let Some(flag) = args.next_flag() {
            let value = match flag.name.as_str() {
                "-h" => None,
                _ => Some(args.value(&flag).map_err(|err| err.to_string())),
            };
            seen.push((flag.name, value));
        }
        assert_eq!(
            seen,
            [
                ("--a".to_owned(), Some(Ok("1".to_owned()))),
                ("--b".to_owned(), Some(Ok("2".to_owned()))),
                ("-h".to_owned(), None),
                ("--c".to_owned(), Some(Err("--c needs a value".to_owned()))),
            ]
        );
    }
}
