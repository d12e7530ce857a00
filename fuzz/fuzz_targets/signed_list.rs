//! The signed proxy list (`shroud_discovery::signed::verify`).
//!
//! The first input byte picks the mode: even, the rest is a response body as the service
//! would send it (signature and all); odd, the rest is a payload that the target signs with
//! the pinned key, so the fuzzer reaches the JSON and the checks behind the signature.
//!
//! Properties, beyond not panicking:
//! - an accepted list keeps every promise `verify` makes: version, host, clock and lifetime
//!   bounds, at most `MAX_PROXIES` proxies with names in normal form and ports not 0;
//! - it signs again into a body that verifies to the same list, and is refused as a replay
//!   once a newer list has been seen;
//! - the expected host is compared in normal form: `Example.TEST.` gives the same verdict.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use shroud_discovery::signed::{
    sign, verify, VerifyError, LIST_VERSION, MAX_CLOCK_SKEW_SECS, MAX_LIFETIME_SECS, MAX_PROXIES,
    SIGNATURE_CONTEXT,
};
use shroud_mux::auth::SecretKey;

const NOW: u64 = 1_700_000_000;
const HOST: &str = "example.test";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let key = SecretKey::from_seed(&[7; 32]);
    let pinned = key.public();
    let body = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let mut signed = SIGNATURE_CONTEXT.to_vec();
        signed.extend_from_slice(rest);
        let signature = key.sign(&signed);
        format!(
            r#"{{"payload":"{}","signature":"{}"}}"#,
            URL_SAFE_NO_PAD.encode(rest),
            URL_SAFE_NO_PAD.encode(signature)
        )
        .into_bytes()
    };

    let result = verify(&body, &pinned, HOST, NOW, None);
    let loose = verify(&body, &pinned, "Example.TEST.", NOW, None);
    assert_eq!(
        result.as_ref().ok(),
        loose.as_ref().ok(),
        "the expected host's case or trailing dot changed the verdict"
    );
    let Ok(list) = result else {
        return;
    };
    assert_eq!(list.version, LIST_VERSION);
    assert_eq!(list.host, HOST);
    assert!(list.issued_at <= NOW + MAX_CLOCK_SKEW_SECS);
    assert!(list.expires_at > NOW);
    assert!(list.expires_at - list.issued_at <= MAX_LIFETIME_SECS);
    assert!(list.proxies.len() <= MAX_PROXIES);
    for entry in &list.proxies {
        assert_eq!(
            shroud_mux::hostname::normalize(&entry.name).as_deref(),
            Ok(entry.name.as_str())
        );
        assert_ne!(entry.port, 0);
    }
    let again = sign(&list, &key).expect("signing an accepted list");
    assert_eq!(
        verify(&again, &pinned, HOST, NOW, None).ok(),
        Some(list.clone())
    );
    assert!(matches!(
        verify(&body, &pinned, HOST, NOW, Some(list.issued_at + 1)),
        Err(VerifyError::Replay { .. })
    ));
});
