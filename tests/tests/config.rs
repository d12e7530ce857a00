//! The real binaries run from config files (`--config FILE`, `SHROUD_CONFIG`): what an
//! operator who keeps the settings in a file sees.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use shroud_tests::process::{Output, Process};
use shroud_tests::stack::{binary, log_addr, make_key, Pki};
use shroud_tests::{https_get_retrying, init, within, HttpOrigin};

const HOST: &str = "example.test";
const PROXY: &str = "proxy.test";

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_and_a_client_run_from_config_files_serve_a_visitor() {
    init();
    let pki = Pki::new().unwrap();
    let origin = HttpOrigin::tls(pki.origin_tls(&[HOST])).await.unwrap();
    let key = make_key(&pki.dir().join("client.key")).unwrap();
    pki.issue_files(PROXY).unwrap();
    write(&pki.dir().join("authorized"), &format!("{HOST} {key}\n"));

    // The proxy's required flags come from the file alone, its paths relative to the file
    // (the test runs in another directory). The listener in the file is overridden by the
    // flag: the proxy must listen where the flag says.
    let proxy_config = pki.dir().join("proxy.toml");
    write(
        &proxy_config,
        &format!(
            "# a proxy, from its config file\n\
             tunnel-name = \"{PROXY}\"\n\
             tls-cert = \"{PROXY}.pem\"\n\
             tls-key = \"{PROXY}.key\"\n\
             authorized = \"authorized\"\n\
             listen-https = \"127.0.0.2:1\"\n\
             drain-timeout-secs = 5\n\
             max-connections = 100\n"
        ),
    );
    let args: Vec<String> = ["--config", proxy_config.to_str().unwrap()]
        .into_iter()
        .chain(["--listen-https", "127.0.0.1:0"])
        .map(str::to_owned)
        .collect();
    let mut proxy = Process::spawn(&binary("shroud-proxy"), &args).unwrap();
    let line = proxy
        .wait_for_line("listener=\"https\"", Duration::from_secs(20))
        .await
        .unwrap();
    let https = log_addr(&line).unwrap();
    assert_eq!(
        https.ip().to_string(),
        "127.0.0.1",
        "the flag beats the file"
    );

    // The client finds its file through SHROUD_CONFIG. The file says tor; SHROUD_TRANSPORT
    // says direct and must win, or the client would wait for a Tor network that is not there.
    let client_config = pki.dir().join("client.toml");
    write(
        &client_config,
        &format!(
            "hostname = \"{HOST}\"\n\
             target = \"{}\"\n\
             proxy = [\"{PROXY}:{port}\"]\n\
             resolve = [\"{PROXY}:{port}:127.0.0.1\"]\n\
             proxy-ca = \"ca.pem\"\n\
             key = \"client.key\"\n\
             transport = \"tor\"\n\
             max-backoff-secs = 1\n\
             keepalive-secs = 2\n",
            origin.addr(),
            port = https.port()
        ),
    );
    let env = [
        ("SHROUD_CONFIG", client_config.as_os_str()),
        ("SHROUD_TRANSPORT", OsStr::new("direct")),
    ];
    let client = Process::spawn_with(&binary("shroud"), &[], &env, Output::Echo).unwrap();

    let response = within(
        30,
        https_get_retrying(
            https,
            HOST,
            pki.ca.root_store(),
            "/from-config",
            Duration::from_millis(100),
        ),
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.body_text(),
        "hello from origin: GET /from-config\n"
    );
    drop(client);
    proxy.terminate();
    let status = proxy.wait_exit(Duration::from_secs(20)).await.unwrap();
    assert!(status.success(), "{status}");
}

