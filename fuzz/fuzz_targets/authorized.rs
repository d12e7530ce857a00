//! The `--authorized` file (`shroud_proxy::policy::Policy::parse`).
//!
//! Properties, beyond not panicking:
//! - an accepted file grants every binding it lists: `HOSTNAME KEY` lets KEY publish the
//!   hostname (in normal form), `*.PARENT KEY` lets it publish any name below PARENT;
//! - it counts no more bindings than it has binding lines;
//! - a refused file names a line that exists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shroud_mux::auth::PublicKey;
use shroud_mux::hostname::normalize;
use shroud_proxy::policy::{Policy, PolicyError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = text.lines().count();
    let policy = match Policy::parse(text) {
        Ok(policy) => policy,
        Err(PolicyError::Line { line, .. }) => {
            assert!((1..=lines).contains(&line), "line {line} of {lines}");
            return;
        }
        Err(other) => panic!("parse gave {other:?}"),
    };
    let mut bindings = 0;
    for line in text.lines() {
        let content = line.split('#').next().unwrap_or_default();
        let fields: Vec<&str> = content.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let [name, key] = fields[..] else {
            panic!("accepted a line of {} fields: {line:?}", fields.len());
        };
        bindings += 1;
        let key: PublicKey = key.parse().expect("accepted a bad key");
        match name.strip_prefix("*.") {
            Some(parent) => {
                let parent = normalize(parent).expect("accepted a bad wildcard");
                let below = format!("x.{parent}");
                assert!(
                    policy.allows(&below, &key),
                    "{line:?} does not allow {below}"
                );
                assert!(policy.covers(&below));
            }
            None => {
                let name = normalize(name).expect("accepted a bad hostname");
                assert!(policy.allows(&name, &key), "{line:?} does not allow {name}");
                assert!(policy.covers(&name));
            }
        }
    }
    assert!(policy.len() <= bindings);
    assert_eq!(policy.is_empty(), policy.len() == 0);
});
