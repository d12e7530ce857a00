//! `--config FILE`: a binary's flags, read from a TOML file as well as from the command line
//! and the environment.
//!
//! Every flag has a key of its long name: `listen-https = "0.0.0.0:443"`; a list for a flag
//! that may be repeated, `peer = ["a.example:7443", "b.example:7443"]` (a single string is one
//! element); `true` or `false` for a switch, `authorize-dns = true`; a count for `-v`,
//! `verbose = 2`; an integer for a number, `max-connections = 20000`. A positional argument has
//! a key of its name: `target = "127.0.0.1:443"`. A relative path in the file is taken from
//! the file's directory, not from the working directory.
//!
//! A flag on the command line overrides its environment variable, which overrides the file,
//! which overrides the flag's default. The file never settles a relation between flags that
//! a command line would not: a key that conflicts with a flag given on the command line or in
//! the environment gives way to it (`-q` beats `verbose = 1`), and the remaining values must
//! satisfy the same `requires` and `conflicts_with` as flags typed by hand.
//!
//! A key that names no flag, a value of the wrong type, a value the flag's own parser refuses,
//! and a key that names `help`, `version`, `config` itself or a flag that only a subcommand
//! has, are refused with the file's name and the key's line. A value is never repeated in an
//! error: a file may hold what should not reach a terminal or a log.
//!
//! # How
//!
//! clap parses the command line once, leniently ([`clap::Command::ignore_errors`]), to learn
//! where the file is and which arguments the command line and the environment already give
//! ([`clap::ArgMatches::value_source`]). The file's remaining keys become arguments written
//! before the user's own (`--listen-https=0.0.0.0:443`), and positional ones after them, and
//! clap parses the whole again: the result is exactly what that command line would give, with
//! clap's own checks of required flags and relations. Each value is first checked against its
//! flag's value parser, so that a bad one is reported with its line.
//!
//! A subcommand (`shroud key`) is not run with the file's flags: they describe the service.
//! Only a key naming a flag the subcommand has too (`key`, the client's key file) and the
//! global flags (`log-format`) reach it, as defaults beneath its command line and environment.
//!
//! [`reload`] parses the same command line again, reading the file anew: a caller that
//! reloads on SIGHUP gets the new arguments, or an error naming the line, without exiting.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

mod file;

pub use file::Problem;

/// The environment variable that names the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "SHROUD_CONFIG";

/// The largest config file read; a larger one is refused rather than read in part.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The `--config FILE` flag, to flatten into a binary's command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// Read flags from this TOML file: each key is a flag's long name (`listen-https =
    /// "0.0.0.0:443"`, `peer = ["a:7443", "b:7443"]`, `authorize-dns = true`, `verbose = 1`).
    /// Flags and environment variables override it; relative paths in it are taken from its
    /// directory
    #[arg(
        long = "config",
        value_name = "FILE",
        env = CONFIG_ENV,
        global = true
    )]
    pub config: Option<PathBuf>,
}

/// Why the command line and its config file could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// clap refused the command line (the file's arguments included), or it asks for help or
    /// the version: clap's own error, which prints them.
    #[error("{error}{}", note.as_deref().map(|note| format!("\n{note}")).unwrap_or_default())]
    Usage {
        /// clap's error.
        error: clap::Error,
        /// Which arguments the config file gave, when it gave any: they may be the ones clap
        /// names.
        note: Option<String>,
    },
    /// The config file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file, as found.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is larger than [`MAX_FILE_BYTES`].
    #[error("config file {} is larger than {MAX_FILE_BYTES} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Something at a line of the config file is wrong.
    #[error("{}:{line}: {problem}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong there.
        problem: Problem,
    },
}

impl Error {
    /// The status to exit with: clap's for its own errors (0 for help and the version, 2 for a
    /// usage error), and 2, a usage error, for everything about the file.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage { error, .. } => error.exit_code(),
            _ => 2,
        }
    }

    /// Prints the error (help and the version to stdout, like clap) and exits with
    /// [`Error::exit_code`].
    pub fn exit(&self) -> ! {
        match self {
            Error::Usage { error, note } => {
                let _ = error.print();
                if let Some(note) = note {
                    eprintln!("{note}");
                }
            }
            Error::Read { source, .. } => eprintln!("error: {self}: {source}"),
            _ => eprintln!("error: {self}"),
        }
        std::process::exit(self.exit_code())
    }
}

/// A parsed command line, and the config file it read.
#[derive(Debug)]
pub struct Parsed<C> {
    /// The arguments, from the command line, the environment and the file.
    pub cli: C,
    /// The config file read, made absolute; `None` without `--config` or `SHROUD_CONFIG`.
    pub file: Option<PathBuf>,
}

