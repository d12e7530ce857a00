//! Logging to stderr through `tracing`, with the flags every binary shares ([`LogArgs`]).

use tracing_subscriber::EnvFilter;

/// The crates whose level `-v` and `-q` move; every other crate's stays at the default's.
const OWN_CRATES: [&str; 5] = [
    "shroud_client",
    "shroud_proxy",
    "shroud_discovery",
    "shroud_mux",
    "shroud_process",
];

/// The shape of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (`message` among
    /// them) and the `spans` it happened in.
    Json,
}

/// The logging flags of every shroud binary. `RUST_LOG`, when set, overrides the level.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        env = "SHROUD_LOG_FORMAT",
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,

    /// More detail from shroud's own code: -v debug, -vv trace (RUST_LOG overrides)
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Less: -q warnings and errors only, -qq errors only (RUST_LOG overrides)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
}

impl LogArgs {
    /// The filter directives for `default` (such as `info,hickory_server=warn`) moved by
    /// `-v`/`-q`: `-v` and `-vv` raise shroud's own crates to debug and trace, `-q` and `-qq`
    /// lower everything to warn and error.
    pub fn directives(&self, default: &str) -> String {
        match (self.verbose, self.quiet) {
            (0, 0) => default.to_owned(),
            (0, 1) => "warn".to_owned(),
            (0, _) => "error".to_owned(),
            (verbose, _) => {
                let level = if verbose == 1 { "debug" } else { "trace" };
                let own = OWN_CRATES.map(|name| format!("{name}={level}")).join(",");
                format!("{default},{own}")
            }
        }
    }
}

/// Sets up logging to stderr, filtered by `RUST_LOG`, or by `default` (an `EnvFilter`
/// directive such as `info`) as `args` move it when `RUST_LOG` is unset or empty. Colours
/// only on a terminal, and never in JSON. A subscriber that is already installed (by a test,
/// say) is kept.
pub fn init(default: &str, args: &LogArgs) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|directives| !directives.trim().is_empty())
        .and_then(|directives| EnvFilter::try_new(directives).ok());
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(args.directives(default)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(verbose: u8, quiet: u8) -> LogArgs {
        LogArgs {
            log_format: LogFormat::Text,
            verbose,
            quiet,
        }
    }

    #[test]
    fn verbosity_moves_the_default() {
        assert_eq!(args(0, 0).directives("info,x=warn"), "info,x=warn");
        assert_eq!(args(0, 1).directives("info"), "warn");
        assert_eq!(args(0, 2).directives("info"), "error");
        let debug = args(1, 0).directives("info,x=warn");
        assert!(debug.starts_with("info,x=warn,"), "{debug}");
        assert!(debug.contains("shroud_proxy=debug"), "{debug}");
        assert!(args(2, 0)
            .directives("info")
            .contains("shroud_client=trace"));
        for directives in [debug, args(3, 0).directives("info")] {
            assert!(EnvFilter::try_new(&directives).is_ok(), "{directives}");
        }
    }
}
