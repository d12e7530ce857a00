#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::*;
use crate::logging::LogArgs;

/// A command shaped like shroud's: global log flags, `--config`, a subcommand that shares a
/// flag with the run, and run flags of every kind.
#[derive(Debug, Parser)]
#[command(
    name = "tool",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: Option<Run>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Shares --key with the run.
    Key(KeyArgs),
    /// Has a flag of its own.
    Other(OtherArgs),
}

#[derive(Debug, Args)]
struct KeyArgs {
    #[arg(long, env = "CFGTEST_KEY")]
    key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct OtherArgs {
    #[arg(long)]
    only_here: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Tor,
    Direct,
}

#[derive(Debug, Args)]
struct Run {
    #[arg(required_unless_present = "fleet_name", env = "CFGTEST_HOSTNAME")]
    hostname: Option<String>,
    #[arg(required_unless_present = "fleet_name", env = "CFGTEST_TARGET")]
    target: Option<String>,
    #[arg(long)]
    fleet_name: Option<String>,
    #[arg(long, required = true, env = "CFGTEST_NAME")]
    name: String,
    #[arg(long = "peer", value_delimiter = ',', env = "CFGTEST_PEER")]
    peers: Vec<String>,
    #[arg(long, env = "CFGTEST_SWITCH")]
    switch: bool,
    #[arg(long, default_value_t = 10, env = "CFGTEST_SECS",
          value_parser = clap::value_parser!(u64).range(1..=60))]
    secs: u64,
    #[arg(long, value_enum, default_value_t = Mode::Tor, env = "CFGTEST_MODE")]
    mode: Mode,
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, conflicts_with = "tls_cert")]
    acme: Option<String>,
    #[arg(long, env = "CFGTEST_RUN_KEY")]
    key: Option<PathBuf>,
    /// A parser whose error repeats the value, as some do.
    #[arg(long, value_parser = token)]
    token: Option<String>,
}

fn token(text: &str) -> Result<String, String> {
    if text.starts_with("tok-") {
        Ok(text.to_owned())
    } else {
        Err(format!("{text:?} does not start with tok-"))
    }
}

/// A config file in a directory of its own.
struct File {
    dir: tempfile::TempDir,
    path: PathBuf,
}

fn file(text: &str) -> File {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tool.toml");
    std::fs::write(&path, text).unwrap();
    File { dir, path }
}

impl File {
    fn arg(&self) -> String {
        format!("--config={}", self.path.display())
    }
}

fn parse(args: &[&str]) -> Result<Parsed<Cli>, Error> {
    try_parse_from::<Cli, _, _>(std::iter::once("tool").chain(args.iter().copied()))
}

fn run(args: &[&str]) -> Run {
    let parsed = parse(args).unwrap_or_else(|err| panic!("{args:?}: {err}"));
    parsed.cli.run.expect("a run")
}

/// The problem and line of a file error.
fn file_error(args: &[&str]) -> (usize, Problem, String) {
    match parse(args) {
        Err(err @ Error::File { .. }) => {
            let text = err.to_string();
            let Error::File { line, problem, .. } = err else {
                unreachable!()
            };
            (line, problem, text)
        }
        other => panic!("{args:?}: not a file error: {other:?}"),
    }
}

const NAMES: &str = "hostname = \"app.example\"\ntarget = \"127.0.0.1:443\"\nname = \"n\"\n";

#[test]
fn the_test_command_is_well_formed() {
    use clap::CommandFactory as _;
    Cli::command().debug_assert();
}

#[test]
fn without_a_file_it_is_clap() {
    let run = run(&["--name=n", "app.example", "127.0.0.1:1"]);
    assert_eq!(run.name, "n");
    assert_eq!(run.secs, 10);
    let err = parse(&["app.example"]).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(matches!(err, Error::Usage { note: None, .. }), "{err}");
}

