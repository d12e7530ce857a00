//! Reading a config file: TOML keys matched to a command's arguments, each value checked by
//! type and by its argument's own parser, every problem with its line.

use std::any::TypeId;
use std::ffi::OsString;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::{Error, MAX_FILE_BYTES};

/// What is wrong at a line of a config file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The file is not TOML; the parser's message, which names no value.
    #[error("not TOML: {0}")]
    Syntax(String),
    /// The file is not UTF-8 text.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// No argument has this key.
    #[error(
        "unknown key `{key}`{}",
        suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default()
    )]
    UnknownKey {
        /// The key.
        key: String,
        /// The closest key there is, if one is close.
        suggestion: Option<String>,
    },
    /// The key is a flag of a subcommand only.
    #[error(
        "`{key}` is a flag of `{subcommand}` only; a config file sets the flags of `{command}`"
    )]
    SubcommandOnly {
        /// The key.
        key: String,
        /// The subcommand that has it, as typed (`shroud key`).
        subcommand: String,
        /// The command the file is for.
        command: String,
    },
    /// The key names an argument a file may not set.
    #[error("`{key}` cannot be set in a config file: {why}")]
    NotSettable {
        /// The key.
        key: String,
        /// Why not.
        why: &'static str,
    },
    /// The value is of another TOML type than its argument takes.
    #[error("`{key}` takes {expected}, not {found}")]
    WrongType {
        /// The key.
        key: String,
        /// What it takes (`an integer`, `a string or an array of strings`).
        expected: String,
        /// The TOML type found (`a string`).
        found: &'static str,
    },
    /// The argument's parser refuses the value; the reason names no value.
    #[error("`{key}`: {reason}")]
    InvalidValue {
        /// The key.
        key: String,
        /// Why, without the value.
        reason: String,
    },
}

/// One key of the file, matched to its argument.
#[derive(Debug, Clone)]
pub(crate) struct Setting {
    /// The key as written.
    pub key: String,
    /// Its line, from 1.
    pub line: usize,
    /// The argument it sets.
    pub id: clap::Id,
    /// The value, as arguments take it.
    pub value: Value,
}

/// A file's value, in the form a command line gives it.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    /// A switch: the value it takes (`value`), and whether passing the flag gives it.
    Switch { value: bool, pass: bool },
    /// A count: the flag that many times.
    Count(u8),
    /// Values, one per occurrence of the flag; `delimiter` splits each, as clap does.
    Values {
        occurrences: Vec<String>,
        delimiter: Option<char>,
    },
}

impl Value {
    /// Appends the arguments `--long...` that give this value.
    pub fn push_arguments(&self, long: &str, out: &mut Vec<OsString>) {
        match self {
            Value::Switch { pass, .. } => {
                if *pass {
                    out.push(format!("--{long}").into());
                }
            }
            Value::Count(count) => {
                for _ in 0..*count {
                    out.push(format!("--{long}").into());
                }
            }
            Value::Values { occurrences, .. } => {
                for value in occurrences {
                    out.push(format!("--{long}={value}").into());
                }
            }
        }
    }

