//! Shared helpers: a throwaway CA, a discovery service on 127.0.0.1:0, HTTPS requests to it,
//! and a tiny DNS server.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use shroud_discovery::fleet::{Fleet, FleetFile};
use shroud_discovery::http::{self, Response};
use shroud_discovery::server::{self, ServerConfig};
use shroud_discovery::signed::ProxyEntry;
use shroud_mux::auth::SecretKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The name the test service's certificate is for.
pub const SERVICE_NAME: &str = "discovery.test";
/// A fleet secret for tests.
pub const SECRET: &str = "test-fleet-secret-0123456789";

/// Bounds a test step so that a hang fails instead of stalling the suite.
pub async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("test step timed out")
}

/// A CA, a leaf for [`SERVICE_NAME`] and 127.0.0.1 signed by it, all written to PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().unwrap();
        let names = vec![SERVICE_NAME.to_owned(), "127.0.0.1".to_owned()];
        let leaf_params = CertificateParams::new(names).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&ca, ca_cert.pem()).unwrap();
        std::fs::write(&cert, leaf.pem()).unwrap();
        std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
        Self { dir, ca, cert, key }
    }

    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        shroud_discovery::announce::client_tls(Some(&self.ca)).unwrap()
    }
}

pub fn entry(name: &str, port: u16, region: &str) -> ProxyEntry {
    ProxyEntry {
        name: name.into(),
        port,
        region: region.into(),
        onion: None,
    }
}

/// A running discovery service.
pub struct TestService {
    pub addr: SocketAddr,
    pub pki: Pki,
    pub signing_key: Arc<SecretKey>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl TestService {
    /// Starts a service with `statics` as its fleet file, after `adjust` has had its say.
    pub async fn start(statics: Vec<ProxyEntry>, adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let pki = Pki::new();
        let tls = server::tls_config(&pki.cert, &pki.key).unwrap();
        let signing_key = Arc::new(SecretKey::from_seed(&[42; 32]));
        let proxy = statics.into_iter().map(Into::into).collect();
        let fleet_file = FleetFile { proxy }.validate().unwrap();
        let fleet = Fleet::new(fleet_file, Duration::from_secs(30));
        let mut config = ServerConfig::new(tls, signing_key.clone(), fleet);
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::run(listener, config, shutdown.clone()));
        Self {
            addr,
            pki,
            signing_key,
            shutdown,
            task,
        }
    }

    /// A TLS connection to the service, its certificate checked against the test CA.
    pub async fn connect(&self) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from(SERVICE_NAME).unwrap();
        tokio_rustls::TlsConnector::from(self.pki.client_tls())
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// One request over a fresh connection.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        let stream = self.connect().await;
        within(http::request(
            stream,
            method,
            SERVICE_NAME,
            path,
            headers,
            body,
            64 * 1024,
        ))
        .await
        .unwrap()
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], None).await
    }

    /// Posts a heartbeat with the given bearer secret.
    pub async fn heartbeat(&self, secret: &str, json: &str) -> Response {
        let auth = format!("Bearer {secret}");
        self.request(
            "POST",
            "/v1/heartbeat",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            Some(json.as_bytes()),
        )
        .await
    }

    /// Stops the service and checks it ended cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        within(self.task).await.unwrap().unwrap();
    }
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