#[test]
fn every_kind_of_value_comes_from_the_file() {
    let config = file(&format!(
        "{NAMES}\
         peer = [\"a.example:7443\", \"b.example:7443\"]\n\
         switch = true\n\
         secs = 20\n\
         mode = \"direct\"\n\
         listen = \"127.0.0.1:8443\"\n\
         verbose = 2\n\
         log-format = \"json\"\n\
         token = \"tok-1\"\n"
    ));
    let parsed = parse(&[&config.arg()]).unwrap();
    assert_eq!(parsed.file.as_deref(), Some(config.path.as_path()));
    assert_eq!(parsed.cli.log.verbose, 2);
    assert_eq!(parsed.cli.log.log_format, crate::logging::LogFormat::Json);
    let run = parsed.cli.run.unwrap();
    assert_eq!(run.hostname.as_deref(), Some("app.example"));
    assert_eq!(run.target.as_deref(), Some("127.0.0.1:443"));
    assert_eq!(run.name, "n");
    assert_eq!(run.peers, ["a.example:7443", "b.example:7443"]);
    assert!(run.switch);
    assert_eq!(run.secs, 20);
    assert_eq!(run.mode, Mode::Direct);
    assert_eq!(run.listen, Some("127.0.0.1:8443".parse().unwrap()));
    assert_eq!(run.token.as_deref(), Some("tok-1"));
}

#[test]
fn a_list_may_be_one_string_split_as_its_variable_is() {
    let config = file(&format!("{NAMES}peer = \"a:1,b:2\"\n"));
    assert_eq!(run(&[&config.arg()]).peers, ["a:1", "b:2"]);
    let config = file(&format!("{NAMES}peer = []\n"));
    assert!(run(&[&config.arg()]).peers.is_empty());
}

#[test]
fn the_command_line_beats_the_file_for_every_kind() {
    let config = file(&format!(
        "{NAMES}peer = [\"file:1\"]\nswitch = false\nsecs = 20\nmode = \"direct\"\n\
         verbose = 2\ntoken = \"tok-file\"\n"
    ));
    let parsed = parse(&[
        &config.arg(),
        "--peer=cli:1",
        "--switch",
        "--secs=5",
        "--mode=tor",
        "-v",
        "--token=tok-cli",
        "--name=cli",
        "cli.example",
        "127.0.0.1:2",
    ])
    .unwrap();
    assert_eq!(parsed.cli.log.verbose, 1);
    let run = parsed.cli.run.unwrap();
    assert_eq!(run.peers, ["cli:1"]);
    assert!(run.switch, "false in the file does not undo the flag");
    assert_eq!(run.secs, 5);
    assert_eq!(run.mode, Mode::Tor);
    assert_eq!(run.token.as_deref(), Some("tok-cli"));
    assert_eq!(run.name, "cli");
    assert_eq!(run.hostname.as_deref(), Some("cli.example"));
    assert_eq!(run.target.as_deref(), Some("127.0.0.1:2"));
}

#[test]
fn a_flag_that_conflicts_with_a_file_key_wins() {
    // -q and -v conflict: -q on the command line sets the file's verbose aside.
    let config = file(&format!("{NAMES}verbose = 2\n"));
    let parsed = parse(&[&config.arg(), "-q"]).unwrap();
    assert_eq!((parsed.cli.log.verbose, parsed.cli.log.quiet), (0, 1));
}

#[test]
fn a_file_value_of_the_command_lines_positional_is_a_default() {
    // HOSTNAME on the command line, TARGET from the file.
    let config = file("target = \"127.0.0.1:443\"\nname = \"n\"\n");
    let both = run(&[&config.arg(), "cli.example"]);
    assert_eq!(both.hostname.as_deref(), Some("cli.example"));
    assert_eq!(both.target.as_deref(), Some("127.0.0.1:443"));
    // With --fleet-name, TARGET alone.
    let config = file("target = \"127.0.0.1:443\"\nname = \"n\"\nfleet-name = \"f.example\"\n");
    let fleet = run(&[&config.arg()]);
    assert_eq!(fleet.hostname, None);
    assert_eq!(fleet.target.as_deref(), Some("127.0.0.1:443"));
}

