//! The `shroud-proxy` binary's command-line contract, driven as an operator would.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::{Command, Output};

fn proxy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shroud-proxy"))
        .args(args)
        .env_remove("SHROUD_CONFIG")
        .output()
        .expect("run shroud-proxy")
}

#[test]
fn a_malformed_authorized_file_stops_the_proxy_with_its_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let authorized = dir.path().join("authorized");
    std::fs::write(&authorized, "# comment\n\nexample.test ed25519:not-a-key\n").unwrap();
    // The policy is read before the certificate is needed, or after: either way the proxy
    // must not start. Give it real certificate files so only the policy can be at fault.
    let cert = rcgen::generate_simple_self_signed(vec!["proxy.test".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();

    let output = proxy(&[
        "--listen-https",
        "127.0.0.1:0",
        "--tunnel-name",
        "proxy.test",
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
        "--authorized",
        authorized.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("authorized"), "{err}");
}

#[test]
fn a_missing_certificate_is_named() {
    let output = proxy(&[
        "--listen-https",
        "127.0.0.1:0",
        "--tunnel-name",
        "proxy.test",
        "--tls-cert",
        "/nonexistent/cert.pem",
        "--tls-key",
        "/nonexistent/key.pem",
        "--authorized",
        "/nonexistent/authorized",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
}