    /// The value as an argument's default values.
    pub fn as_defaults(&self) -> Vec<String> {
        match self {
            Value::Switch { value, .. } => vec![value.to_string()],
            Value::Count(count) => vec![count.to_string()],
            Value::Values {
                occurrences,
                delimiter,
            } => occurrences
                .iter()
                .flat_map(|value| split(value, *delimiter))
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The single value of a one-value argument, if that is what this is.
    pub fn single(&self) -> Option<&str> {
        match self {
            Value::Values { occurrences, .. } if occurrences.len() == 1 => {
                Some(occurrences[0].as_str())
            }
            _ => None,
        }
    }
}

/// `value` split as clap splits an argument's value by its delimiter.
fn split(value: &str, delimiter: Option<char>) -> Vec<&str> {
    match delimiter {
        Some(delimiter) => value.split(delimiter).collect(),
        None => vec![value],
    }
}

/// Reads the config file at `path` (absolute) for `command` (built: its help and version flags
/// are there) into settings, in the file's order, or the first problem in it.
pub(crate) fn read(path: &Path, command: &Command) -> Result<Vec<Setting>, Error> {
    let read_error = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(Error::TooLarge {
            path: path.to_owned(),
        });
    }
    let at = |offset: usize, text: &[u8], problem| Error::File {
        path: path.to_owned(),
        line: line_of(text, offset),
        problem,
    };
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            let offset = err.utf8_error().valid_up_to();
            return Err(at(offset, err.as_bytes(), Problem::NotUtf8));
        }
    };
    let table = DeTable::parse(&text).map_err(|err| {
        let offset = err.span().map_or(0, |span| span.start);
        let message = err.message().trim().replace('\n', "; ");
        at(offset, text.as_bytes(), Problem::Syntax(message))
    })?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let mut entries: Vec<_> = table.get_ref().iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    let mut settings = Vec::new();
    for (key, value) in entries {
        let setting = setting(command, key, value, base, |offset| {
            line_of(text.as_bytes(), offset)
        })
        .map_err(|(offset, problem)| at(offset, text.as_bytes(), problem))?;
        settings.push(setting);
    }
    Ok(settings)
}

/// The line, from 1, of byte `offset` of `text`.
fn line_of(text: &[u8], offset: usize) -> usize {
    let end = offset.min(text.len());
    text[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The key of an argument: its long name, or a positional argument's name in kebab case.
/// `None` for one with neither (a short-only flag).
fn key_of(arg: &Arg) -> Option<String> {
    match arg.get_long() {
        Some(long) => Some(long.to_owned()),
        None if arg.is_positional() => Some(arg.get_id().as_str().replace('_', "-")),
        None => None,
    }
}

type Located<T> = Result<T, (usize, Problem)>;

/// One key and its value, matched to its argument of `command` and checked; `line` finds a
/// byte offset's line.
fn setting(
    command: &Command,
    key: &Spanned<std::borrow::Cow<'_, str>>,
    value: &Spanned<DeValue<'_>>,
    base: &Path,
    line: impl Fn(usize) -> usize,
) -> Located<Setting> {
    let name = key.get_ref().to_string();
    let at_key = key.span().start;
    let arg = find(command, &name).map_err(|problem| (at_key, problem))?;
    let value = convert(command, arg, &name, value, base)?;
    Ok(Setting {
        key: name,
        line: line(at_key),
        id: arg.get_id().clone(),
        value,
    })
}

/// The argument of `command` that `key` names.
fn find<'c>(command: &'c Command, key: &str) -> Result<&'c Arg, Problem> {
    let arg = command
        .get_arguments()
        .find(|arg| key_of(arg).as_deref() == Some(key));
    let Some(arg) = arg else {
        if let Some(subcommand) = subcommand_with(command, key, command.get_name()) {
            return Err(Problem::SubcommandOnly {
                key: key.to_owned(),
                subcommand,
                command: command.get_name().to_owned(),
            });
        }
        return Err(Problem::UnknownKey {
            key: key.to_owned(),
            suggestion: suggestion(command, key),
        });
    };
    match arg.get_action() {
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version => {
            Err(Problem::NotSettable {
                key: key.to_owned(),
                why: "help and the version are asked for on the command line",
            })
        }
        _ if arg.get_id() == "config" => Err(Problem::NotSettable {
            key: key.to_owned(),
            why: "a config file cannot name another",
        }),
        _ => Ok(arg),
    }
}

/// The subcommand (as typed, `shroud key`) of `command` that has a flag `--key` of its own.
fn subcommand_with(command: &Command, key: &str, path: &str) -> Option<String> {
    for sub in command.get_subcommands() {
        let path = format!("{path} {}", sub.get_name());
        let own = sub
            .get_arguments()
            .any(|arg| !arg.is_global_set() && arg.get_long() == Some(key));
        if own {
            return Some(path);
        }
        if let Some(found) = subcommand_with(sub, key, &path) {
            return Some(found);
        }
    }
    None
}

