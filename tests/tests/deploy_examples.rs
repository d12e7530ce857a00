#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Every example under `deploy/` is parsed here, so the examples an operator copies cannot
//! drift from what the binaries accept: the authorized file goes through the proxy's policy
//! parser, and every `SHROUD_*` variable the examples and units name must be one that the
//! client's or the proxy's command line reads. The settings a unit and its environment file
//! give are also fed through the real clap parser, as the binary would see them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;
use shroud_mux::auth::PublicKey;
use shroud_proxy::policy::Policy;

/// The example keys of `deploy/authorized.example`, in the order the file lists them.
const ALICE: &str = "ed25519:kI73R8w7TTovoaZ6l9EhcdEGARj7D5gGEnCj0EZHf2s";
const BOB: &str = "ed25519:Oh_SbfYYuooiUerjh9dLcONi5Jh0s3n-2JNlAW8OSRo";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(relative: &str) -> String {
    let path = deploy_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn key(text: &str) -> PublicKey {
    text.parse().unwrap()
}

#[test]
fn authorized_example_parses_and_means_what_its_comments_say() {
    let text = read("authorized.example");
    let policy = Policy::parse(&text).unwrap();
    assert_eq!(policy.len(), 2, "one exact binding and one wildcard");

    // The keys in the file are the ones this test knows, uncommented exactly once each.
    let bindings: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(
        bindings.len(),
        2,
        "binding lines in authorized.example: {bindings:?}"
    );
    assert!(bindings[0].ends_with(ALICE), "{}", bindings[0]);
    assert!(bindings[1].ends_with(BOB), "{}", bindings[1]);

    let (alice, bob) = (key(ALICE), key(BOB));

    // The exact line: that name and nothing else.
    assert!(policy.allows("blog.example.org", &alice));
    assert!(!policy.allows("www.blog.example.org", &alice));
    assert!(!policy.allows("example.org", &alice));
    assert!(!policy.allows("blog.example.org", &bob));

    // The wildcard line: every name below example.com, at any depth, but not the apex, whose
    // line is commented out.
    assert!(policy.allows("app.example.com", &bob));
    assert!(policy.allows("api.eu.example.com", &bob));
    assert!(!policy.allows("example.com", &bob));
    assert!(!policy.allows("app.example.com", &alice));
    assert!(!policy.allows("example.com.evil.test", &bob));

    // The commented-out apex line does what its comment says once uncommented.
    let uncommented = text.replace(
        &format!("# example.com       {BOB}"),
        &format!("example.com {BOB}"),
    );
    assert_ne!(uncommented, text, "the commented-out apex line moved");
    let policy = Policy::parse(&uncommented).unwrap();
    assert_eq!(policy.len(), 3);
    assert!(policy.allows("example.com", &bob));
    assert!(policy.allows("app.example.com", &bob));
}

/// Every file under `deploy/`, relative to it.
fn deploy_files() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, base, out);
            } else {
                let relative = path.strip_prefix(base).unwrap();
                out.push(relative.to_str().unwrap().to_owned());
            }
        }
    }
    let base = deploy_dir();
    let mut files = Vec::new();
    walk(&base, &base, &mut files);
    files.sort();
    files
}

/// Every `SHROUD_NAME` in `text`. A bare `SHROUD_` (as in "SHROUD_*") names no variable.
fn shroud_names(text: &str) -> BTreeSet<String> {
    let is_name_char = |c: char| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_';
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("SHROUD_") {
        let glued = text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if glued {
            continue;
        }
        let rest = &text[at + "SHROUD_".len()..];
        let tail: String = rest.chars().take_while(|&c| is_name_char(c)).collect();
        if !tail.is_empty() {
            names.insert(format!("SHROUD_{tail}"));
        }
    }
    names
}

/// The environment variables a clap command (and its subcommands) reads.
fn env_names(command: &clap::Command) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|env| env.to_str().unwrap().to_owned())
        .collect();
    for sub in command.get_subcommands() {
        names.extend(env_names(sub));
    }
    names
}

fn client_env() -> BTreeSet<String> {
    env_names(&shroud_client::cli::Cli::command())
}

fn proxy_env() -> BTreeSet<String> {
    env_names(&shroud_proxy::cli::Cli::command())
}

#[test]
fn the_clis_read_the_variables_this_test_expects() {
    // Guards the test itself: if clap stopped reporting env names, every check below would
    // pass vacuously.
    let client = client_env();
    for name in [
        "SHROUD_HOSTNAME",
        "SHROUD_TARGET",
        "SHROUD_PROXY",
        "SHROUD_KEY",
    ] {
        assert!(client.contains(name), "{name} not in {client:?}");
    }
    let proxy = proxy_env();
    for name in [
        "SHROUD_TUNNEL_NAME",
        "SHROUD_AUTHORIZED",
        "SHROUD_LISTEN_HTTPS",
    ] {
        assert!(proxy.contains(name), "{name} not in {proxy:?}");
    }
}

