//! The README's demo command works as written.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

fn run_demo(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_shroud-demo"))
        .args(args)
        .output()
        .expect("run shroud-demo")
}

#[test]
fn the_demo_serves_through_its_tunnel() {
    let output = run_demo(&["--check"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("curl --cacert"), "{stdout}");
    assert!(
        stdout.contains("check: HTTPS -> 200 hello from origin: GET /"),
        "{stdout}"
    );
    assert!(stdout.contains("check: HTTP  -> 200"), "{stdout}");
}

#[test]
fn the_demo_serves_through_a_private_tor_network() {
    let output = run_demo(&["--tor-local", "--check"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("crosses the private Tor network"),
        "{stdout}"
    );
    assert!(
        stdout.contains("check: HTTPS -> 200 hello from origin: GET /"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Tor bootstrapped"), "{stderr}");
}

#[test]
fn the_demo_runs_a_fleet_whose_dns_names_the_holders_and_whose_every_proxy_serves() {
    let output = run_demo(&["--fleet", "3", "--check"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A dig line per discovery instance, a curl line per proxy, and each checked.
    assert_eq!(
        stdout.matches("  dig @127.0.0.1 -p ").count(),
        2,
        "{stdout}"
    );
    assert_eq!(stdout.matches("  curl --cacert").count(), 3, "{stdout}");
    // Both instances answer the same two holders; every proxy serves, the third forwarding.
    let answers: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.strip_prefix("check: DNS at "))
        .filter_map(|line| line.split_once("-> ").map(|(_, answer)| answer))
        .collect();
    assert_eq!(answers.len(), 2, "{stdout}");
    assert_eq!(answers[0], answers[1], "{stdout}");
    assert_eq!(answers[0].matches("127.0.0.1").count(), 2, "{stdout}");
    assert_eq!(
        stdout.matches("-> 200 hello from origin: GET /").count(),
        3,
        "{stdout}"
    );
    assert_eq!(
        run_demo(&["--fleet"]).status.code(),
        Some(2),
        "a count is needed"
    );
}

#[test]
fn the_demo_gets_a_certificate_from_a_ca_on_loopback() {
    let output = run_demo(&["--acme", "--check"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("pebble-root.pem --resolve"), "{stdout}");
    assert!(
        stdout.contains("--acme you@example.com --acme-agree-tos"),
        "{stdout}"
    );
    assert!(
        stdout.contains("check: HTTPS -> 200 hello from origin: GET /"),
        "{stdout}"
    );
}
