//! Word names: a hostname that a client key proves by itself.
//!
//! A client without a domain of its own publishes at `WORDS.DOMAIN`, where DOMAIN is one the
//! proxy operator offers (`shroud-proxy --word-names DOMAIN`) and WORDS is [`word_label`] of
//! the client's public key: four words of the EFF large wordlist (7,776 words chosen to be
//! easy to read and free of offensive ones), taken from a hash of the key and joined by `-`,
//! like `grove-tundra-wink-ember`. The name is stable for as long as the key is, needs no
//! authorized-file entry or DNS record, and no other key can bind it: a proxy grants
//! `LABEL.DOMAIN` to a key only if LABEL is that key's word label.
//!
//! Four words carry 51.7 bits. Taking a given name means finding a key whose label is that
//! name's, about 2^51 key generations and hashes on average; a name that must resist a
//! determined, well-funded attacker belongs under a domain of its own, authorized by key.

use sha2::{Digest as _, Sha256};

use crate::auth::PublicKey;

/// Words in a label.
pub const WORDS: usize = 4;
/// Domain separation for the hash the words come from.
const CONTEXT: &[u8] = b"shroud-word-name-v1\0";

/// The word label of `key`: [`WORDS`] words joined by `-`, a valid DNS label (at most 39
/// bytes, lower-case letters and `-`).
pub fn word_label(key: &PublicKey) -> String {
    let list = eff_wordlist::large::LIST;
    let digest = Sha256::new()
        .chain_update(CONTEXT)
        .chain_update(key.to_bytes())
        .finalize();
    // 128 bits, read as base-7776 digits: the bias of the top digit is below 2^-70.
    let mut value = u128::from_be_bytes(digest[..16].try_into().unwrap_or([0; 16]));
    let base = list.len() as u128;
    let mut words = Vec::with_capacity(WORDS);
    for _ in 0..WORDS {
        let index = usize::try_from(value % base).unwrap_or(0);
        words.push(list[index].1);
        value /= base;
    }
    words.join("-")
}

/// The word name of `key` under `domain` (a normalised hostname): `LABEL.DOMAIN`.
pub fn word_name(key: &PublicKey, domain: &str) -> String {
    format!("{}.{domain}", word_label(key))
}

/// If `hostname` (normalised) is a single label directly under one of `domains`, that domain;
/// the name is then a word name, which only the key whose label it is may bind.
pub fn word_domain<'a>(hostname: &str, domains: &'a [String]) -> Option<&'a str> {
    let (_, parent) = hostname.split_once('.')?;
    domains
        .iter()
        .map(String::as_str)
        .find(|domain| *domain == parent)
}

/// Whether `key` may bind `hostname` as a word name under one of `domains`: it is a single
/// label under one of them, and that label is `key`'s.
pub fn allows(hostname: &str, domains: &[String], key: &PublicKey) -> bool {
    word_domain(hostname, domains).is_some_and(|domain| word_name(key, domain) == hostname)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::SecretKey;

    fn key(seed: u8) -> PublicKey {
        SecretKey::from_seed(&[seed; 32]).public()
    }

    #[test]
    fn a_key_has_one_stable_label_of_four_words() {
        let label = word_label(&key(1));
        assert_eq!(label, word_label(&key(1)), "the same key, the same words");
        assert_eq!(label.split('-').count(), WORDS, "{label}");
        assert!(label.len() <= 63, "a DNS label: {label}");
        let normal = crate::hostname::normalize(&format!("{label}.fleet.test")).unwrap();
        assert_eq!(normal, format!("{label}.fleet.test"), "already normal");
        assert_ne!(label, word_label(&key(2)), "another key, other words");
    }

    #[test]
    fn labels_spread_over_the_list() {
        let mut first_words = std::collections::HashSet::new();
        for seed in 0..=255u8 {
            first_words.insert(word_label(&key(seed)).split('-').next().map(str::to_owned));
        }
        // 256 draws from 7,776 words: nearly all distinct.
        assert!(first_words.len() > 240, "{}", first_words.len());
    }

    #[test]
    fn only_the_keys_own_label_under_an_offered_domain_is_allowed() {
        let domains = vec!["fleet.test".to_owned(), "words.example".to_owned()];
        let mine = key(1);
        let own = word_name(&mine, "fleet.test");
        assert!(allows(&own, &domains, &mine));
        assert!(allows(&word_name(&mine, "words.example"), &domains, &mine));
        assert!(!allows(&own, &domains, &key(2)), "another key's words");
        assert!(
            !allows(&word_name(&mine, "other.test"), &domains, &mine),
            "not offered"
        );
        assert!(
            !allows(&format!("x.{own}"), &domains, &mine),
            "deeper names are not words"
        );
        assert!(!allows("fleet.test", &domains, &mine), "the domain itself");
        assert_eq!(word_domain(&own, &domains), Some("fleet.test"));
        assert_eq!(word_domain("a.b.fleet.test", &domains), None);
    }
}
