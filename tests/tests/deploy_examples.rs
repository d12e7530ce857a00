#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
//! Every example under `deploy/` is parsed here, so the examples an operator copies cannot
//! drift from what the binaries accept: the authorized file goes through the proxy's policy
//! parser, the fleet file through the discovery service's, the zone file through a real zone
//! parser (and its records through the client's, the proxy's and the discovery service's own
//! DNS code, served by a DNS server on 127.0.0.1), and every `SHROUD_*` variable the examples
//! and units name must be one that the client's, the proxy's or the discovery service's
//! command line reads. Each config file goes through its binary's real loader
//! (`shroud_process::config`) with the unit's own arguments and environment, as shipped and with
//! every optional setting uncommented, and its values must come out as its comments say.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::CommandFactory as _;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::txt::Parser as ZoneParser;
use shroud_discovery::fleet::{Fleet, FleetFile};
use shroud_mux::auth::PublicKey;
use shroud_proxy::policy::Policy;
use shroud_tests::dns::TestDns;
use shroud_tests::{init, within};

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

fn discovery_env() -> BTreeSet<String> {
    env_names(&shroud_discovery::cli::Cli::command())
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
        "SHROUD_DISCOVERY",
        "SHROUD_FLEET_SECRET_FILE",
    ] {
        assert!(proxy.contains(name), "{name} not in {proxy:?}");
    }
    let discovery = discovery_env();
    for name in [
        "SHROUD_DISCOVERY_LISTEN",
        "SHROUD_DISCOVERY_SIGNING_KEY",
        "SHROUD_DISCOVERY_FLEET_SECRET_FILE",
    ] {
        assert!(discovery.contains(name), "{name} not in {discovery:?}");
    }
}

