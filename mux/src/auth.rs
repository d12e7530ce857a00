//! Client identity and the bind proof.
//!
//! A client proves that it holds the ed25519 key a policy names by signing a transcript that
//! ties the proof to one TLS connection: the proxy's fresh challenge, a keying-material exporter
//! value of that connection (RFC 5705), the public key itself and the hostnames being bound. A
//! proof therefore cannot be replayed on another connection, nor relayed by a man in the middle
//! (whose two TLS connections export different values).

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::Signer as _;

/// The label passed to the TLS exporter (RFC 5705 / RFC 8446 section 7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-shroud-bind-v1";
/// Length in bytes of the exporter value that the transcript binds.
pub const EXPORTER_LEN: usize = 32;
/// Length in bytes of the proxy's challenge.
pub const CHALLENGE_LEN: usize = 32;
/// Domain separation prefix of the signed transcript.
const TRANSCRIPT_CONTEXT: &[u8] = b"shroud/1 bind\0";
/// The prefix of the one-token text form of a public key.
const KEY_PREFIX: &str = "ed25519:";

/// A client's public key, as it appears in an authorized file: `ed25519:` followed by the
/// 32 key bytes in unpadded base64url.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

/// Why a text could not be read as a [`PublicKey`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    /// The text does not start with `ed25519:`.
    #[error("a key starts with \"ed25519:\"")]
    MissingPrefix,
    /// The part after the prefix is not unpadded base64url of 32 bytes.
    #[error("a key is \"ed25519:\" followed by 43 base64url characters")]
    BadEncoding,
    /// The 32 bytes are not a valid ed25519 point.
    #[error("not a valid ed25519 public key")]
    InvalidPoint,
}

impl PublicKey {
    /// The raw 32 bytes of the key.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// Reads a key from its raw 32 bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyParseError> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyParseError::InvalidPoint)
    }

    /// Checks `signature` over `transcript` (as made by [`bind_transcript`]).
    pub fn verify(&self, transcript: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(transcript, &signature).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{KEY_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(self.0.as_bytes())
        )
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = KeyParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let encoded = text
            .strip_prefix(KEY_PREFIX)
            .ok_or(KeyParseError::MissingPrefix)?;
        let mut bytes = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(encoded, &mut bytes) {
            Ok(32) => Self::from_bytes(&bytes),
            _ => Err(KeyParseError::BadEncoding),
        }
    }
}

/// A client's secret identity. Its `Debug` output never shows the secret.
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// Makes a new key from the operating system's random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)?;
        Ok(Self::from_seed(&seed))
    }

    /// Rebuilds a key from its 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for storing the key. Handle with care.
    pub fn to_seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs a transcript made by [`bind_transcript`].
    pub fn sign(&self, transcript: &[u8]) -> [u8; 64] {
        self.0.sign(transcript).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public: {}, secret: ***)", self.public())
    }
}

/// The bytes a bind signature covers; see PROTOCOL.md, "Bind proof".
///
/// Hostnames are given in the order they appear in the bind message, already lower-cased.
pub fn bind_transcript(
    challenge: &[u8; CHALLENGE_LEN],
    exporter: &[u8; EXPORTER_LEN],
    key: &PublicKey,
    hostnames: &[String],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        TRANSCRIPT_CONTEXT.len() + CHALLENGE_LEN + EXPORTER_LEN + 32 + 2 + hostnames.len() * 32,
    );
    out.extend_from_slice(TRANSCRIPT_CONTEXT);
    out.extend_from_slice(challenge);
    out.extend_from_slice(exporter);
    out.extend_from_slice(&key.to_bytes());
    // Length-prefix every variable part so that no two lists of names share a transcript.
    out.extend_from_slice(&(hostnames.len() as u16).to_be_bytes());
    for name in hostnames {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
    }
    out
}

/// Makes a fresh random challenge.
pub fn new_challenge() -> Result<[u8; CHALLENGE_LEN], getrandom::Error> {
    let mut challenge = [0u8; CHALLENGE_LEN];
    getrandom::fill(&mut challenge)?;
    Ok(challenge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_text_round_trips() {
        let secret = SecretKey::from_seed(&[7; 32]);
        let text = secret.public().to_string();
        assert!(text.starts_with("ed25519:"));
        assert_eq!(text.len(), "ed25519:".len() + 43);
        assert_eq!(text.parse::<PublicKey>(), Ok(secret.public()));
    }

    #[test]
    fn malformed_key_text_is_refused() {
        assert_eq!(
            "abc".parse::<PublicKey>(),
            Err(KeyParseError::MissingPrefix)
        );
        assert_eq!(
            "ed25519:abc".parse::<PublicKey>(),
            Err(KeyParseError::BadEncoding)
        );
        let too_long = format!("ed25519:{}", "A".repeat(44));
        assert_eq!(
            too_long.parse::<PublicKey>(),
            Err(KeyParseError::BadEncoding)
        );
    }

    #[test]
    fn secret_is_masked_in_debug() {
        let secret = SecretKey::from_seed(&[9; 32]);
        let shown = format!("{secret:?}");
        let seed_b64 = URL_SAFE_NO_PAD.encode(secret.to_seed());
        assert!(!shown.contains(&seed_b64));
        assert!(shown.contains("***"));
    }

    #[test]
    fn signature_binds_every_part() {
        let secret = SecretKey::from_seed(&[1; 32]);
        let key = secret.public();
        let names = vec!["example.test".to_string()];
        let transcript = bind_transcript(&[2; 32], &[3; 32], &key, &names);
        let sig = secret.sign(&transcript);
        assert!(key.verify(&transcript, &sig));

        let other_exporter = bind_transcript(&[2; 32], &[4; 32], &key, &names);
        assert!(!key.verify(&other_exporter, &sig));
        let other_challenge = bind_transcript(&[5; 32], &[3; 32], &key, &names);
        assert!(!key.verify(&other_challenge, &sig));
        let other_names = bind_transcript(&[2; 32], &[3; 32], &key, &["evil.test".to_string()]);
        assert!(!key.verify(&other_names, &sig));
    }
}
