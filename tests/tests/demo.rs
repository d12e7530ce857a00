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
