//! The `shroud` binary's command-line contract, driven as a user would.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Output};

fn shroud(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shroud"))
        .args(args)
        .env_remove("SHROUD_TRANSPORT")
        .env_remove("SHROUD_KEY")
        .env_remove("SHROUD_PROXY")
        .env_remove("SHROUD_TOR_NETWORK")
        .env_remove("SHROUD_RESOLVE")
        .env_remove("SHROUD_CONFIG")
        .output()
        .expect("run shroud")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn key_prints_the_public_key_first_and_creates_a_private_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/client.key");
    let path_arg = path.to_str().unwrap();

    let first = shroud(&["key", "--key", path_arg]);
    assert!(first.status.success(), "{}", stderr(&first));
    let stdout = String::from_utf8(first.stdout).unwrap();
    let key_line = stdout.lines().next().unwrap();
    let key: shroud_mux::auth::PublicKey = key_line.parse().expect("first line is the key alone");
    assert!(stdout.contains("--authorized"), "a hint follows: {stdout}");

    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The same key again, not a new one.
    let second = shroud(&["key", "--key", path_arg]);
    let again = String::from_utf8(second.stdout).unwrap();
    assert_eq!(
        again
            .lines()
            .next()
            .unwrap()
            .parse::<shroud_mux::auth::PublicKey>()
            .unwrap(),
        key
    );
}

#[test]
fn key_into_a_closed_pipe_exits_cleanly() {
    // `shroud key | head -1`, with the reader gone before the first write: stdout fails with
    // EPIPE, which must not panic (Rust ignores SIGPIPE, so println! would).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.key");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_shroud"))
        .args(["key", "--key", path.to_str().unwrap()])
        .env_remove("SHROUD_KEY")
        .stdout(writer)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
    assert!(path.exists(), "the key was still made");
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client.key");
    let path_arg = path.to_str().unwrap();
    assert!(shroud(&["key", "--key", path_arg]).status.success());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    let output = shroud(&["key", "--key", path_arg]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("chmod 600"), "{}", stderr(&output));
}

#[test]
fn resolve_is_refused_with_tor_unless_a_private_network_is_configured() {
    // Refused before Tor starts: nothing is sent anywhere.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    let state = dir.path().join("state");
    let output = shroud(&[
        "example.test",
        "127.0.0.1:443",
        "--proxy",
        "proxy.test:443",
        "--resolve",
        "proxy.test:443:127.0.0.1",
        "--key",
        key.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(err.contains("--resolve is refused"), "{err}");
    assert!(err.contains("--tor-network"), "{err}");
}

#[test]
fn help_says_tor_is_the_default_and_what_direct_shows() {
    let help = shroud(&["--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("[default: tor]"), "{text}");
    assert!(
        text.contains("shows this machine's address to every proxy"),
        "{text}"
    );
}

#[test]
fn bad_arguments_are_reported_before_anything_connects() {
    let output = shroud(&[
        "not a hostname",
        "127.0.0.1:443",
        "--proxy",
        "proxy.test:443",
        "--transport",
        "direct",
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("HOSTNAME"), "{}", stderr(&output));

    let output = shroud(&[
        "example.test",
        "127.0.0.1",
        "--proxy",
        "proxy.test:443",
        "--transport",
        "direct",
    ]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("TARGET"), "{}", stderr(&output));
}