#[test]
fn every_shroud_variable_in_deploy_is_a_real_one() {
    let known: BTreeSet<String> = client_env()
        .into_iter()
        .chain(proxy_env())
        .chain(discovery_env())
        .collect();
    let files = deploy_files();
    for expected in [
        "README.md",
        "authorized.example",
        "fleet.example.toml",
        "shroud-discovery.toml",
        "shroud-proxy.toml",
        "shroud.toml",
        "systemd/shroud-discovery.service",
        "systemd/shroud-proxy.service",
        "systemd/shroud-proxy.service.d/discovery.conf",
        "systemd/shroud-proxy.service.d/onion.conf",
        "systemd/shroud@.service",
        "zone.example",
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
    // The top-level README documents the same variables.
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme).unwrap();
    for name in shroud_names(&readme) {
        if !known.contains(&name) {
            unknown.push(format!("../README.md: {name}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "variables that no CLI reads: {unknown:?}"
    );

    // The files meant for one binary name only that binary's variables.
    let client = client_env();
    for file in ["shroud.toml", "systemd/shroud@.service"] {
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
    for file in [
        "shroud-proxy.toml",
        "systemd/shroud-proxy.service",
        "systemd/shroud-proxy.service.d/discovery.conf",
        "systemd/shroud-proxy.service.d/onion.conf",
    ] {
        let names = shroud_names(&read(file));
        assert!(!names.is_empty(), "{file} names no variable");
        for name in names {
            assert!(
                proxy.contains(&name),
                "{file}: {name} is not a proxy variable"
            );
        }
    }
    // The discovery service's variables all start SHROUD_DISCOVERY_, but so do the client's
    // SHROUD_DISCOVERY_KEY and the proxy's SHROUD_DISCOVERY_CA: the prefix alone proves
    // nothing.
    let discovery = discovery_env();
    for file in ["shroud-discovery.toml", "systemd/shroud-discovery.service"] {
        let names = shroud_names(&read(file));
        assert!(!names.is_empty(), "{file} names no variable");
        for name in names {
            assert!(
                discovery.contains(&name),
                "{file}: {name} is not a discovery service variable"
            );
        }
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

/// The arguments of a unit's `ExecStart=` line after the program, with `%i` standing for
/// `instance`.
fn unit_arguments(unit: &str, program: &str, instance: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    let mut words = line.split_whitespace();
    assert_eq!(
        words.next(),
        Some(format!("/usr/local/bin/{program}").as_str())
    );
    words.map(|word| word.replace("%i", instance)).collect()
}

/// Turns environment settings into the argument list they stand for, so that the real parser
/// checks their values. Later settings override earlier ones, as in systemd. Options come
/// first, then positional arguments.
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
            // A flag (`--srv`, `--authorize-dns`): clap reads its variable as true or false.
            Some(long) if !arg.get_action().takes_values() => match value.as_str() {
                "true" => options.push(format!("--{long}")),
                "false" => {}
                _ => panic!("{name}={value}: write true or false"),
            },
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

/// A config file under `deploy/`, with the settings its comments offer (`#key = value`
/// lines) uncommented when `uncomment` is true, except those of the keys in `keep`.
fn config_text(file: &str, uncomment: bool, keep: &[&str]) -> String {
    let text = read(file);
    if !uncomment {
        return text;
    }
    let mut uncommented = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| match commented_setting(line) {
            Some(key) if !keep.contains(&key) => {
                uncommented += 1;
                line[1..].to_owned()
            }
            _ => line.to_owned(),
        })
        .collect();
    // Guards the test itself: a file whose optional settings this did not find would be
    // checked as shipped only.
    assert!(uncommented >= 5, "{file}: {uncommented} optional settings");
    lines.join("\n") + "\n"
}

/// The key of a commented-out setting, `#key = value`; `None` for prose (`# text`).
fn commented_setting(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('#')?;
    let (key, _) = rest.split_once(" = ")?;
    let is_key = !key.is_empty()
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    is_key.then_some(key)
}

/// Every key a config file under `deploy/` sets or offers, in order.
fn config_keys(file: &str) -> Vec<String> {
    read(file)
        .lines()
        .filter_map(|line| {
            commented_setting(line).or_else(|| {
                line.split_once(" = ")
                    .map(|(key, _)| key)
                    .filter(|k| !k.starts_with('#'))
            })
        })
        .map(str::to_owned)
        .collect()
}

/// The value of a flag clap requires whenever the binary runs its service, whether its CLI
/// holds it plainly or as an `Option` (as a CLI whose subcommands need no such flag does).
fn required<T>(value: impl Into<Option<T>>) -> T {
    value.into().expect("a required flag")
}

/// Parses `args` with `text` as their config file, written to `dir` as `name`, through the
/// binary's real loader; refused arguments are named.
fn load<T: clap::Parser>(args: &[String], dir: &Path, name: &str, text: &str) -> T {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let mut args = args.to_vec();
    args.push(format!("--config={}", path.display()));
    match shroud_process::config::try_parse_from::<T, _, _>(&args) {
        Ok(parsed) => {
            assert_eq!(parsed.file.as_deref(), Some(path.as_path()));
            parsed.cli
        }
        Err(err) => panic!("{args:?} with\n{text}\n: {err}"),
    }
}

#[test]
fn every_key_of_the_config_examples_is_a_flag_of_its_binary() {
    for (file, command) in [
        ("shroud.toml", shroud_client::cli::Cli::command()),
        ("shroud-proxy.toml", shroud_proxy::cli::Cli::command()),
        (
            "shroud-discovery.toml",
            shroud_discovery::cli::Cli::command(),
        ),
    ] {
        let keys = config_keys(file);
        assert!(keys.len() >= 10, "{file}: {keys:?}");
        let mut seen = BTreeSet::new();
        for key in &keys {
            assert!(seen.insert(key), "{file}: {key} twice");
            let flag = command.get_arguments().any(|arg| {
                arg.get_long() == Some(key.as_str())
                    || (arg.is_positional() && arg.get_id().as_str() == key)
            });
            assert!(flag, "{file}: {key} is no flag of {}", command.get_name());
        }
    }
}

#[test]
fn every_key_the_readmes_show_is_a_flag() {
    let commands = [
        shroud_client::cli::Cli::command(),
        shroud_proxy::cli::Cli::command(),
        shroud_discovery::cli::Cli::command(),
    ];
    let is_flag = |key: &str| {
        commands.iter().any(|command| {
            command.get_arguments().any(|arg| {
                arg.get_long() == Some(key) || (arg.is_positional() && arg.get_id() == key)
            })
        })
    };
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let mut blocks = 0;
    for text in [std::fs::read_to_string(readme).unwrap(), read("README.md")] {
        for block in text.split("```toml\n").skip(1) {
            let block = block.split("```").next().unwrap();
            // Commented-out settings count too.
            let uncommented: String = block
                .lines()
                .map(|line| match commented_setting(line) {
                    Some(_) => &line[1..],
                    None => line,
                })
                .collect::<Vec<_>>()
                .join("\n");
            let table: toml::Table = uncommented
                .parse()
                .unwrap_or_else(|err| panic!("{err}\n{block}"));
            for key in table.keys() {
                assert!(is_flag(key), "{key} in\n{block}");
            }
            blocks += 1;
        }
    }
    assert!(blocks >= 5, "{blocks} TOML blocks");
}

#[test]
fn the_readmes_proxy_config_loads_as_its_comments_say() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(readme).unwrap();
    let block = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|block| block.split("```").next())
        .expect("a TOML block in README.md");
    assert!(block.contains("shroud-proxy --config"), "{block}");
    let dir = tempfile::tempdir().unwrap();
    let args = ["shroud-proxy".to_owned()];
    let cli: shroud_proxy::cli::Cli = load(&args, dir.path(), "proxy.toml", block);
    assert_eq!(required::<String>(cli.tunnel_name), "proxy1.example.net");
    assert_eq!(
        required::<PathBuf>(cli.tls_cert),
        dir.path().join("proxy/fullchain.pem")
    );
    assert_eq!(cli.authorized, Some(dir.path().join("authorized")));
    assert!(cli.authorize_dns);
    assert_eq!(cli.word_names, ["free.example.net"]);
    assert_eq!(cli.max_connections, 20_000);
    assert_eq!(cli.log.verbose, 1);
}

#[test]
fn the_client_unit_and_config_make_a_valid_command_line() {
    let unit = read("systemd/shroud@.service");
    assert!(unit.contains("EnvironmentFile=-/etc/shroud/%i.env"));
    let instance = "my-app.example.com";
    assert_eq!(
        unit_arguments(&unit, "shroud", instance),
        ["--config", &format!("/etc/shroud/{instance}.toml")]
    );
    // The state directory below, /var/lib/shroud, holds Tor's guard and vanguards: systemd
    // makes it, keeps it across restarts, and lets only the unit's user in.
    assert!(unit.contains("\nStateDirectory=shroud\n"), "{unit}");
    assert!(unit.contains("\nStateDirectoryMode=0700\n"), "{unit}");
    let mut command = shroud_client::cli::Cli::command();
    // Building numbers the positional arguments.
    command.build();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("{instance}.toml");

    // As shipped; then every optional setting, with the two ways to a certificate in turn.
    for (uncomment, keep) in [
        (false, &[][..]),
        (true, &["acme", "acme-agree-tos"][..]),
        (true, &["tls-cert", "tls-key"][..]),
    ] {
        let text = config_text("shroud.toml", uncomment, keep);
        let args = to_args(&command, "shroud", &unit_environment(&unit, instance));
        let cli: shroud_client::cli::Cli = load(&args, dir.path(), &name, &text);
        let run = cli.run.expect("run arguments");
        // The unit's settings beat the file's.
        assert_eq!(run.hostname.as_deref(), Some(instance));
        assert_eq!(
            run.key.as_deref(),
            Some(Path::new("/var/lib/shroud/client.key"))
        );
        assert_eq!(run.state_dir.as_deref(), Some(Path::new("/var/lib/shroud")));
        assert_eq!(run.proxy.len(), 2, "{:?}", run.proxy);
        for proxy in &run.proxy {
            shroud_client::cli::parse_proxy(proxy).unwrap();
        }
        assert_eq!(run.target.as_deref(), Some("127.0.0.1:443"));
        shroud_client::cli::parse_target(run.target.as_deref().unwrap()).unwrap();
        assert_eq!(run.transport, shroud_client::transport::TransportKind::Tor);
        if !uncomment {
            assert!(run.discovery.is_empty() && run.http_target.is_none());
            continue;
        }
        // The optional settings mean what their comments say.
        assert_eq!(run.discovery.len(), 2);
        let key: PublicKey = run.discovery_key.as_deref().unwrap().parse().unwrap();
        assert_eq!(Some(key.to_string()), run.discovery_key);
        assert!(run.srv);
        assert_eq!(run.max_proxies, 3);
        assert!(run.http_target.is_some());
        assert_eq!(
            run.proxy_protocol,
            Some(shroud_client::proxy_protocol::Version::V2)
        );
        assert_eq!(run.resolve.len(), 1);
        assert_eq!(run.connect_timeout_secs, Some(60));
        assert_eq!(
            (
                run.tor_bootstrap_timeout_secs,
                run.keepalive_secs,
                run.max_backoff_secs
            ),
            (300, 10, 60)
        );
        assert_eq!(run.stream_buffer_bytes, 16 * 1024 * 1024);
        assert_eq!(run.max_streams, 8192);
        assert_eq!(
            (
                run.max_circuits_per_proxy_per_hour,
                run.max_circuits_per_hour
            ),
            (6, 24)
        );
        assert_eq!(run.vanguards, shroud_client::tor::Vanguards::Full);
        assert_eq!(cli.log.verbose, 1);
        if keep.contains(&"acme") {
            assert!(run.tls_cert.is_some() && run.tls_key.is_some());
            assert_eq!(run.acme, None);
        } else {
            assert_eq!(run.tls_cert, None);
            assert!(run.acme.is_some() && run.acme_agree_tos);
        }
    }
}

#[test]
fn the_proxy_unit_and_config_make_a_valid_command_line() {
    let unit = read("systemd/shroud-proxy.service");
    assert!(unit.contains("EnvironmentFile=-/etc/shroud/proxy.env"));
    assert_eq!(
        unit_arguments(&unit, "shroud-proxy", "unused"),
        ["--config", "/etc/shroud/proxy.toml"]
    );
    let command = shroud_proxy::cli::Cli::command();
    let dir = tempfile::tempdir().unwrap();
    let args = to_args(&command, "shroud-proxy", &unit_environment(&unit, "unused"));

    for uncomment in [false, true] {
        let text = config_text("shroud-proxy.toml", uncomment, &[]);
        let cli: shroud_proxy::cli::Cli = load(&args, dir.path(), "proxy.toml", &text);
        assert_eq!(
            required::<String>(cli.tunnel_name.clone()),
            "proxy1.example.net"
        );
        assert_eq!(cli.listen_https.map(|a| a.port()), Some(443));
        assert_eq!(cli.listen_http.map(|a| a.port()), Some(80));
        assert_eq!(
            cli.authorized.as_deref(),
            Some(Path::new("/etc/shroud/authorized"))
        );
        // The certificate comes from the unit's credentials, whatever the file says.
        for path in [cli.tls_cert.clone(), cli.tls_key.clone()] {
            let path = required::<PathBuf>(path);
            assert!(loads_credential(&unit, &path), "{}", path.display());
        }
        // systemd must wait longer than the drain before it sends SIGKILL.
        assert_eq!(cli.drain_timeout_secs, 30);
        assert!(timeout_stop_secs(&unit) > cli.drain_timeout_secs);
        // LimitNOFILE stays above the connections the file allows.
        let nofile: usize = unit
            .lines()
            .find_map(|line| line.strip_prefix("LimitNOFILE="))
            .expect("LimitNOFILE")
            .parse()
            .unwrap();
        assert!(nofile > cli.max_connections);
        if !uncomment {
            assert!(!cli.authorize_dns && cli.discovery.is_empty() && cli.listen_peer.is_none());
            continue;
        }
        assert!(cli.authorize_dns);
        assert_eq!(cli.word_names, ["free.example.net"]);
        assert_eq!(cli.discovery.len(), 2);
        assert_eq!(cli.public_addr.len(), 1);
        assert_eq!(cli.peers.len(), 2);
        assert_eq!(cli.listen_peer.map(|a| a.port()), Some(7443));
        assert_eq!(cli.advertise_peer.map(|a| a.port()), Some(7443));
        assert_eq!(
            (
                cli.route_wait_secs,
                cli.tunnel_idle_timeout_secs,
                cli.max_connections,
                cli.max_connections_per_address,
                cli.max_connections_per_hostname,
                cli.max_streams_per_tunnel,
                cli.max_tunnels_per_key,
                cli.max_hostnames_per_key,
                cli.stream_buffer_bytes,
                cli.heartbeat_secs,
            ),
            (
                10,
                45,
                20_000,
                512,
                10_000,
                4096,
                8,
                64,
                16 * 1024 * 1024,
                10
            )
        );
        assert_eq!(cli.vanguards, shroud_client::tor::Vanguards::Full);
        assert_eq!(cli.log.verbose, 1);
    }
}

/// The config lines a unit's comments tell the operator to add to its config file (lines such
/// as `#   region = "eu"`).
fn documented_settings(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix('#'))
        .map(str::trim)
        .filter(|line| commented_setting(&format!("#{line}")).is_some())
        .map(str::to_owned)
        .collect()
}

/// The `TimeoutStopSec=` of a unit, in seconds.
fn timeout_stop_secs(unit: &str) -> u64 {
    let stop = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec");
    stop.trim().parse().unwrap()
}

/// Whether `unit` hands the service `file` under `%d` through a `LoadCredential=` line.
fn loads_credential(unit: &str, path: &Path) -> bool {
    let Ok(file) = path.strip_prefix("%d") else {
        return false;
    };
    let prefix = format!("LoadCredential={}:", file.display());
    unit.lines().any(|line| line.starts_with(&prefix))
}

/// `shroud-discovery.toml` with every optional setting, parsed as the unit runs it.
fn discovery_config(dir: &Path) -> shroud_discovery::cli::ServeArgs {
    let unit = read("systemd/shroud-discovery.service");
    let command = shroud_discovery::cli::Cli::command();
    let args = to_args(
        &command,
        "shroud-discovery",
        &unit_environment(&unit, "unused"),
    );
    let text = config_text("shroud-discovery.toml", true, &[]);
    let cli: shroud_discovery::cli::Cli = load(&args, dir, "discovery.toml", &text);
    cli.serve.expect("serve options")
}

#[test]
fn the_discovery_unit_and_config_make_a_valid_command_line() {
    let unit = read("systemd/shroud-discovery.service");
    // The environment file is optional: the unit and the config file give every setting.
    assert!(unit.contains("EnvironmentFile=-/etc/shroud/discovery.env"));
    assert_eq!(
        unit_arguments(&unit, "shroud-discovery", "unused"),
        ["--config", "/etc/shroud/discovery.toml"]
    );
    let command = shroud_discovery::cli::Cli::command();
    let dir = tempfile::tempdir().unwrap();
    let args = to_args(
        &command,
        "shroud-discovery",
        &unit_environment(&unit, "unused"),
    );

    for uncomment in [false, true] {
        let text = config_text("shroud-discovery.toml", uncomment, &[]);
        let cli: shroud_discovery::cli::Cli = load(&args, dir.path(), "discovery.toml", &text);
        assert!(cli.command.is_none());
        let serve = cli.serve.expect("serve options");
        assert_eq!(serve.listen.port(), 443);
        // Every secret reaches the dynamic user through systemd's credentials.
        let secret_file = serve.fleet_secret_file.clone().expect("heartbeats enabled");
        for path in [
            &serve.tls_cert,
            &serve.tls_key,
            &serve.signing_key,
            &secret_file,
        ] {
            assert!(
                loads_credential(&unit, path),
                "{} is not a LoadCredential= file",
                path.display()
            );
        }
        if !uncomment {
            assert_eq!(serve.require_cname, None);
            assert_eq!(serve.fleet, None);
            continue;
        }
        // A relative path is the config file's neighbour: /etc/shroud/fleet.toml, installed.
        assert_eq!(serve.fleet, Some(dir.path().join("fleet.toml")));
        assert!(read("shroud-discovery.toml").contains("/etc/shroud/fleet.toml"));
        assert_eq!(
            serve.require_cname.as_deref(),
            Some(required_cname_domain().as_str())
        );
        assert_eq!(serve.dns_server.len(), 1);
        assert_eq!(serve.dns_listen.map(|a| a.port()), Some(53));
        assert_eq!(
            (
                serve.max_proxies,
                serve.list_ttl_secs,
                serve.heartbeat_timeout_secs,
                serve.max_connections,
                serve.dns_ttl_secs
            ),
            (3, 300, 30, 1024, 30)
        );
        assert_eq!(cli.log.verbose, 1);
    }

    // The service lets requests finish for 5 s on SIGTERM; systemd must wait longer.
    assert!(timeout_stop_secs(&unit) > 5);
    assert!(unit.contains("KillSignal=SIGTERM"));
}

#[test]
fn a_subcommand_runs_beside_the_config_examples() {
    // `shroud key` and `shroud-discovery key` with the unit's config file: the file's own
    // settings are no error there, and a key file it names is the one used.
    let dir = tempfile::tempdir().unwrap();
    let text = config_text("shroud.toml", true, &["acme", "acme-agree-tos"]);
    let args = ["shroud".to_owned(), "key".to_owned()];
    let cli: shroud_client::cli::Cli = load(&args, dir.path(), "app.toml", &text);
    let Some(shroud_client::cli::Command::Key(key)) = cli.command else {
        panic!("not the key subcommand")
    };
    assert_eq!(
        key.key.as_deref(),
        Some(Path::new("/var/lib/shroud/client.key"))
    );
    let text = config_text("shroud-discovery.toml", true, &[]);
    let args = ["shroud-discovery".to_owned(), "key".to_owned()];
    let cli: shroud_discovery::cli::Cli = load(&args, dir.path(), "discovery.toml", &text);
    let Some(shroud_discovery::cli::Command::Key(key)) = cli.command else {
        panic!("not the key subcommand")
    };
    assert_eq!(
        key.signing_key,
        Path::new("/etc/shroud/discovery/signing.key")
    );
}

/// The `--require-cname` domain that `shroud-discovery.toml` suggests.
fn required_cname_domain() -> String {
    let dir = tempfile::tempdir().unwrap();
    discovery_config(dir.path())
        .require_cname
        .expect("require-cname in shroud-discovery.toml")
}

#[test]
fn the_proxy_onion_drop_in_keeps_its_key_in_the_units_state_directory() {
    let unit = read("systemd/shroud-proxy.service");
    let drop_in = read("systemd/shroud-proxy.service.d/onion.conf");
    let command = shroud_proxy::cli::Cli::command();
    let mut env = unit_environment(&unit, "unused");
    env.extend(unit_environment(&drop_in, "unused"));
    // The unit's config file as shipped, with the drop-in's settings on top.
    let dir = tempfile::tempdir().unwrap();
    let shipped = config_text("shroud-proxy.toml", false, &[]);
    let args = to_args(&command, "shroud-proxy", &env);
    let cli: shroud_proxy::cli::Cli = load(&args, dir.path(), "proxy.toml", &shipped);
    assert!(cli.onion_tunnel);
    assert_eq!(cli.onion_port, 443, "clients' default port");
    assert_eq!(cli.vanguards, shroud_client::tor::Vanguards::Full);
    // The state directory is the one systemd makes for the unit (%S is /var/lib), private to
    // it: the key must survive restarts and be readable by nobody else.
    let state = cli.state_dir.expect("--state-dir");
    assert_eq!(state, std::path::Path::new("%S/shroud-proxy"));
    assert!(
        drop_in.contains("\nStateDirectory=shroud-proxy\n"),
        "{drop_in}"
    );
    assert!(drop_in.contains("\nStateDirectoryMode=0700\n"), "{drop_in}");
    // ProtectSystem=strict leaves only the state directory writable, and the unit's umask
    // keeps what Tor writes there private.
    assert!(unit.contains("ProtectSystem=strict"));
    assert!(unit.contains("UMask=0077"));
}

#[test]
fn the_proxy_discovery_drop_in_makes_a_valid_command_line() {
    let unit = read("systemd/shroud-proxy.service");
    let drop_in = read("systemd/shroud-proxy.service.d/discovery.conf");
    let command = shroud_proxy::cli::Cli::command();
    let mut env = unit_environment(&unit, "unused");
    env.extend(unit_environment(&drop_in, "unused"));
    let args = to_args(&command, "shroud-proxy", &env);
    let dir = tempfile::tempdir().unwrap();
    let shipped = config_text("shroud-proxy.toml", false, &[]);
    let documented = documented_settings(&drop_in);
    assert!(documented.len() >= 3, "{documented:?}");

    // The service alone, without this proxy's own settings that the comment lists: refused,
    // with a word on where the flag came from.
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, format!("{shipped}{}\n", documented[0])).unwrap();
    let mut bare = args.clone();
    bare.push(format!("--config={}", path.display()));
    let err =
        shroud_process::config::try_parse_from::<shroud_proxy::cli::Cli, _, _>(&bare).unwrap_err();
    assert!(err.to_string().contains("--region"), "{err}");
    assert!(err.to_string().contains("discovery (line"), "{err}");
    assert_eq!(err.exit_code(), 2);

    // As deploy/README.md says to switch on authorization by DNS.
    let text = format!("{shipped}{}\nauthorize-dns = true\n", documented.join("\n"));
    let cli: shroud_proxy::cli::Cli = load(&args, dir.path(), "proxy.toml", &text);
    assert!(cli.authorize_dns);
    assert!(cli.authorized.is_some(), "the authorized file stays");

    let url: shroud_discovery::announce::DiscoveryUrl =
        cli.discovery.first().expect("--discovery").parse().unwrap();
    assert_eq!(url.port(), 443);
    let secret_file = cli.fleet_secret_file.expect("--fleet-secret-file");
    assert!(loads_credential(&drop_in, &secret_file));
    let public_name = cli.public_name.expect("--public-name");
    let (name, port) = public_name.rsplit_once(':').unwrap();
    assert_eq!(port, "443");
    assert_eq!(
        Some(name),
        cli.tunnel_name.as_deref(),
        "clients dial the tunnel name"
    );
    assert!(!cli.region.expect("--region").is_empty());

    // The names it uses are the ones zone.example publishes.
    let zones = example_zones();
    let operator = &zones[0];
    assert_eq!(operator.data(url.host(), RecordType::A).len(), 1);
    assert_eq!(operator.data(name, RecordType::A).len(), 1);
}

#[test]
fn fleet_example_parses_and_matches_the_zone() {
    let file = FleetFile::parse(&read("fleet.example.toml"))
        .unwrap()
        .validate()
        .unwrap();
    let entries: Vec<(&str, u16, &str)> = file
        .proxy
        .iter()
        .map(|entry| (entry.name.as_str(), entry.port, entry.region.as_str()))
        .collect();
    assert_eq!(
        entries,
        [
            ("proxy1.example.net", 443, "eu"),
            ("proxy2.example.net", 443, "us"),
            ("proxy3.example.net", 443, "eu"),
        ]
    );
    // proxy2 also hosts its tunnel listener as an onion service; its entry carries where.
    let onions: Vec<(&str, &str)> = file
        .proxy
        .iter()
        .filter_map(|entry| Some((entry.name.as_str(), entry.onion.as_deref()?)))
        .collect();
    assert_eq!(onions.len(), 1, "{onions:?}");
    assert_eq!(onions[0].0, "proxy2.example.net");
    assert!(shroud_discovery::signed::check_onion(onions[0].1).is_ok());

    // Each is a tunnel name with an address of its own in zone.example.
    let zones = example_zones();
    let operator = &zones[0];
    let mut addresses = BTreeSet::new();
    for (name, _, _) in &entries {
        let a = operator.data(name, RecordType::A);
        assert_eq!(a.len(), 1, "{name}: {a:?}");
        assert!(addresses.insert(a[0].clone()), "{name} shares an address");
    }

    // Lists spread across both regions first, and the default of 3 takes the whole fleet.
    let fleet = Fleet::new(file, Duration::from_secs(30));
    let now = tokio::time::Instant::now();
    for host in ["www.example.net", "app.customer.example", "example.org"] {
        let two = fleet.select(host, 2, now);
        let regions: BTreeSet<&str> = two.iter().map(|e| e.region.as_str()).collect();
        assert_eq!(regions, BTreeSet::from(["eu", "us"]), "{host}: {two:?}");
        assert_eq!(fleet.select(host, 3, now).len(), 3);
    }
}

/// One zone of `deploy/zone.example`: its origin and every record in it.
struct Zone {
    origin: Name,
    records: Vec<Record>,
}

impl Zone {
    /// The data of the records of type `rtype` at `name` (absolute; a final dot is optional).
    fn data(&self, name: &str, rtype: RecordType) -> Vec<&RData> {
        let name = fqdn(name);
        self.records
            .iter()
            .filter(|record| record.name == name && record.record_type() == rtype)
            .map(|record| &record.data)
            .collect()
    }

    /// The addresses of the A records at `name`.
    fn addresses(&self, name: &str) -> BTreeSet<Ipv4Addr> {
        self.data(name, RecordType::A)
            .into_iter()
            .map(|data| match data {
                RData::A(a) => a.0,
                other => panic!("{other:?}"),
            })
            .collect()
    }
}

fn fqdn(name: &str) -> Name {
    let mut name = Name::from_ascii(name).unwrap();
    name.set_fqdn(true);
    name
}

/// The text of a TXT record, its character-strings joined.
fn txt_text(data: &RData) -> String {
    let RData::TXT(txt) = data else {
        panic!("not TXT: {data:?}");
    };
    let bytes: Vec<u8> = txt
        .txt_data
        .iter()
        .flat_map(|s| s.iter().copied())
        .collect();
    String::from_utf8(bytes).unwrap()
}

/// The zones of `deploy/zone.example`, each parsed on its own by hickory's zone-file parser
/// after cutting the file before every `$ORIGIN` but the first, as its header says to.
fn example_zones() -> Vec<Zone> {
    let text = read("zone.example");
    let mut parts = vec![String::new()];
    for line in text.lines() {
        let current = parts.last_mut().unwrap();
        if line.starts_with("$ORIGIN") && current.contains("\n$ORIGIN") {
            parts.push(String::new());
        }
        let current = parts.last_mut().unwrap();
        current.push('\n');
        current.push_str(line);
    }
    parts
        .iter()
        .map(|part| {
            let (origin, sets) = ZoneParser::new(part.as_str(), None, None)
                .parse()
                .unwrap_or_else(|err| panic!("zone.example: {err}\n{part}"));
            let records = sets
                .values()
                .flat_map(|set| set.records_without_rrsigs().cloned())
                .collect();
            Zone { origin, records }
        })
        .collect()
}

#[test]
fn zone_example_is_two_complete_zones() {
    let zones = example_zones();
    let origins: Vec<String> = zones.iter().map(|z| z.origin.to_ascii()).collect();
    assert_eq!(origins, ["example.net.", "customer.example."]);
    for zone in &zones {
        let origin = zone.origin.to_ascii();
        for record in &zone.records {
            assert!(
                zone.origin.zone_of(&record.name),
                "{} is outside the zone {origin}",
                record.name
            );
        }
        let soa: Vec<&Record> = zone
            .records
            .iter()
            .filter(|record| record.record_type() == RecordType::SOA)
            .collect();
        assert_eq!(soa.len(), 1, "{origin}: one SOA");
        assert_eq!(soa[0].name, zone.origin, "{origin}: the SOA is at the apex");
        let ns = zone.data(&origin, RecordType::NS);
        assert!(!ns.is_empty(), "{origin}: NS at the apex");
        for data in ns {
            let RData::NS(server) = data else {
                panic!("{data:?}")
            };
            if zone.origin.zone_of(&server.0) {
                assert!(
                    !zone.addresses(&server.0.to_ascii()).is_empty(),
                    "{origin}: glue for {}",
                    server.0
                );
            }
        }
    }
}

#[test]
fn zone_example_publishes_what_its_comments_say() {
    let zones = example_zones();
    let (operator, customer) = (&zones[0], &zones[1]);

    // The fleet: three tunnel names, one machine each, and the discovery service on another.
    let fleet: BTreeMap<&str, BTreeSet<Ipv4Addr>> = [
        "proxy1.example.net",
        "proxy2.example.net",
        "proxy3.example.net",
    ]
    .into_iter()
    .map(|name| (name, operator.addresses(name)))
    .collect();
    let mut all = BTreeSet::new();
    for (name, addresses) in &fleet {
        assert_eq!(addresses.len(), 1, "{name}: {addresses:?}");
        all.extend(addresses);
    }
    assert_eq!(all.len(), 3);
    let discovery = operator.addresses("discovery.example.net");
    assert_eq!(discovery.len(), 1);
    assert!(
        discovery.is_disjoint(&all),
        "the discovery service needs its own port 443"
    );

    // Self-hosted: the published name points at every proxy, and its SRV records name every
    // proxy's tunnel name, on port 443.
    assert_eq!(operator.addresses("www.example.net"), all);
    let srv_name = format!("{}.www.example.net", shroud_client::srv::SRV_LABELS);
    let srv = operator.data(&srv_name, RecordType::SRV);
    assert_eq!(srv.len(), 3, "{srv_name}");
    let mut targets = BTreeSet::new();
    for data in srv {
        let RData::SRV(srv) = data else {
            panic!("{data:?}")
        };
        assert_eq!(srv.port, 443, "{srv:?}");
        let target = srv.target.to_ascii();
        targets.insert(target.trim_end_matches('.').to_owned());
    }
    let tunnel_names: BTreeSet<String> = fleet.keys().map(|name| (*name).to_owned()).collect();
    assert_eq!(targets, tunnel_names);

    // Hosted: the customer's CNAME is HOSTNAME.DOMAIN for the domain the discovery service
    // requires, and the operator's wildcard answers for it with the whole fleet.
    let domain = required_cname_domain();
    let host = "app.customer.example";
    assert_eq!(
        customer.data(host, RecordType::CNAME),
        [&RData::CNAME(hickory_proto::rr::rdata::CNAME(fqdn(
            &format!("{host}.{domain}")
        )))]
    );
    // The operator delegates DOMAIN to the discovery instances, which answer it themselves,
    // as shroud-discovery.toml configures them; each name server has an address and lies
    // outside the zone.
    let delegated: Vec<String> = operator
        .data(&domain, RecordType::NS)
        .into_iter()
        .map(|data| match data {
            RData::NS(ns) => ns.0.to_ascii().trim_end_matches('.').to_owned(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(delegated.len(), 2, "two instances: {delegated:?}");
    for ns in &delegated {
        assert_eq!(operator.addresses(ns).len(), 1, "{ns}");
    }
    let dir = tempfile::tempdir().unwrap();
    let discovery = discovery_config(dir.path());
    assert_eq!(discovery.dns_zone.as_deref(), Some(domain.as_str()));
    let configured = discovery.dns_ns.clone();
    assert_eq!(configured, delegated);
    shroud_discovery::dns::DnsZone::new(&domain, &configured, 30, 3).unwrap();
    // A CNAME stands alone at its name.
    let at_host: Vec<RecordType> = customer
        .records
        .iter()
        .filter(|record| record.name == fqdn(host))
        .map(Record::record_type)
        .collect();
    assert_eq!(at_host, [RecordType::CNAME]);

    // The TXT record lists one client key, in the form the proxy reads.
    let txt_name = format!("{}.{host}", shroud_proxy::dns_auth::TXT_LABEL);
    let txt = customer.data(&txt_name, RecordType::TXT);
    assert_eq!(txt.len(), 1, "{txt_name}");
    let text = txt_text(txt[0]);
    let key = text
        .strip_prefix(shroud_proxy::dns_auth::KEY_PREFIX)
        .unwrap_or_else(|| panic!("{text:?}"));
    let _: PublicKey = key.parse().unwrap();
}

/// Serves `zone` from a DNS server on 127.0.0.1. Wildcards are left out: the test server does
/// not expand them.
async fn serve(zone: &Zone) -> TestDns {
    let origin = zone.origin.to_ascii();
    let dns = TestDns::start(origin.trim_end_matches('.')).await.unwrap();
    for record in &zone.records {
        let name = record.name.to_ascii();
        let ttl = record.ttl;
        match &record.data {
            _ if record.name.is_wildcard() => {}
            RData::SOA(_) | RData::NS(_) => {}
            RData::A(a) => dns.add_a(&name, a.0, ttl).unwrap(),
            RData::CNAME(target) => dns.add_cname(&name, &target.0.to_ascii(), ttl).unwrap(),
            RData::SRV(srv) => dns
                .add_srv(
                    &name,
                    srv.priority,
                    srv.weight,
                    srv.port,
                    &srv.target.to_ascii(),
                    ttl,
                )
                .unwrap(),
            data @ RData::TXT(_) => dns.add_txt(&name, &txt_text(data), ttl).unwrap(),
            other => panic!("{name}: no way to serve {other:?}"),
        }
    }
    dns
}

#[tokio::test]
async fn zone_example_answers_the_client_the_proxy_and_the_discovery_service() {
    init();
    let zones = example_zones();
    let operator = serve(&zones[0]).await;
    let customer = serve(&zones[1]).await;

    // The client's --srv lookup finds the three proxies, on 443.
    let transport = shroud_client::transport::DirectTransport::new(
        shroud_client::transport::Resolve::new(),
        Duration::from_secs(5),
    );
    let answer = within(
        10,
        shroud_client::srv::lookup_srv(
            &transport,
            operator.addr,
            "www.example.net",
            Duration::from_secs(5),
        ),
    )
    .await
    .unwrap();
    let mut found: Vec<(String, u16)> = answer
        .targets
        .into_iter()
        .map(|target| (target.name, target.port))
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("proxy1.example.net".to_owned(), 443),
            ("proxy2.example.net".to_owned(), 443),
            ("proxy3.example.net".to_owned(), 443),
        ]
    );

    // A proxy run with --authorize-dns lets the listed key bind app.customer.example, and no
    // other key.
    let txt_name = format!("{}.app.customer.example", shroud_proxy::dns_auth::TXT_LABEL);
    let text = txt_text(zones[1].data(&txt_name, RecordType::TXT)[0]);
    let listed: PublicKey = text
        .strip_prefix(shroud_proxy::dns_auth::KEY_PREFIX)
        .unwrap()
        .parse()
        .unwrap();
    let auth = shroud_proxy::dns_auth::DnsAuthorizer::new(
        Some(customer.addr),
        shroud_proxy::dns_auth::DnsAuthLimits::default(),
    )
    .unwrap();
    let verdict = within(10, auth.allows("app.customer.example", &listed)).await;
    assert!(
        matches!(verdict, shroud_proxy::dns_auth::DnsVerdict::Allowed { valid_for }
            if valid_for <= Duration::from_secs(300)),
        "{verdict:?}"
    );
    let other = key(ALICE);
    let verdict = within(10, auth.allows("app.customer.example", &other)).await;
    assert_eq!(verdict, shroud_proxy::dns_auth::DnsVerdict::NotListed);

    // The discovery service run with --require-cname DOMAIN accepts the customer's CNAME.
    let check = shroud_discovery::cname::CnameCheck::new(required_cname_domain(), &[customer.addr])
        .unwrap();
    let verdict = within(10, check.check("app.customer.example"))
        .await
        .unwrap();
    assert_eq!(verdict, shroud_discovery::cname::Verdict::Confirmed);
}
