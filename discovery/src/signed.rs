//! The signed proxy list: what the discovery service answers and what clients verify.
//!
//! The list itself is JSON ([`ProxyList`]). On the wire it travels as the exact bytes that were
//! signed, base64url-encoded, next to the signature:
//!
//! ```json
//! {"payload": "<base64url of the ProxyList JSON>", "signature": "<base64url of 64 bytes>"}
//! ```
//!
//! The signature is ed25519 over [`SIGNATURE_CONTEXT`] followed by the payload bytes, so a
//! discovery key's signature can never be mistaken for any other shroud signature. Clients pin
//! the service's public key; [`verify`] checks the signature first and only then reads the list,
//! so nothing an unauthenticated party sent is ever interpreted.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use shroud_mux::auth::{PublicKey, SecretKey};
use shroud_mux::hostname::HostnameError;

/// Domain separation prefix of the signed bytes.
pub const SIGNATURE_CONTEXT: &[u8] = b"shroud-discovery-v1\0";
/// The only list format version there is.
pub const LIST_VERSION: u8 = 1;
/// Largest response body [`verify`] reads, in bytes.
pub const MAX_BODY_LEN: usize = 64 * 1024;
/// Most proxies one list may name.
pub const MAX_PROXIES: usize = 64;
/// How far in the future a list's `issued_at` may lie, to allow for clock skew (seconds).
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// Longest validity a list may claim, `expires_at - issued_at` (seconds).
pub const MAX_LIFETIME_SECS: u64 = 86_400;

/// One proxy a client may hold a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyEntry {
    /// The proxy's hostname: clients dial it and check its certificate against it.
    pub name: String,
    /// The proxy's TLS port for tunnels, usually 443.
    pub port: u16,
    /// A free-form region label; lists spread their entries across regions.
    pub region: String,
    /// The proxy's tunnel listener as an onion service, `ADDRESS.onion:PORT`, when it has one
    /// (`shroud-proxy --onion-tunnel`): a client with Tor dials it instead of `name:port`, so
    /// its tunnel needs no exit, and still checks the proxy's certificate against `name`.
    ///
    /// Left out when absent, so such entries are byte for byte what they were before the
    /// field existed; and served only to clients that ask for it (`onion=1` in the request),
    /// since earlier clients refuse fields they do not know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onion: Option<String>,
}

/// The proxies a client should use for one hostname, valid for a limited time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyList {
    /// Format version, [`LIST_VERSION`].
    pub version: u8,
    /// The hostname the list was issued for, normalised.
    pub host: String,
    /// When the list was made, in seconds since the Unix epoch.
    pub issued_at: u64,
    /// When the list stops being valid, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// The proxies, most preferred first.
    pub proxies: Vec<ProxyEntry>,
}

/// The wire form: the signed bytes and their signature, both base64url without padding.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    payload: String,
    signature: String,
}

/// Why a list could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The list could not be encoded as JSON.
    #[error("could not encode the proxy list as JSON")]
    Encode(#[source] serde_json::Error),
}

