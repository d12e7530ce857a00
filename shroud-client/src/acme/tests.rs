//! What needs no CA: settings refused before anything is asked, and the pure helpers. The tests
//! against a real CA (Debian's pebble) are the `tests` crate's `acme_module`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::transport::{DirectTransport, Resolve};

const HOST: &str = "shroud.example.com";

fn direct() -> Arc<dyn Transport> {
    Arc::new(DirectTransport::new(Resolve::new(), Duration::from_secs(5)))
}

#[tokio::test]
async fn bad_settings_are_refused_before_anything_is_asked() {
    let state = tempfile::tempdir().unwrap();
    let good = || {
        let mut config = AcmeConfig::new(
            HOST,
            "ops@example.com",
            "https://127.0.0.1:1/dir",
            state.path().to_owned(),
        );
        config.agree_tos = true;
        config
    };
    let start = |config| {
        Acme::start(
            config,
            direct(),
            Box::new(|| true),
            CancellationToken::new(),
        )
    };

    let mut config = good();
    config.hostname = "not a name".into();
    assert!(matches!(
        start(config).await,
        Err(AcmeError::BadHostname { .. })
    ));
    let mut config = good();
    config.directory = "http://127.0.0.1:1/dir".into();
    assert!(matches!(
        start(config).await,
        Err(AcmeError::BadDirectory { .. })
    ));
    let mut config = good();
    config.email = "nobody".into();
    assert!(matches!(
        start(config).await,
        Err(AcmeError::BadEmail { .. })
    ));
    let mut config = good();
    config.extra_ca = Some(state.path().join("missing.pem"));
    assert!(matches!(start(config).await, Err(AcmeError::Tls(_))));
}

#[test]
fn directory_shorthands() {
    assert_eq!(directory_url("letsencrypt"), LETSENCRYPT_PRODUCTION);
    assert_eq!(directory_url("letsencrypt-staging"), LETSENCRYPT_STAGING);
    assert_eq!(directory_url("https://ca.test/dir"), "https://ca.test/dir");
}

#[test]
fn contacts() {
    assert_eq!(contact("").unwrap(), Vec::<String>::new());
    assert_eq!(contact("a@b.test").unwrap(), vec!["mailto:a@b.test"]);
    assert_eq!(contact("mailto:a@b.test").unwrap(), vec!["mailto:a@b.test"]);
    assert!(contact("a b@c.test").is_err());
    assert!(contact("@c.test").is_err());
}