#[test]
fn every_shroud_variable_in_deploy_is_a_real_one() {
    let known: BTreeSet<String> = client_env().union(&proxy_env()).cloned().collect();
    let files = deploy_files();
    for expected in [
        "README.md",
        "authorized.example",
        "shroud.env.example",
        "systemd/shroud-proxy.service",
        "systemd/shroud@.service",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "{expected} in {files:?}"
        );
    }
    let mut unknown = Vec::new();
    for file in &files {
        for name in shroud_names(&read(file)) {
            if !known.contains(&name) {
                unknown.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "variables that neither CLI reads: {unknown:?}"
    );

    // The files meant for one binary name only that binary's variables.
    let client = client_env();
    for file in ["shroud.env.example", "systemd/shroud@.service"] {
        let names = shroud_names(&read(file));
        assert!(!names.is_empty(), "{file} names no variable");
        for name in names {
            assert!(
                client.contains(&name),
                "{file}: {name} is not a client variable"
            );
        }
    }
    let proxy = proxy_env();
    let names = shroud_names(&read("systemd/shroud-proxy.service"));
    assert!(!names.is_empty());
    for name in names {
        assert!(
            proxy.contains(&name),
            "shroud-proxy.service: {name} is not a proxy variable"
        );
    }
}

/// The `KEY=VALUE` pairs of a unit's `Environment=` lines, with `%i` standing for `instance`.
fn unit_environment(unit: &str, instance: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix("Environment="))
        .map(|assignment| {
            // One unquoted assignment per line keeps these units simple to read and to check.
            assert!(
                !assignment.contains(char::is_whitespace) && !assignment.contains('"'),
                "write one unquoted assignment per Environment= line: {assignment}"
            );
            let (name, value) = assignment.split_once('=').unwrap();
            (name.to_owned(), value.replace("%i", instance))
        })
        .collect()
}

/// The `KEY=VALUE` lines of an environment file. With `commented_too`, also the assignments
/// that are commented out (`#SHROUD_...=...`), which document optional settings.
fn env_file(text: &str, commented_too: bool) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for line in text.lines().map(str::trim) {
        let line = match line.strip_prefix('#') {
            Some(rest) if commented_too && rest.starts_with(|c: char| c.is_ascii_uppercase()) => {
                rest
            }
            Some(_) => continue,
            None if line.is_empty() => continue,
            None => line,
        };
        let Some((name, value)) = line.split_once('=') else {
            if commented_too {
                continue;
            }
            panic!("not NAME=value: {line}");
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'),
            "not a variable name: {name}"
        );
        assert!(
            !value.contains(['"', '\'', '$', ' ']),
            "keep values plain: {line}"
        );
        pairs.push((name.to_owned(), value.to_owned()));
    }
    pairs
}

/// Turns environment settings into the argument list they stand for, so that the real parser
/// checks their values. Later settings override earlier ones, as in systemd.
fn to_args(command: &clap::Command, program: &str, env: &[(String, String)]) -> Vec<String> {
    let mut settings: Vec<(String, String)> = Vec::new();
    for (name, value) in env {
        settings.retain(|(n, _)| n != name);
        settings.push((name.clone(), value.clone()));
    }
    let mut options = Vec::new();
    let mut positionals = Vec::new();
    for (name, value) in settings {
        if !name.starts_with("SHROUD_") {
            continue;
        }
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_env().is_some_and(|env| env == name.as_str()))
            .unwrap_or_else(|| panic!("{program} reads no {name}"));
        match arg.get_long() {
            Some(long) => options.push(format!("--{long}={value}")),
            None => positionals.push((arg.get_index().unwrap(), value)),
        }
    }
    positionals.sort();
    let mut args = vec![program.to_owned()];
    args.extend(options);
    args.extend(positionals.into_iter().map(|(_, value)| value));
    args
}

#[test]
fn the_client_unit_and_env_example_make_a_valid_command_line() {
    let unit = read("systemd/shroud@.service");
    assert!(unit.contains("EnvironmentFile=/etc/shroud/%i.env"));
    let instance = "my-app.example.com";
    let mut command = shroud_client::cli::Cli::command();
    // Building numbers the positional arguments.
    command.build();
    let example = read("shroud.env.example");

    for commented_too in [false, true] {
        let mut env = unit_environment(&unit, instance);
        env.extend(env_file(&example, commented_too));
        let args = to_args(&command, "shroud", &env);
        let cli: shroud_client::cli::Cli = parse(&args);
        let run = cli.run.expect("run arguments");
        assert_eq!(run.hostname, instance);
        assert_eq!(
            run.key.as_deref(),
            Some(Path::new("/var/lib/shroud/client.key"))
        );
        assert!(run.proxy.len() >= 2, "{:?}", run.proxy);
        for proxy in &run.proxy {
            shroud_client::cli::parse_proxy(proxy).unwrap();
        }
        shroud_client::cli::parse_target(&run.target).unwrap();
        if commented_too {
            assert!(run.http_target.is_some() && run.tls_cert.is_some());
            assert_eq!(run.resolve.len(), 1);
        }
    }
}

#[test]
fn the_proxy_unit_makes_a_valid_command_line() {
    let unit = read("systemd/shroud-proxy.service");
    let command = shroud_proxy::cli::Cli::command();
    let mut env = unit_environment(&unit, "unused");
    // The one setting every proxy must give in /etc/shroud/proxy.env.
    assert!(unit.contains("EnvironmentFile=/etc/shroud/proxy.env"));
    env.push((
        "SHROUD_TUNNEL_NAME".to_owned(),
        "proxy1.example.net".to_owned(),
    ));
    let args = to_args(&command, "shroud-proxy", &env);
    let cli: shroud_proxy::cli::Cli = parse(&args);
    assert_eq!(cli.listen_https.map(|a| a.port()), Some(443));
    assert_eq!(cli.listen_http.map(|a| a.port()), Some(80));

    // systemd must wait longer than the drain before it sends SIGKILL.
    let stop = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec");
    let stop: u64 = stop.trim().parse().unwrap();
    assert!(
        stop > cli.drain_timeout_secs,
        "TimeoutStopSec={stop} <= drain {}",
        cli.drain_timeout_secs
    );
    assert!(unit.contains("KillSignal=SIGTERM"));
}

/// Parses `args` as the binary would, naming them if they are refused.
fn parse<T: clap::Parser>(args: &[String]) -> T {
    T::try_parse_from(args).unwrap_or_else(|err| panic!("{args:?}: {err}"))
}