/// Why a response body is not an acceptable proxy list.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The body is larger than [`MAX_BODY_LEN`].
    #[error("the proxy list is {len} bytes, more than the {MAX_BODY_LEN} allowed")]
    TooLarge {
        /// The body's length.
        len: usize,
    },
    /// The body is not the JSON envelope `{"payload", "signature"}`.
    #[error("the response is not a signed proxy list")]
    Envelope(#[source] serde_json::Error),
    /// The payload or signature is not base64url, or the signature is not 64 bytes.
    #[error("the signed proxy list's payload or signature is badly encoded")]
    Encoding,
    /// The signature does not verify under the pinned key: forged, altered, or signed by
    /// another key.
    #[error("the proxy list's signature does not verify under the pinned discovery key")]
    BadSignature,
    /// The signed payload is not a proxy list (a bug or a newer format on the service's side).
    #[error("the signed payload is not a proxy list")]
    Payload(#[source] serde_json::Error),
    /// The list has a version other than [`LIST_VERSION`].
    #[error("the proxy list has version {0}; only version {LIST_VERSION} is understood")]
    UnsupportedVersion(u8),
    /// The list was issued for another hostname.
    #[error("the proxy list is for {got:?}, not {expected:?}")]
    WrongHost {
        /// The hostname asked for.
        expected: String,
        /// The hostname the list names.
        got: String,
    },
    /// The list's issue time lies further in the future than clock skew explains.
    #[error(
        "the proxy list was issued at {issued_at}, more than {MAX_CLOCK_SKEW_SECS} s after \
         now ({now}); is a clock wrong?"
    )]
    FromTheFuture {
        /// The list's `issued_at`.
        issued_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The list has expired.
    #[error("the proxy list expired at {expires_at}; now is {now}")]
    Expired {
        /// The list's `expires_at`.
        expires_at: u64,
        /// The verifier's clock.
        now: u64,
    },
    /// The list expires before it was issued, or claims validity longer than
    /// [`MAX_LIFETIME_SECS`].
    #[error(
        "the proxy list claims validity from {issued_at} to {expires_at}; at most \
         {MAX_LIFETIME_SECS} s is allowed"
    )]
    BadLifetime {
        /// The list's `issued_at`.
        issued_at: u64,
        /// The list's `expires_at`.
        expires_at: u64,
    },
    /// The list is older than one already accepted: a replay.
    #[error(
        "the proxy list was issued at {issued_at}, before the newest list already seen \
         ({newest_seen}); refusing a replayed list"
    )]
    Replay {
        /// The list's `issued_at`.
        issued_at: u64,
        /// The newest `issued_at` the verifier had accepted before.
        newest_seen: u64,
    },
    /// The list names more than [`MAX_PROXIES`] proxies.
    #[error("the proxy list names {count} proxies, more than the {MAX_PROXIES} allowed")]
    TooManyProxies {
        /// How many it names.
        count: usize,
    },
    /// A proxy's name is not a hostname in normal form (lower case, no trailing dot).
    #[error("the proxy list names {name:?}, which is not a valid hostname")]
    BadProxyName {
        /// The offending name.
        name: String,
        /// What is wrong with it, if it is not a hostname at all (`None`: not normalised).
        #[source]
        reason: Option<HostnameError>,
    },
    /// A proxy's port is 0.
    #[error("the proxy list gives {name} port 0")]
    ZeroPort {
        /// The proxy's name.
        name: String,
    },
    /// A proxy's onion endpoint is not `ADDRESS.onion:PORT` in normal form.
    #[error(
        "the proxy list gives {name} the onion endpoint {onion:?}, which is not ADDRESS.onion:PORT"
    )]
    BadOnion {
        /// The proxy's name.
        name: String,
        /// The endpoint as listed.
        onion: String,
    },
}

/// Signs `list` with `key` and returns the wire form, the response body.
///
/// Nothing about the list is checked here, so tests can make lists that [`verify`] refuses.
pub fn sign(list: &ProxyList, key: &SecretKey) -> Result<Vec<u8>, SignError> {
    let payload = serde_json::to_vec(list).map_err(SignError::Encode)?;
    let signature = key.sign(&signed_bytes(&payload));
    let envelope = Envelope {
        payload: URL_SAFE_NO_PAD.encode(&payload),
        signature: URL_SAFE_NO_PAD.encode(signature),
    };
    serde_json::to_vec(&envelope).map_err(SignError::Encode)
}