/// Parses this process's command line with its config file, as clap's `Parser::parse` does
/// without one: on an error, prints it and exits (status 2; 0 for `--help`).
pub fn parse<C: clap::Parser>() -> C {
    match try_parse_from::<C, _, _>(std::env::args_os()) {
        Ok(parsed) => parsed.cli,
        Err(err) => err.exit(),
    }
}

/// Parses this process's command line again, reading its config file anew: for a reload. The
/// environment is the process's, as at start.
pub fn reload<C: clap::Parser>() -> Result<Parsed<C>, Error> {
    try_parse_from(std::env::args_os())
}

/// Parses `args` (the program's name first) with the config file they or `SHROUD_CONFIG` name.
/// Environment variables are read from the process's environment, by clap.
pub fn try_parse_from<C, I, T>(args: I) -> Result<Parsed<C>, Error>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let usage = |error: clap::Error| Error::Usage { error, note: None };

    // First pass: where the file is, and what the command line and the environment give.
    let given = C::command()
        .ignore_errors(true)
        .try_get_matches_from(&args)
        .map_err(usage)?;
    // A subcommand stands in for serving: the serving options' variables are not read for it.
    let base = || match given.subcommand() {
        Some(_) => without_serving_variables(C::command()),
        None => C::command(),
    };
    let Some(path) = config_path(&given) else {
        let mut matches = base().try_get_matches_from(&args).map_err(usage)?;
        let cli = C::from_arg_matches_mut(&mut matches).map_err(usage)?;
        return Ok(Parsed { cli, file: None });
    };

    let mut command = C::command();
    command.build();
    let settings = file::read(&path, &command)?;

    let (final_command, final_args, applied) = match given.subcommand() {
        None => with_arguments(base(), &command, &given, &args, &settings),
        Some((name, sub_given)) => {
            with_defaults(base(), &command, &given, name, sub_given, &settings, &args)
        }
    };
    let note = (!applied.is_empty()).then(|| {
        format!(
            "note: from config file {}: {}",
            path.display(),
            applied.join(", ")
        )
    });
    let mut matches = final_command
        .try_get_matches_from(&final_args)
        .map_err(|error| Error::Usage {
            error,
            note: note.clone(),
        })?;
    let cli = C::from_arg_matches_mut(&mut matches).map_err(|error| Error::Usage {
        error,
        note: note.clone(),
    })?;
    Ok(Parsed {
        cli,
        file: Some(path),
    })
}

