//! The README's demo command works as written.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[test]
fn the_demo_serves_through_its_tunnel() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shroud-demo"))
        .arg("--check")
        .output()
        .expect("run shroud-demo");
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