/// Checks a response body against the pinned key and returns the list it carries.
///
/// `expected_host` is the hostname the list was asked for (it is normalised before comparing),
/// `now` the verifier's clock in Unix seconds, and `newest_seen` the `issued_at` of the newest
/// list accepted before, if any: an older list is refused as a replay.
pub fn verify(
    body: &[u8],
    pinned: &PublicKey,
    expected_host: &str,
    now: u64,
    newest_seen: Option<u64>,
) -> Result<ProxyList, VerifyError> {
    if body.len() > MAX_BODY_LEN {
        return Err(VerifyError::TooLarge { len: body.len() });
    }
    let envelope: Envelope = serde_json::from_slice(body).map_err(VerifyError::Envelope)?;
    let payload = URL_SAFE_NO_PAD
        .decode(&envelope.payload)
        .map_err(|_| VerifyError::Encoding)?;
    let mut signature = [0u8; 64];
    match URL_SAFE_NO_PAD.decode_slice(&envelope.signature, &mut signature) {
        Ok(64) => {}
        _ => return Err(VerifyError::Encoding),
    }
    if !pinned.verify(&signed_bytes(&payload), &signature) {
        return Err(VerifyError::BadSignature);
    }

    let list: ProxyList = serde_json::from_slice(&payload).map_err(VerifyError::Payload)?;
    if list.version != LIST_VERSION {
        return Err(VerifyError::UnsupportedVersion(list.version));
    }
    let expected =
        shroud_mux::hostname::normalize(expected_host).unwrap_or_else(|_| expected_host.to_owned());
    if list.host != expected {
        return Err(VerifyError::WrongHost {
            expected,
            got: list.host,
        });
    }
    check_times(&list, now, newest_seen)?;
    if list.proxies.len() > MAX_PROXIES {
        return Err(VerifyError::TooManyProxies {
            count: list.proxies.len(),
        });
    }
    for entry in &list.proxies {
        match shroud_mux::hostname::normalize(&entry.name) {
            Ok(normal) if normal == entry.name => {}
            Ok(_) => {
                return Err(VerifyError::BadProxyName {
                    name: entry.name.clone(),
                    reason: None,
                })
            }
            Err(reason) => {
                return Err(VerifyError::BadProxyName {
                    name: entry.name.clone(),
                    reason: Some(reason),
                })
            }
        }
        if entry.port == 0 {
            return Err(VerifyError::ZeroPort {
                name: entry.name.clone(),
            });
        }
        if let Some(onion) = &entry.onion {
            if check_onion(onion).as_deref() != Ok(onion.as_str()) {
                return Err(VerifyError::BadOnion {
                    name: entry.name.clone(),
                    onion: onion.clone(),
                });
            }
        }
    }
    Ok(list)
}

/// Reads an onion endpoint, `ADDRESS.onion:PORT` (the port is required), and returns it in
/// normal form (the address lower case).
pub fn check_onion(text: &str) -> Result<String, shroud_mux::onion::OnionError> {
    if !text.contains(':') {
        return Err(shroud_mux::onion::OnionError::BadPort);
    }
    let (address, port) = shroud_mux::onion::parse_endpoint(text, 0)?;
    Ok(format!("{address}:{port}"))
}

fn check_times(list: &ProxyList, now: u64, newest_seen: Option<u64>) -> Result<(), VerifyError> {
    let (issued_at, expires_at) = (list.issued_at, list.expires_at);
    if issued_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
        return Err(VerifyError::FromTheFuture { issued_at, now });
    }
    if expires_at <= now {
        return Err(VerifyError::Expired { expires_at, now });
    }
    match expires_at.checked_sub(issued_at) {
        Some(lifetime) if lifetime <= MAX_LIFETIME_SECS => {}
        _ => {
            return Err(VerifyError::BadLifetime {
                issued_at,
                expires_at,
            })
        }
    }
    if let Some(newest_seen) = newest_seen {
        if issued_at < newest_seen {
            return Err(VerifyError::Replay {
                issued_at,
                newest_seen,
            });
        }
    }
    Ok(())
}