/// The settable key of `command` closest to `key`, if one is close enough to be a typo.
fn suggestion(command: &Command, key: &str) -> Option<String> {
    command
        .get_arguments()
        .filter(|arg| {
            !matches!(
                arg.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            ) && arg.get_id() != "config"
        })
        .filter_map(key_of)
        .map(|candidate| (strsim::jaro_winkler(key, &candidate), candidate))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

/// The TOML type a scalar value of an argument must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Integer,
    Float,
    Boolean,
    String,
}

impl Scalar {
    fn of(arg: &Arg) -> Scalar {
        let ty = arg.get_value_parser().type_id();
        let integers = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<u128>(),
            TypeId::of::<usize>(),
            TypeId::of::<i8>(),
            TypeId::of::<i16>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
            TypeId::of::<i128>(),
            TypeId::of::<isize>(),
        ];
        if integers.iter().any(|id| ty == *id) {
            Scalar::Integer
        } else if ty == TypeId::of::<f64>() || ty == TypeId::of::<f32>() {
            Scalar::Float
        } else if ty == TypeId::of::<bool>() {
            Scalar::Boolean
        } else {
            Scalar::String
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scalar::Integer => "an integer",
            Scalar::Float => "a number",
            Scalar::Boolean => "true or false",
            Scalar::String => "a string",
        }
    }
}

/// A TOML type's name with its article, for messages.
fn found(value: &DeValue<'_>) -> &'static str {
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// `value` in the form `arg` takes it, or where and why not.
fn convert(
    command: &Command,
    arg: &Arg,
    key: &str,
    value: &Spanned<DeValue<'_>>,
    base: &Path,
) -> Located<Value> {
    let at = value.span().start;
    let wrong = |expected: &str, value: &Spanned<DeValue<'_>>| {
        (
            value.span().start,
            Problem::WrongType {
                key: key.to_owned(),
                expected: expected.to_owned(),
                found: found(value.get_ref()),
            },
        )
    };
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => {
            let DeValue::Boolean(on) = value.get_ref() else {
                return Err(wrong("true or false", value));
            };
            let pass = *on == matches!(arg.get_action(), ArgAction::SetTrue);
            Ok(Value::Switch { value: *on, pass })
        }
        ArgAction::Count => {
            let count = match value.get_ref() {
                DeValue::Integer(int) => integer(int).and_then(|n| u8::try_from(n).ok()),
                _ => return Err(wrong("a count (an integer)", value)),
            };
            let count = count.ok_or_else(|| {
                (
                    at,
                    Problem::InvalidValue {
                        key: key.to_owned(),
                        reason: "a count is from 0 to 255".to_owned(),
                    },
                )
            })?;
            Ok(Value::Count(count))
        }
        ArgAction::Set | ArgAction::Append => {
            let scalar = Scalar::of(arg);
            let delimiter = arg.get_value_delimiter();
            let multiple = matches!(arg.get_action(), ArgAction::Append) || delimiter.is_some();
            let elements: Vec<&Spanned<DeValue<'_>>> = match value.get_ref() {
                DeValue::Array(items) if multiple => items.iter().collect(),
                _ => vec![value],
            };
            let expected = if multiple {
                format!("{} or an array of them", scalar.name())
            } else {
                scalar.name().to_owned()
            };
            let mut occurrences = Vec::new();
            for element in elements {
                let text = scalar_text(scalar, element.get_ref())
                    .ok_or_else(|| wrong(&expected, element))?;
                let mut pieces = Vec::new();
                for piece in split(&text, delimiter) {
                    check(command, arg, key, scalar, piece)
                        .map_err(|problem| (element.span().start, problem))?;
                    pieces.push(resolve(arg, piece, base));
                }
                let joined = match delimiter {
                    Some(delimiter) => pieces.join(&delimiter.to_string()),
                    None => pieces.concat(),
                };
                occurrences.push(joined);
            }
            // A one-value flag given several values joins them, as its variable would be.
            if !matches!(arg.get_action(), ArgAction::Append) && occurrences.len() > 1 {
                let delimiter = delimiter.unwrap_or(',');
                occurrences = vec![occurrences.join(&delimiter.to_string())];
            }
            Ok(Value::Values {
                occurrences,
                delimiter,
            })
        }
        _ => Err((
            at,
            Problem::NotSettable {
                key: key.to_owned(),
                why: "its kind of flag has no value a file can give",
            },
        )),
    }
}