/// `command` with its own options (not global ones, not its subcommands') reading no
/// environment variable: for a subcommand's run. Those options configure serving, which the
/// subcommand replaces, and clap counts an option its variable sets as given: a deployment's
/// `SHROUD_DISCOVERY_SIGNING_KEY` or `SHROUD_DISCOVERY_LISTEN` made `shroud-discovery key`
/// fail with "the following required argument was not provided: listen".
fn without_serving_variables(command: Command) -> Command {
    command.mut_args(|arg| {
        if arg.is_global_set() {
            arg
        } else {
            arg.env(None::<&'static str>)
        }
    })
}

/// The config file's path, absolute, from `--config` or its variable.
fn config_path(given: &ArgMatches) -> Option<PathBuf> {
    let path = given.try_get_one::<PathBuf>("config").ok().flatten()?;
    Some(std::path::absolute(path).unwrap_or_else(|_| path.clone()))
}

/// Whether the command line or the environment gave the argument `id` in `matches`.
fn given_explicitly(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches
            .try_contains_id(id)
            .ok()
            .and(matches.value_source(id)),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Whether the setting of `arg` must give way to an argument the command line or environment
/// gave that conflicts with it, in either direction.
fn conflicts_with_given(command: &Command, arg: &clap::Arg, given: &ArgMatches) -> bool {
    let ours = command.get_arg_conflicts_with(arg);
    if ours
        .iter()
        .any(|other| given_explicitly(given, other.get_id().as_str()))
    {
        return true;
    }
    command
        .get_arguments()
        .filter(|other| given_explicitly(given, other.get_id().as_str()))
        .any(|other| {
            command
                .get_arg_conflicts_with(other)
                .iter()
                .any(|theirs| theirs.get_id() == arg.get_id())
        })
}

/// A run of the command itself: the file's options become arguments before the user's, its
/// positional values arguments after them (or defaults, where that would misplace them).
/// Returns the command, the arguments, and what the file gave.
fn with_arguments(
    mut target: Command,
    built: &Command,
    given: &ArgMatches,
    args: &[OsString],
    settings: &[file::Setting],
) -> (Command, Vec<OsString>, Vec<String>) {
    let mut options: Vec<OsString> = Vec::new();
    let mut positionals: Vec<(&clap::Arg, &file::Setting)> = Vec::new();
    let mut applied = Vec::new();
    for setting in settings {
        let Some(arg) = built.get_arguments().find(|a| a.get_id() == &setting.id) else {
            continue;
        };
        if given_explicitly(given, setting.id.as_str()) || conflicts_with_given(built, arg, given) {
            continue;
        }
        match arg.get_long() {
            Some(long) => {
                let before = options.len();
                setting.value.push_arguments(long, &mut options);
                if options.len() > before {
                    applied.push(format!("{} (line {})", setting.key, setting.line));
                }
            }
            None => positionals.push((arg, setting)),
        }
    }

    let mut final_args: Vec<OsString> = args.iter().take(1).cloned().collect();
    final_args.extend(options);
    final_args.extend(args.iter().skip(1).cloned());
    if !positionals.is_empty() {
        match positional_tail(built, given, args, &positionals) {
            Some(tail) => final_args.extend(tail),
            None => {
                for (arg, setting) in &positionals {
                    target = with_default(target, arg.get_id().as_str(), &setting.value);
                }
            }
        }
        for (_, setting) in &positionals {
            applied.push(format!("{} (line {})", setting.key, setting.line));
        }
    }
    (target, final_args, applied)
}

/// The arguments that give the file's positional values in their places, after the user's:
/// when the command line gave no positional value and every place up to the file's last one
/// is filled, by the file or by the environment. `None` otherwise.
fn positional_tail(
    built: &Command,
    given: &ArgMatches,
    args: &[OsString],
    from_file: &[(&clap::Arg, &file::Setting)],
) -> Option<Vec<OsString>> {
    let mut places: Vec<&clap::Arg> = built.get_positionals().collect();
    places.sort_by_key(|arg| arg.get_index());
    let on_command_line = places
        .iter()
        .any(|arg| given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine));
    if on_command_line || args.iter().skip(1).any(|arg| arg == "--") {
        return None;
    }
    let last = from_file
        .iter()
        .filter_map(|(arg, _)| places.iter().position(|p| p.get_id() == arg.get_id()))
        .max()?;
    let mut tail = vec![OsString::from("--")];
    for place in &places[..=last] {
        let one_value = place
            .get_num_args()
            .is_some_and(|range| range.max_values() == 1);
        if !one_value {
            return None;
        }
        let id = place.get_id().as_str();
        if given.value_source(id) == Some(ValueSource::EnvVariable) {
            let raw = given.get_raw(id)?;
            tail.extend(raw.map(OsStr::to_os_string));
        } else if let Some((_, setting)) = from_file.iter().find(|(arg, _)| arg.get_id() == id) {
            tail.push(setting.value.single()?.into());
        } else {
            return None;
        }
    }
    Some(tail)
}

/// A subcommand's run: the file's global flags and those the subcommand shares become
/// defaults, beneath its command line and environment. Returns the command, the arguments
/// (unchanged), and what the file gave.
fn with_defaults(
    mut target: Command,
    built: &Command,
    given: &ArgMatches,
    name: &str,
    sub_given: &ArgMatches,
    settings: &[file::Setting],
    args: &[OsString],
) -> (Command, Vec<OsString>, Vec<String>) {
    let mut applied = Vec::new();
    let Some(sub_built) = built.find_subcommand(name) else {
        return (target, args.to_vec(), applied);
    };
    for setting in settings {
        let Some(arg) = built.get_arguments().find(|a| a.get_id() == &setting.id) else {
            continue;
        };
        let shared = sub_built.get_arguments().find(|sub| {
            !sub.is_global_set() && sub.get_long().is_some() && sub.get_long() == arg.get_long()
        });
        if arg.is_global_set() {
            // A global flag given after the subcommand shows in `given` too: clap passes them up.
            if given_explicitly(given, arg.get_id().as_str())
                || conflicts_with_given(built, arg, given)
            {
                continue;
            }
            target = with_default(target, arg.get_id().as_str(), &setting.value);
        } else if let Some(sub_arg) = shared {
            let id = sub_arg.get_id().as_str().to_owned();
            if given_explicitly(sub_given, &id) {
                continue;
            }
            let value = setting.value.clone();
            target = target.mut_subcommand(name, |sub| with_default(sub, &id, &value));
        } else {
            continue;
        }
        applied.push(format!("{} (line {})", setting.key, setting.line));
    }
    (target, args.to_vec(), applied)
}

/// `command` with `value` as the default of its argument `id`, which is then no longer
/// required.
fn with_default(command: Command, id: &str, value: &file::Value) -> Command {
    let defaults = value.as_defaults();
    command.mut_arg(id, |arg| {
        arg.default_values(defaults)
            .required(false)
            .required_unless_present(clap::builder::Resettable::<clap::Id>::Reset)
    })
}

#[cfg(test)]
mod tests;