/// The bytes a signature covers: the context, then the payload.
fn signed_bytes(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNATURE_CONTEXT.len() + payload.len());
    out.extend_from_slice(SIGNATURE_CONTEXT);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn key() -> SecretKey {
        SecretKey::from_seed(&[3; 32])
    }

    fn list() -> ProxyList {
        ProxyList {
            version: LIST_VERSION,
            host: "example.test".into(),
            issued_at: NOW,
            expires_at: NOW + 300,
            proxies: vec![
                ProxyEntry {
                    name: "p1.example.net".into(),
                    port: 443,
                    region: "eu".into(),
                    onion: None,
                },
                ProxyEntry {
                    name: "p2.example.net".into(),
                    port: 8443,
                    region: "us".into(),
                    onion: Some(format!(
                        "{}:443",
                        shroud_mux::onion::from_public_key(&[2; 32])
                    )),
                },
            ],
        }
    }

    fn check(list: &ProxyList, now: u64, newest: Option<u64>) -> Result<ProxyList, VerifyError> {
        let body = sign(list, &key()).unwrap();
        verify(&body, &key().public(), "example.test", now, newest)
    }

    #[test]
    fn round_trip() {
        let body = sign(&list(), &key()).unwrap();
        let got = verify(&body, &key().public(), "Example.TEST.", NOW, Some(NOW)).unwrap();
        assert_eq!(got, list());
        // The wire form is the documented envelope.
        let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let keys: Vec<_> = envelope.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["payload", "signature"]);
    }

    #[test]
    fn forged_or_altered_lists_are_refused() {
        let body = sign(&list(), &key()).unwrap();
        let mut envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();

        // A different payload under the original signature.
        let mut evil = list();
        evil.proxies[0].name = "evil.example".into();
        envelope["payload"] = URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&evil).unwrap())
            .into();
        let forged = serde_json::to_vec(&envelope).unwrap();
        assert!(matches!(
            verify(&forged, &key().public(), "example.test", NOW, None),
            Err(VerifyError::BadSignature)
        ));

        // Signed by another key.
        let other = SecretKey::from_seed(&[4; 32]);
        let body = sign(&list(), &other).unwrap();
        assert!(matches!(
            verify(&body, &key().public(), "example.test", NOW, None),
            Err(VerifyError::BadSignature)
        ));

        // A signature over the payload without the context prefix.
        let payload = serde_json::to_vec(&list()).unwrap();
        let bare = serde_json::json!({
            "payload": URL_SAFE_NO_PAD.encode(&payload),
            "signature": URL_SAFE_NO_PAD.encode(key().sign(&payload)),
        });
        assert!(matches!(
            verify(
                &serde_json::to_vec(&bare).unwrap(),
                &key().public(),
                "example.test",
                NOW,
                None
            ),
            Err(VerifyError::BadSignature)
        ));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let pinned = key().public();
        for body in [
            &b"not json"[..],
            br#"{"payload":"","signature":"","extra":1}"#,
            br#"{"payload":""}"#,
        ] {
            assert!(matches!(
                verify(body, &pinned, "example.test", NOW, None),
                Err(VerifyError::Envelope(_))
            ));
        }
        for body in [
            &br#"{"payload":"!!","signature":""}"#[..],
            br#"{"payload":"","signature":"AAAA"}"#,
        ] {
            assert!(matches!(
                verify(body, &pinned, "example.test", NOW, None),
                Err(VerifyError::Encoding)
            ));
        }
        let oversized = vec![b' '; MAX_BODY_LEN + 1];
        assert!(matches!(
            verify(&oversized, &pinned, "example.test", NOW, None),
            Err(VerifyError::TooLarge { .. })
        ));
    }

    #[test]
    fn expired_future_and_replayed_lists_are_refused() {
        assert!(matches!(
            check(&list(), NOW + 300, None),
            Err(VerifyError::Expired { .. })
        ));
        assert!(check(&list(), NOW + 299, None).is_ok());
        assert!(matches!(
            check(&list(), NOW - 61, None),
            Err(VerifyError::FromTheFuture { .. })
        ));
        assert!(check(&list(), NOW - 60, None).is_ok());
        assert!(matches!(
            check(&list(), NOW, Some(NOW + 1)),
            Err(VerifyError::Replay {
                issued_at: NOW,
                newest_seen
            }) if newest_seen == NOW + 1
        ));

        let mut long = list();
        long.expires_at = NOW + MAX_LIFETIME_SECS + 1;
        assert!(matches!(
            check(&long, NOW, None),
            Err(VerifyError::BadLifetime { .. })
        ));
        let mut backwards = list();
        backwards.issued_at = NOW + 10;
        backwards.expires_at = NOW + 5;
        assert!(matches!(
            check(&backwards, NOW, None),
            Err(VerifyError::BadLifetime { .. })
        ));
    }

    #[test]
    fn wrong_host_version_and_entries_are_refused() {
        let body = sign(&list(), &key()).unwrap();
        let err = verify(&body, &key().public(), "other.test", NOW, None).unwrap_err();
        assert!(matches!(err, VerifyError::WrongHost { .. }), "{err:?}");
        assert!(err.to_string().contains("other.test"), "{err}");

        let mut v2 = list();
        v2.version = 2;
        assert!(matches!(
            check(&v2, NOW, None),
            Err(VerifyError::UnsupportedVersion(2))
        ));

        let mut bad_name = list();
        bad_name.proxies[1].name = "bad name".into();
        assert!(matches!(
            check(&bad_name, NOW, None),
            Err(VerifyError::BadProxyName {
                reason: Some(_),
                ..
            })
        ));
        let mut upper = list();
        upper.proxies[1].name = "P2.example.net".into();
        assert!(matches!(
            check(&upper, NOW, None),
            Err(VerifyError::BadProxyName { reason: None, .. })
        ));

        let mut zero = list();
        zero.proxies[0].port = 0;
        assert!(matches!(
            check(&zero, NOW, None),
            Err(VerifyError::ZeroPort { .. })
        ));

        let mut many = list();
        many.proxies = (0..=MAX_PROXIES)
            .map(|i| ProxyEntry {
                name: format!("p{i}.example.net"),
                port: 443,
                region: "eu".into(),
                onion: None,
            })
            .collect();
        assert!(matches!(
            check(&many, NOW, None),
            Err(VerifyError::TooManyProxies { count: 65 })
        ));
    }

    #[test]
    fn onion_endpoints_must_be_valid_and_normal() {
        let address = shroud_mux::onion::from_public_key(&[2; 32]);
        for bad in [
            address.clone(),
            format!("{}:443", address.to_ascii_uppercase()),
            format!("{address}:0"),
            "p2.example.net:443".to_owned(),
            format!("{}:443", address.replacen('a', "b", 1)),
        ] {
            let mut listed = list();
            listed.proxies[1].onion = Some(bad.clone());
            assert!(
                matches!(check(&listed, NOW, None), Err(VerifyError::BadOnion { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_entry_without_onion_signs_as_before_the_field_existed() {
        // The payload of a list without onion endpoints has no trace of the field, so lists
        // signed before it existed and after are the same bytes, and earlier clients (which
        // refuse unknown fields) read them.
        let mut plain = list();
        plain.proxies[1].onion = None;
        let payload = serde_json::to_string(&plain).unwrap();
        assert!(!payload.contains("onion"), "{payload}");
        let with = serde_json::to_string(&list()).unwrap();
        assert!(with.contains(r#""onion":""#), "{with}");
    }

    #[test]
    fn unknown_fields_in_the_payload_are_refused() {
        let mut payload = serde_json::to_value(list()).unwrap();
        payload["extra"] = 1.into();
        let payload = serde_json::to_vec(&payload).unwrap();
        let body = serde_json::to_vec(&serde_json::json!({
            "payload": URL_SAFE_NO_PAD.encode(&payload),
            "signature": URL_SAFE_NO_PAD.encode(key().sign(&signed_bytes(&payload))),
        }))
        .unwrap();
        assert!(matches!(
            verify(&body, &key().public(), "example.test", NOW, None),
            Err(VerifyError::Payload(_))
        ));
    }
}