/// A TOML integer's value.
fn integer(int: &toml::de::DeInteger<'_>) -> Option<i128> {
    i128::from_str_radix(int.as_str(), int.radix()).ok()
}

/// The text of a scalar TOML value of the type `scalar` wants, as a command line would give
/// it; `None` for another type.
fn scalar_text(scalar: Scalar, value: &DeValue<'_>) -> Option<String> {
    match (scalar, value) {
        (Scalar::String, DeValue::String(text)) => Some(text.to_string()),
        (Scalar::Integer | Scalar::Float, DeValue::Integer(int)) => {
            integer(int).map(|n| n.to_string())
        }
        (Scalar::Float, DeValue::Float(float)) => Some(float.as_str().to_owned()),
        (Scalar::Boolean, DeValue::Boolean(on)) => Some(on.to_string()),
        _ => None,
    }
}

/// A path argument's relative value taken from the file's directory, `base`; any other value
/// as it is.
fn resolve(arg: &Arg, value: &str, base: &Path) -> String {
    let is_path = arg.get_value_parser().type_id() == TypeId::of::<PathBuf>();
    if !is_path || value.is_empty() || Path::new(value).is_absolute() {
        return value.to_owned();
    }
    base.join(value).to_string_lossy().into_owned()
}

/// Checks one value with `arg`'s own parser, as clap will parse it. The problem never holds
/// the value.
fn check(
    command: &Command,
    arg: &Arg,
    key: &str,
    scalar: Scalar,
    value: &str,
) -> Result<(), Problem> {
    let probe = Command::new(command.get_name().to_owned()).arg(
        Arg::new("value")
            .long("value")
            .value_parser(arg.get_value_parser().clone())
            .action(ArgAction::Set),
    );
    let Err(err) = probe.try_get_matches_from([
        OsString::from(command.get_name()),
        OsString::from(format!("--value={value}")),
    ]) else {
        return Ok(());
    };
    let value_name = arg
        .get_value_names()
        .and_then(|names| names.first())
        .map_or_else(|| "value".to_owned(), ToString::to_string);
    let mut reason = match arg.get_long() {
        Some(long) => format!("not a valid {value_name} for --{long}"),
        None => format!("not a valid {value_name}"),
    };
    let possible: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|value| !value.is_hide_set())
        .map(|value| value.get_name().to_owned())
        .collect();
    if !possible.is_empty() {
        reason.push_str(&format!(": expected one of {}", possible.join(", ")));
    } else if let Some(why) = std::error::Error::source(&err).map(ToString::to_string) {
        if let Some(why) = without_value(&why, value, scalar) {
            reason.push_str(&format!(": {why}"));
        }
    }
    Err(Problem::InvalidValue {
        key: key.to_owned(),
        reason,
    })
}

/// A parser's reason for refusing `value`, fit to show: an integer's value replaced by words,
/// and `None` when the reason repeats any other value.
fn without_value(reason: &str, value: &str, scalar: Scalar) -> Option<String> {
    if scalar == Scalar::Integer {
        // Numbers are no secret, but the rule is simple: no value in an error.
        let mut out = String::new();
        let mut rest = reason;
        while let Some(start) = rest.find(|c: char| c.is_ascii_digit() || c == '-') {
            out.push_str(&rest[..start]);
            let tail = &rest[start..];
            let len = tail
                .char_indices()
                .skip(1)
                .find(|(_, c)| !c.is_ascii_digit())
                .map_or(tail.len(), |(i, _)| i);
            let token = &tail[..len];
            let glued = out.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '.');
            out.push_str(if token == value && !glued {
                "the value"
            } else {
                token
            });
            rest = &tail[len..];
        }
        out.push_str(rest);
        return Some(out);
    }
    let escaped = format!("{value:?}");
    let escaped = escaped.trim_matches('"');
    (value.is_empty() || !(reason.contains(value) || reason.contains(escaped)))
        .then(|| reason.to_owned())
}