#[test]
fn a_required_flag_may_come_from_the_file_alone() {
    let config = file("name = \"from-file\"\nhostname = \"a.example\"\ntarget = \"h:1\"\n");
    assert_eq!(run(&[&config.arg()]).name, "from-file");
    // Without it anywhere, clap's own error, naming the flag.
    let config = file("hostname = \"a.example\"\ntarget = \"h:1\"\n");
    let err = parse(&[&config.arg()]).unwrap_err();
    let Error::Usage { error, note } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        error.kind(),
        clap::error::ErrorKind::MissingRequiredArgument
    );
    assert!(error.to_string().contains("--name"), "{err}");
    let note = note.as_deref().unwrap();
    assert!(note.contains("hostname (line 1)"), "{note}");
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn relations_between_flags_hold_for_the_file() {
    // --tls-cert requires --tls-key, from the file as on the command line.
    let config = file(&format!("{NAMES}tls-cert = \"cert.pem\"\n"));
    let err = parse(&[&config.arg()]).unwrap_err();
    let Error::Usage { error, note } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(
        error.kind(),
        clap::error::ErrorKind::MissingRequiredArgument
    );
    assert!(error.to_string().contains("--tls-key"), "{err}");
    assert!(
        note.as_deref().unwrap().contains("tls-cert (line 4)"),
        "{err}"
    );
    // And the file's --acme conflicts with its own --tls-cert.
    let config = file(&format!(
        "{NAMES}tls-cert = \"c.pem\"\ntls-key = \"k.pem\"\nacme = \"me@example.com\"\n"
    ));
    let err = parse(&[&config.arg()]).unwrap_err();
    let Error::Usage { error, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
}

#[test]
fn relative_paths_are_taken_from_the_files_directory() {
    let config = file(&format!(
        "{NAMES}tls-cert = \"certs/cert.pem\"\ntls-key = \"/abs/key.pem\"\n"
    ));
    let parsed = run(&[&config.arg()]);
    assert_eq!(
        parsed.tls_cert.as_deref(),
        Some(config.dir.path().join("certs/cert.pem").as_path())
    );
    assert_eq!(parsed.tls_key.as_deref(), Some(Path::new("/abs/key.pem")));
    // A path on the command line stays as given, relative to the working directory.
    let parsed = run(&[&config.arg(), "--tls-cert=mine.pem"]);
    assert_eq!(parsed.tls_cert.as_deref(), Some(Path::new("mine.pem")));
    // Strings that are not paths are not touched.
    let config = file(&format!("{NAMES}acme = \"me@example.com\"\n"));
    assert_eq!(
        run(&[&config.arg()]).acme.as_deref(),
        Some("me@example.com")
    );
}

#[test]
fn a_relative_config_path_is_made_absolute() {
    let config = file(NAMES);
    let cwd = std::env::current_dir().unwrap();
    let relative = pathdiff(&config.path, &cwd);
    let parsed = parse(&[&format!("--config={}", relative.display())]).unwrap();
    let file = parsed.file.unwrap();
    assert!(file.is_absolute(), "{}", file.display());
    assert_eq!(
        file.canonicalize().unwrap(),
        config.path.canonicalize().unwrap()
    );
}

/// `path` relative to `base`, through `..` as needed.
fn pathdiff(path: &Path, base: &Path) -> PathBuf {
    let ups = base.components().count() - 1;
    let mut out = PathBuf::new();
    for _ in 0..ups {
        out.push("..");
    }
    out.join(path.strip_prefix("/").unwrap())
}

#[test]
fn an_unknown_key_is_refused_with_its_line_and_a_suggestion() {
    let config = file(&format!("{NAMES}\n# a comment\nsecz = 20\n"));
    let (line, problem, text) = file_error(&[&config.arg()]);
    assert_eq!(line, 6);
    assert_eq!(
        problem,
        Problem::UnknownKey {
            key: "secz".to_owned(),
            suggestion: Some("secs".to_owned())
        }
    );
    assert!(
        text.starts_with(&format!("{}:6: unknown key `secz`", config.path.display())),
        "{text}"
    );
    assert!(text.contains("did you mean `secs`?"), "{text}");
    let err = parse(&[&config.arg()]).unwrap_err();
    assert_eq!(err.exit_code(), 2);

    let config = file(&format!("{NAMES}[section]\nsecs = 1\n"));
    let (line, problem, _) = file_error(&[&config.arg()]);
    assert_eq!(line, 4);
    assert!(
        matches!(problem, Problem::UnknownKey { ref key, .. } if key == "section"),
        "{problem:?}"
    );
}

#[test]
fn a_value_of_the_wrong_type_is_refused_with_its_line() {
    for (text, key, expected, found) in [
        ("secs = \"20\"", "secs", "an integer", "a string"),
        ("switch = \"yes\"", "switch", "true or false", "a string"),
        (
            "verbose = true",
            "verbose",
            "a count (an integer)",
            "a boolean",
        ),
        ("name = 5", "name", "a string", "an integer"),
        ("name = [\"a\"]", "name", "a string", "an array"),
        (
            "peer = 5",
            "peer",
            "a string or an array of them",
            "an integer",
        ),
        (
            "peer = [\"a\", 5]",
            "peer",
            "a string or an array of them",
            "an integer",
        ),
        ("listen = { a = 1 }", "listen", "a string", "a table"),
        ("name = 1979-05-27", "name", "a string", "a date-time"),
    ] {
        let config = file(&format!("hostname = \"a\"\ntarget = \"b\"\n{text}\n"));
        let (line, problem, message) = file_error(&[&config.arg()]);
        assert_eq!(line, 3, "{text}");
        assert_eq!(
            problem,
            Problem::WrongType {
                key: key.to_owned(),
                expected: expected.to_owned(),
                found,
            },
            "{text}"
        );
        assert!(
            message.contains(&format!("`{key}` takes {expected}")),
            "{message}"
        );
    }
}

#[test]
fn a_value_the_flag_refuses_is_reported_without_the_value() {
    for (text, says) in [
        (
            "secs = 61",
            "not a valid SECS for --secs: the value is not in 1..=60",
        ),
        (
            "secs = 0",
            "not a valid SECS for --secs: the value is not in 1..=60",
        ),
        (
            "mode = \"onion\"",
            "not a valid MODE for --mode: expected one of tor, direct",
        ),
        (
            "listen = \"here\"",
            "not a valid ADDR for --listen: invalid socket address syntax",
        ),
        ("verbose = 300", "a count is from 0 to 255"),
        (
            "token = \"hunter2-secret\"",
            "not a valid TOKEN for --token",
        ),
        ("peer = [\"ok:1\", \"\"]", ""),
    ] {
        let config = file(&format!("{NAMES}\n\n{text}\n"));
        let result = parse(&[&config.arg()]);
        if says.is_empty() {
            // An empty list element is a value like any other; the flag takes it.
            assert!(result.is_ok(), "{text}: {result:?}");
            continue;
        }
        let (line, problem, message) = file_error(&[&config.arg()]);
        assert_eq!(line, 6, "{text}");
        assert!(
            matches!(problem, Problem::InvalidValue { .. }),
            "{problem:?}"
        );
        assert!(message.ends_with(says), "{text}: {message}");
        let value = text.split('=').nth(1).unwrap().trim().trim_matches('"');
        let words: Vec<&str> = message
            .split(|c: char| c.is_whitespace() || c == ':')
            .collect();
        assert!(!words.contains(&value), "{text}: the value is in {message}");
        assert!(!message.contains("hunter2"), "{message}");
    }
}

#[test]
fn a_list_elements_line_is_its_own() {
    let config = file(&format!("{NAMES}peer = [\n  \"a:1\",\n  5,\n]\n"));
    let (line, problem, _) = file_error(&[&config.arg()]);
    assert_eq!(line, 6);
    assert!(matches!(problem, Problem::WrongType { .. }), "{problem:?}");
}

#[test]
fn keys_a_file_may_not_set_are_refused_with_their_line() {
    for (text, says) in [
        ("help = true", "`help` cannot be set in a config file"),
        ("version = true", "`version` cannot be set in a config file"),
        (
            "config = \"other.toml\"",
            "`config` cannot be set in a config file",
        ),
        (
            "only-here = \"x\"",
            "`only-here` is a flag of `tool other` only; a config file sets the flags of `tool`",
        ),
    ] {
        let config = file(&format!("{NAMES}{text}\n"));
        let (line, _, message) = file_error(&[&config.arg()]);
        assert_eq!(line, 4, "{text}");
        assert!(message.contains(says), "{text}: {message}");
    }
}

#[test]
fn a_syntax_error_names_its_line_and_not_the_value() {
    let config = file(&format!("{NAMES}token = \"tok-secret\nsecs = 3\n"));
    let (line, problem, message) = file_error(&[&config.arg()]);
    assert_eq!(line, 4);
    assert!(matches!(problem, Problem::Syntax(_)), "{problem:?}");
    assert!(!message.contains("tok-secret"), "{message}");

    let config = file("secs = 1\nsecs = 2\n");
    let (line, problem, _) = file_error(&[&config.arg()]);
    assert_eq!(line, 2, "{problem:?}");
}

#[test]
fn a_file_that_is_not_text_or_too_large_or_missing_is_refused() {
    let config = file("name = \"n\"\n");
    std::fs::write(&config.path, b"name = \"n\"\nhostname = \"\xff\"\n").unwrap();
    let (line, problem, _) = file_error(&[&config.arg()]);
    assert_eq!((line, problem), (2, Problem::NotUtf8));

    let padding = "# padding\n".repeat((MAX_FILE_BYTES / 10 + 1) as usize);
    std::fs::write(&config.path, padding).unwrap();
    let err = parse(&[&config.arg()]).unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 2);

    std::fs::remove_file(&config.path).unwrap();
    let err = parse(&[&config.arg()]).unwrap_err();
    assert!(matches!(err, Error::Read { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 2);
}

#[test]
fn a_subcommand_takes_only_the_flags_it_shares_and_the_global_ones() {
    let config = file(&format!(
        "{NAMES}key = \"client.key\"\nsecs = 20\nverbose = 1\n"
    ));
    let parsed = parse(&["key", &config.arg()]).unwrap();
    assert!(parsed.cli.run.is_none());
    assert_eq!(parsed.cli.log.verbose, 1);
    let Some(Sub::Key(args)) = parsed.cli.command else {
        panic!("{:?}", parsed.cli.command)
    };
    assert_eq!(args.key, Some(config.dir.path().join("client.key")));

    // Its own command line still wins, and the file's other keys are no error.
    let parsed = parse(&["key", "--key=mine.key", "-q", &config.arg()]).unwrap();
    assert_eq!((parsed.cli.log.verbose, parsed.cli.log.quiet), (0, 1));
    let Some(Sub::Key(args)) = parsed.cli.command else {
        panic!()
    };
    assert_eq!(args.key.as_deref(), Some(Path::new("mine.key")));

    // A subcommand that shares nothing runs as without the file.
    let parsed = parse(&["other", &config.arg()]).unwrap();
    assert!(matches!(
        parsed.cli.command,
        Some(Sub::Other(OtherArgs { only_here: None }))
    ));

    // A broken file is refused all the same: it is named on this command line.
    let config = file("secz = 1\n");
    let (line, _, _) = file_error(&["key", &config.arg()]);
    assert_eq!(line, 1);
}

#[test]
fn help_and_version_need_no_valid_file() {
    let config = file("secz = 1\n");
    for flag in ["--help", "--version"] {
        let err = parse(&[&config.arg(), flag]).unwrap_err();
        assert_eq!(err.exit_code(), 0, "{flag}");
    }
}

#[test]
fn reading_again_sees_the_new_file() {
    let config = file(&format!("{NAMES}secs = 20\n"));
    let args = ["tool".to_owned(), config.arg()];
    let first = try_parse_from::<Cli, _, _>(&args).unwrap();
    assert_eq!(first.cli.run.unwrap().secs, 20);
    std::fs::write(&config.path, format!("{NAMES}secs = 30\n")).unwrap();
    let second = try_parse_from::<Cli, _, _>(&args).unwrap();
    assert_eq!(second.cli.run.unwrap().secs, 30);
    std::fs::write(&config.path, format!("{NAMES}secs = 30\nsecz = 1\n")).unwrap();
    let err = try_parse_from::<Cli, _, _>(&args).unwrap_err();
    assert!(matches!(err, Error::File { line: 5, .. }), "{err}");
}

/// Runs `check` in a child process of this test binary with `env` set, and asserts that it
/// passed there. clap reads variables from the process's environment, and setting them in
/// this multi-threaded process would race the other tests.
fn with_env(test: &str, env: &[(&str, &str)], check: impl FnOnce()) {
    const CHILD: &str = "CFGTEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        check();
        return;
    }
    let name = format!("config::tests::{test}");
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &name, "--test-threads=1", "--nocapture"])
        .env(CHILD, "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{name} with {env:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

const ENV_FILE: &str = "hostname = \"file.example\"\ntarget = \"127.0.0.1:9\"\nname = \"file\"\n\
                        peer = [\"file:1\"]\nswitch = true\nsecs = 20\nmode = \"direct\"\n";

#[test]
fn the_environment_beats_the_file_for_every_kind() {
    let config = file(ENV_FILE);
    let path = config.path.display().to_string();
    with_env(
        "the_environment_beats_the_file_for_every_kind",
        &[
            ("SHROUD_CONFIG", &path),
            ("CFGTEST_NAME", "env"),
            ("CFGTEST_PEER", "env:1,env:2"),
            ("CFGTEST_SWITCH", "false"),
            ("CFGTEST_SECS", "7"),
            ("CFGTEST_MODE", "tor"),
            ("CFGTEST_HOSTNAME", "env.example"),
        ],
        || {
            // The file is found through SHROUD_CONFIG.
            let parsed = parse(&[]).unwrap();
            assert!(parsed.file.is_some());
            let from_env = parsed.cli.run.unwrap();
            assert_eq!(from_env.name, "env");
            assert_eq!(from_env.peers, ["env:1", "env:2"]);
            assert!(
                !from_env.switch,
                "the variable's false beats the file's true"
            );
            assert_eq!(from_env.secs, 7);
            assert_eq!(from_env.mode, Mode::Tor);
            // HOSTNAME from the environment, TARGET after it from the file.
            assert_eq!(from_env.hostname.as_deref(), Some("env.example"));
            assert_eq!(from_env.target.as_deref(), Some("127.0.0.1:9"));
            // And the command line beats both.
            let cli = run(&["--secs=5", "--name=cli"]);
            assert_eq!((cli.secs, cli.name.as_str()), (5, "cli"));
        },
    );
}

#[test]
fn a_switch_in_the_environment_is_not_undone_by_the_file() {
    let config = file(&format!("{NAMES}switch = false\n"));
    let path = config.path.display().to_string();
    with_env(
        "a_switch_in_the_environment_is_not_undone_by_the_file",
        &[("SHROUD_CONFIG", &path), ("CFGTEST_SWITCH", "true")],
        || assert!(run(&[]).switch),
    );
}

#[test]
fn the_subcommand_takes_its_variable_before_the_file() {
    let config = file("key = \"file.key\"\n");
    let path = config.path.display().to_string();
    with_env(
        "the_subcommand_takes_its_variable_before_the_file",
        &[("SHROUD_CONFIG", &path), ("CFGTEST_KEY", "/env.key")],
        || {
            let parsed = parse(&["key"]).unwrap();
            let Some(Sub::Key(args)) = parsed.cli.command else {
                panic!()
            };
            assert_eq!(args.key.as_deref(), Some(Path::new("/env.key")));
        },
    );
}
