//! Debian's pebble (a test ACME CA) and pebble-challtestsrv (its DNS) on 127.0.0.1, for tests.
//!
//! [`PebbleSetup::new`] picks free ports and writes pebble's config
//! and its own HTTPS certificate (issued by a throwaway CA, [`PebbleSetup::ca_pem`], to trust
//! as `--acme-ca`); [`PebbleSetup::start`] runs both programs and returns once they accept
//! connections; dropping the [`Pebble`] kills both by PID. The same setup may be started
//! again on the same ports (a CA that comes back), but pebble keeps nothing across restarts:
//! accounts and its root are new each time.
//!
//! challtestsrv answers every A query with 127.0.0.1 and AAAA with nothing, so pebble's
//! validator dials `127.0.0.1:tls_port` for any name: the port the test's responder (or the
//! proxy) listens on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{self, Read as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::ports::free_port;

/// How long pebble may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A pebble configuration on free ports, ready to start (again).
#[derive(Debug)]
pub struct PebbleSetup {
    dir: tempfile::TempDir,
    /// The ACME port (`https://127.0.0.1:PORT/dir`).
    pub acme_port: u16,
    /// pebble's management port (`/roots/0` is its root certificate).
    pub management_port: u16,
    /// Where pebble's validator connects for TLS-ALPN-01.
    pub tls_port: u16,
    dns_port: u16,
    dns_management_port: u16,
    /// Seconds each certificate is valid (pebble's default: five years).
    pub validity_secs: Option<u64>,
    /// Names pebble refuses by policy (`rejectedIdentifier`).
    pub blocklist: Vec<String>,
}

impl PebbleSetup {
    /// A setup whose validator dials `tls_port`; writes the CA and pebble's certificate.
    pub fn new(tls_port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        Self {
            dir,
            acme_port: free_port().unwrap(),
            management_port: free_port().unwrap(),
            tls_port,
            dns_port: free_port().unwrap(),
            dns_management_port: free_port().unwrap(),
            validity_secs: None,
            blocklist: Vec::new(),
        }
    }

    /// The ACME directory URL.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The CA of pebble's own HTTPS certificate (not of what it issues: see
    /// [`Pebble::root_pem`]).
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Starts challtestsrv and pebble, and waits until both listen.
    pub fn start(&self) -> io::Result<Pebble> {
        let dir = self.dir.path();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{}", self.acme_port),
                "managementListenAddress": format!("127.0.0.1:{}", self.management_port),
                "certificate": dir.join("cert.pem"),
                "privateKey": dir.join("key.pem"),
                // HTTP-01 is not used; pebble still wants a port.
                "httpPort": free_port().unwrap(),
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": self.validity_secs,
                "domainBlocklist": self.blocklist,
            }
        });
        let config_path = dir.join("pebble-config.json");
        fs::write(&config_path, config.to_string())?;

        let log = |name: &str| fs::File::create(dir.join(name));
        let dns = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{}", self.dns_port)])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args([
                "-management",
                &format!("127.0.0.1:{}", self.dns_management_port),
            ])
            .stdin(Stdio::null())
            .stdout(log("challtestsrv.log")?)
            .stderr(log("challtestsrv.err")?)
            .spawn()
            .map_err(|err| not_installed("pebble-challtestsrv", err))?;
        let dns = Process(dns);
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("127.0.0.1:{}", self.dns_port)])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            // Deterministic tests: no spurious badNonce, a fresh authorization per order.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log("pebble.log")?)
            .stderr(log("pebble.err")?)
            .spawn()
            .map_err(|err| not_installed("pebble", err))?;
        let mut running = Pebble {
            pebble: Process(pebble),
            dns,
            dir: dir.to_owned(),
            management_port: self.management_port,
            ca_pem: self.ca_pem(),
        };
        running.wait_listening(self.dns_management_port)?;
        running.wait_listening(self.acme_port)?;
        running.wait_listening(self.management_port)?;
        Ok(running)
    }
}

fn not_installed(program: &str, err: io::Error) -> io::Error {
    io::Error::new(
        err.kind(),
        format!("could not run {program} (Debian package pebble): {err}"),
    )
}

/// A child process killed (by its PID) and reaped on drop.
#[derive(Debug)]
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Running pebble and challtestsrv; both stop on drop.
#[derive(Debug)]
pub struct Pebble {
    pebble: Process,
    dns: Process,
    dir: PathBuf,
    management_port: u16,
    ca_pem: PathBuf,
}

impl Pebble {
    fn wait_listening(&mut self, port: u16) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            let exited = match self.pebble.0.try_wait()? {
                Some(status) => Some(status),
                None => self.dns.0.try_wait()?,
            };
            if let Some(status) = exited {
                return Err(io::Error::other(format!(
                    "pebble or challtestsrv exited ({status}) before listening on {port}: {}{}",
                    self.log(),
                    self.read_logs(&["challtestsrv.log", "challtestsrv.err"]),
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nothing listens on {port} after {START_TIMEOUT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything pebble wrote so far (it logs each request: `POST /sign-me-up` is a new
    /// account).
    pub fn log(&self) -> String {
        self.read_logs(&["pebble.log", "pebble.err"])
    }

    fn read_logs(&self, names: &[&str]) -> String {
        let mut text = String::new();
        for name in names {
            if let Ok(mut file) = fs::File::open(self.dir.join(name)) {
                let _ = file.read_to_string(&mut text);
            }
        }
        text
    }

    /// The root that pebble's certificates chain to (new at every start), as the only root
    /// of a store: what a visitor that trusts pebble alone trusts.
    pub async fn roots(&self) -> io::Result<rustls::RootCertStore> {
        let pem = self.root_pem().await?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots
                .add(cert.map_err(io::Error::other)?)
                .map_err(io::Error::other)?;
        }
        if roots.is_empty() {
            return Err(io::Error::other("pebble answered no root certificate"));
        }
        Ok(roots)
    }

    /// The root that pebble's certificates chain to (new at every start), as PEM.
    pub async fn root_pem(&self) -> io::Result<String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca_pem).map_err(io::Error::other)? {
            roots
                .add(cert.map_err(io::Error::other)?)
                .map_err(io::Error::other)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.management_port)).await?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                ServerName::try_from("127.0.0.1").map_err(io::Error::other)?,
                tcp,
            )
            .await?;
        // HTTP/1.0: the answer is the body up to the end of the connection, never chunked.
        tls.write_all(b"GET /roots/0 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        match tls.read_to_end(&mut response).await {
            Ok(_) => {}
            // Go closes without close_notify.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(err) => return Err(err),
        }
        let response = String::from_utf8(response).map_err(io::Error::other)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| io::Error::other("no HTTP header end"))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(io::Error::other(format!("pebble answered {head}")));
        }
        Ok(body.to_owned())
    }
}