/// Runs `program` with `args` and `env`, and returns its exit code and output.
async fn run_to_exit(program: &str, args: &[String], env: &[(&str, &OsStr)]) -> (i32, String) {
    let mut process = Process::spawn_with(&binary(program), args, env, Output::Echo).unwrap();
    let status = process.wait_exit(Duration::from_secs(20)).await.unwrap();
    (status.code().expect("an exit code"), process.output_text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_file_stops_every_binary_with_status_2_and_its_line() {
    init();
    let dir = tempfile::tempdir().unwrap();
    // A secret-looking value that must not reach the terminal.
    const VALUE: &str = "s3cret-value-not-for-logs";
    for (program, text, says) in [
        (
            "shroud-proxy",
            format!("tunnel-name = \"p.test\"\n\nlisten-htps = \"{VALUE}\"\n"),
            ":3: unknown key `listen-htps`; did you mean `listen-https`?",
        ),
        (
            "shroud-proxy",
            "tunnel-name = \"p.test\"\n\nmax-connections = \"lots\"\n".to_owned(),
            ":3: `max-connections` takes an integer, not a string",
        ),
        (
            "shroud",
            format!("target = \"127.0.0.1:1\"\n# comment\nacme-reload-cmd = [\"{VALUE}\"]\n"),
            ":3: `acme-reload-cmd` takes a string, not an array",
        ),
        (
            "shroud",
            format!("target = \"127.0.0.1:1\"\n\ntransport = \"{VALUE}\"\n"),
            ":3: `transport`: not a valid TRANSPORT for --transport: expected one of direct, tor",
        ),
        (
            "shroud-discovery",
            format!("listen = \"0.0.0.0:443\"\n\nheartbeat = \"{VALUE}\"\n"),
            ":3: unknown key `heartbeat`",
        ),
        (
            "shroud-discovery",
            format!("listen = \"0.0.0.0:443\"\n\nlisten = \"{VALUE}\n"),
            ":3: not TOML",
        ),
    ] {
        let path = dir.path().join(format!("{program}.toml"));
        write(&path, &text);
        let args = vec!["--config".to_owned(), path.display().to_string()];
        let (code, output) = run_to_exit(program, &args, &[]).await;
        assert_eq!(code, 2, "{program} with\n{text}\n{output}");
        let expected = format!("error: {}{says}", path.display());
        assert!(output.contains(&expected), "{program}: {output}");
        assert!(
            !output.contains(VALUE),
            "{program} printed the value: {output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_a_file_needs_are_clap_errors_with_the_files_lines() {
    init();
    let dir = tempfile::tempdir().unwrap();
    // --peer requires --listen-peer, from a file as on the command line.
    let path = dir.path().join("proxy.toml");
    write(
        &path,
        "tunnel-name = \"p.test\"\ntls-cert = \"c.pem\"\ntls-key = \"k.pem\"\n\
         peer = [\"192.0.2.1:7443\"]\n",
    );
    let args = vec!["--config".to_owned(), path.display().to_string()];
    let (code, output) = run_to_exit("shroud-proxy", &args, &[]).await;
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("--listen-peer"), "{output}");
    assert!(output.contains("peer (line 4)"), "{output}");

    // A missing file is refused the same way.
    let missing = dir.path().join("missing.toml");
    let env = [("SHROUD_CONFIG", missing.as_os_str())];
    let (code, output) = run_to_exit("shroud-proxy", &[], &env).await;
    assert_eq!(code, 2, "{output}");
    assert!(
        output.contains(&format!("cannot read config file {}", missing.display())),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shroud_key_prints_the_key_its_config_file_names() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let public = make_key(&dir.path().join("client.key")).unwrap();
    let path = dir.path().join("app.toml");
    write(
        &path,
        "target = \"127.0.0.1:443\"\nproxy = [\"p.test:443\"]\nkey = \"client.key\"\n",
    );
    let args = [
        "key".to_owned(),
        "--config".to_owned(),
        path.display().to_string(),
    ];
    let (code, output) = run_to_exit("shroud", &args, &[]).await;
    assert_eq!(code, 0, "{output}");
    assert!(output.lines().any(|line| line == public), "{output}");
}

/// An operator who keeps the service's settings in the environment (the deploy env files do)
/// runs `shroud-discovery key` in that same environment: the serving variables must not turn
/// the subcommand into a serve missing its other options. The key file comes from the
/// subcommand's own variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shroud_discovery_key_runs_amid_the_serving_variables() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("signing.key");
    let env = [
        ("SHROUD_DISCOVERY_SIGNING_KEY", key_path.as_os_str()),
        ("SHROUD_DISCOVERY_LISTEN", OsStr::new("127.0.0.1:1")),
        (
            "SHROUD_DISCOVERY_TLS_CERT",
            OsStr::new("/nonexistent/cert.pem"),
        ),
    ];
    let (code, output) = run_to_exit("shroud-discovery", &["key".to_owned()], &env).await;
    assert_eq!(code, 0, "{output}");
    let public = output.lines().next().unwrap_or_default();
    assert!(public.starts_with("ed25519:"), "{output}");
    assert!(
        key_path.exists(),
        "the key file the variable names was made"
    );

    // Serving still reads them: without the rest, a clear usage error naming what is missing.
    let (code, output) = run_to_exit("shroud-discovery", &[], &env).await;
    assert_eq!(code, 2, "{output}");
    let missing = output
        .split("not provided:")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_default();
    assert_eq!(missing.trim(), "--tls-key <FILE>", "{output}");
}
