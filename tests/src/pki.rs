//! A throwaway certificate authority and the leaf certificates it issues.
//!
//! Every test makes its own [`TestCa`], so a visitor that verifies against
//! [`TestCa::root_store`] proves the certificate it saw is the one the origin
//! holds: nothing between them could have forged it.
//!
//! Certificate generation only fails on a caller's mistake (a name that is
//! not a valid DNS name or IP address), so those functions panic with a clear
//! message instead of returning errors; file I/O returns errors.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::crypto::aws_lc_rs;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate authority that exists only for one test.
pub struct TestCa {
    common_name: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl TestCa {
    /// Creates a self-signed CA whose subject is `common_name`.
    ///
    /// # Panics
    ///
    /// If key generation or signing fails, which only happens when the
    /// common name cannot be encoded.
    pub fn new(common_name: &str) -> Self {
        let key = or_panic(KeyPair::generate(), "generate CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = or_panic(params.self_signed(&key), "self-sign CA certificate");
        TestCa {
            common_name: common_name.to_owned(),
            issuer: Issuer::new(params, key),
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
        }
    }

    /// Issues a leaf certificate for `names`, signed by this CA and valid now.
    ///
    /// Each name becomes a subject alternative name: a DNS name, or an IP
    /// address SAN if it parses as one. The first name is also the subject's
    /// common name.
    ///
    /// # Panics
    ///
    /// If `names` is empty or holds something that is neither a DNS name nor
    /// an IP address.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let first = match names.first() {
            Some(first) => *first,
            None => panic!("TestCa::issue needs at least one name"),
        };
        let owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = or_panic(
            CertificateParams::new(owned),
            "build leaf parameters (is every name a DNS name or IP address?)",
        );
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, first);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;

        let key = or_panic(KeyPair::generate(), "generate leaf key");
        let cert = or_panic(
            params.signed_by(&key, &self.issuer),
            "sign leaf certificate",
        );
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }

    /// The CA certificate, PEM-encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER-encoded.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// A root store that trusts this CA and nothing else.
    ///
    /// # Panics
    ///
    /// If rustls rejects the CA certificate, which would be a bug here.
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        or_panic(roots.add(self.cert_der()), "add test CA to root store");
        roots
    }

    /// Writes the CA certificate to `dir/{name}.pem` and returns that path.
    pub fn write_pem(&self, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("{name}.pem"));
        fs::write(&path, &self.cert_pem)
            .with_context(|| format!("write CA certificate to {}", path.display()))?;
        Ok(path)
    }
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

/// A leaf certificate and its private key, in both PEM and DER.
pub struct Leaf {
    /// The certificate, PEM-encoded.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM-encoded.
    pub key_pem: String,
    /// The certificate, DER-encoded.
    pub cert_der: CertificateDer<'static>,
    /// The private key, PKCS#8 DER-encoded.
    pub key_der: PrivateKeyDer<'static>,
}

impl Leaf {
    /// A copy of the private key (`PrivateKeyDer` is deliberately not `Clone`).
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key_der.clone_key()
    }

    /// A rustls server configuration presenting this certificate, offering
    /// the given ALPN protocols (none if `alpn` is empty).
    ///
    /// It names the aws-lc-rs provider explicitly, so it works whether or not
    /// [`crate::init`] ran.
    ///
    /// # Panics
    ///
    /// If rustls rejects the certificate or key, which would be a bug here.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let builder = or_panic(
            ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions(),
            "choose TLS versions",
        );
        let mut config = or_panic(
            builder
                .with_no_client_auth()
                .with_single_cert(vec![self.cert_der.clone()], self.key_der()),
            "build server config from leaf",
        );
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// Writes the certificate to `dir/{stem}.pem` and the key to
    /// `dir/{stem}.key` (mode 0600), returning `(cert, key)` paths.
    pub fn write_files(&self, dir: &Path, stem: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        fs::write(&cert, &self.cert_pem)
            .with_context(|| format!("write certificate to {}", cert.display()))?;
        write_private(&key, self.key_pem.as_bytes())
            .with_context(|| format!("write private key to {}", key.display()))?;
        Ok((cert, key))
    }
}

impl Clone for Leaf {
    fn clone(&self) -> Self {
        Leaf {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            cert_der: self.cert_der.clone(),
            key_der: self.key_der(),
        }
    }
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of Debug output, as house style asks of every secret.
        f.debug_struct("Leaf")
            .field("cert_der_len", &self.cert_der.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Writes `contents` to `path` readable by the owner only.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        options.mode(0o600);
        let mut file = options.open(path)?;
        // `mode` only applies when the file is created; tighten a pre-existing one too.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(path)?;
        file.write_all(contents)?;
        file.sync_all()
    }
}

#[track_caller]
fn or_panic<T, E: fmt::Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(err) => panic!("test PKI: {what}: {err}"),
    }
}
