//! v3 onion addresses, `BASE32(PUBKEY | CHECKSUM | VERSION).onion` (Tor's rend-spec-v3,
//! "Encoding onion addresses").
//!
//! A proxy that hosts its tunnel listener as an onion service announces its address, and
//! clients dial it through Tor. The address *is* the service's public key, so Tor itself
//! authenticates whoever answers; the checks here only catch a mistyped or mangled address
//! before Tor is asked, with an error that says what is wrong.
//!
//! An onion endpoint is written `ADDRESS.onion:PORT`, the form lists carry and `--proxy`
//! takes.

use sha3::{Digest as _, Sha3_256};

/// What every onion address ends with.
pub const SUFFIX: &str = ".onion";
/// Length of the base32 part of a v3 address.
const ENCODED_LEN: usize = 56;
/// The only address version there is.
const VERSION: u8 = 3;
/// Bytes the base32 part decodes to: public key, checksum, version.
const DECODED_LEN: usize = 32 + 2 + 1;
/// The prefix of the checksum's hash input.
const CHECKSUM_PREFIX: &[u8] = b".onion checksum";
/// RFC 4648 base32, lower case, as onion addresses spell it.
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Why a text is not a v3 onion address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OnionError {
    /// The name does not end in `.onion`.
    #[error("not an onion address (it does not end in .onion)")]
    NotOnion,
    /// The part before `.onion` is not 56 base32 characters (it may also be a subdomain of an
    /// onion address, which shroud does not take).
    #[error("an onion address is 56 characters of base32 (a-z, 2-7) before .onion")]
    BadEncoding,
    /// The version byte is not 3 (v2 addresses, 16 characters long, are gone from Tor).
    #[error("onion address version {0}; only version 3 exists")]
    Version(u8),
    /// The checksum does not match the key: a typing mistake.
    #[error("the onion address's checksum does not match (a typing mistake?)")]
    Checksum,
    /// `ADDRESS.onion:PORT` with a port that is not 1 to 65535.
    #[error("the onion address's port is not a number from 1 to 65535")]
    BadPort,
}

/// Whether `host` names an onion service (ends in `.onion`, in any case, with or without a
/// trailing dot). Says nothing of whether it is a valid address: see [`normalize`].
pub fn is_onion(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    host.len() >= SUFFIX.len()
        && host
            .get(host.len() - SUFFIX.len()..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case(SUFFIX))
}

/// Checks that `text` is a v3 onion address and returns it in normal form: lower case, no
/// trailing dot (`...xyzad.onion`).
pub fn normalize(text: &str) -> Result<String, OnionError> {
    if !is_onion(text) {
        return Err(OnionError::NotOnion);
    }
    let text = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let encoded = &text[..text.len() - SUFFIX.len()];
    if encoded.len() != ENCODED_LEN {
        return Err(OnionError::BadEncoding);
    }
    let decoded = decode_base32(encoded.as_bytes()).ok_or(OnionError::BadEncoding)?;
    let (key, rest) = decoded.split_at(32);
    let (checksum, version) = (&rest[..2], rest[2]);
    if version != VERSION {
        return Err(OnionError::Version(version));
    }
    if checksum != self::checksum(key) {
        return Err(OnionError::Checksum);
    }
    Ok(text)
}

/// Reads `ADDRESS.onion[:PORT]` into the normalised address and the port, `default_port` when
/// none is given.
pub fn parse_endpoint(text: &str, default_port: u16) -> Result<(String, u16), OnionError> {
    let (host, port) = match text.rsplit_once(':') {
        Some((host, digits)) => match digits.parse::<u16>() {
            Ok(port) if port != 0 && digits.bytes().all(|b| b.is_ascii_digit()) => (host, port),
            _ => return Err(OnionError::BadPort),
        },
        None => (text, default_port),
    };
    Ok((normalize(host)?, port))
}

/// The onion address of the service whose identity key is `public_key` (an ed25519 public
/// key).
pub fn from_public_key(public_key: &[u8; 32]) -> String {
    let mut bytes = Vec::with_capacity(DECODED_LEN);
    bytes.extend_from_slice(public_key);
    bytes.extend_from_slice(&checksum(public_key));
    bytes.push(VERSION);
    let mut out = encode_base32(&bytes);
    out.push_str(SUFFIX);
    out
}

/// `SHA3-256(".onion checksum" | PUBKEY | VERSION)[..2]`.
fn checksum(key: &[u8]) -> [u8; 2] {
    let mut hash = Sha3_256::new();
    hash.update(CHECKSUM_PREFIX);
    hash.update(key);
    hash.update([VERSION]);
    let digest = hash.finalize();
    [digest[0], digest[1]]
}

/// Decodes unpadded lower-case base32 whose length is a multiple of 8 characters.
fn decode_base32(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(8) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() * 5 / 8);
    for chunk in text.chunks(8) {
        let mut bits: u64 = 0;
        for &c in chunk {
            let value = ALPHABET.iter().position(|&a| a == c)?;
            bits = (bits << 5) | value as u64;
        }
        // 40 bits: five bytes, most significant first.
        out.extend_from_slice(&bits.to_be_bytes()[3..]);
    }
    Some(out)
}

/// Encodes bytes whose length is a multiple of 5 as unpadded lower-case base32.
fn encode_base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 8 / 5);
    for chunk in bytes.chunks(5) {
        let mut word = [0u8; 8];
        word[3..3 + chunk.len()].copy_from_slice(chunk);
        let bits = u64::from_be_bytes(word);
        for i in (0..8).rev() {
            out.push(char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real address: the Tor Project's own website as an onion service.
    const TORPROJECT: &str = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion";

    #[test]
    fn accepts_a_real_address_in_any_case() {
        assert_eq!(normalize(TORPROJECT).as_deref(), Ok(TORPROJECT));
        let shouted = format!("{}.", TORPROJECT.to_ascii_uppercase());
        assert_eq!(normalize(&shouted).as_deref(), Ok(TORPROJECT));
        assert!(is_onion(&shouted));
        assert!(!is_onion("example.com"));
        assert!(!is_onion("onion"));
    }

    #[test]
    fn the_address_round_trips_through_its_key() {
        let encoded = &TORPROJECT[..56];
        let decoded = decode_base32(encoded.as_bytes()).unwrap();
        let key: [u8; 32] = decoded[..32].try_into().unwrap();
        assert_eq!(from_public_key(&key), TORPROJECT);
        // Any key makes a valid address.
        let address = from_public_key(&[7; 32]);
        assert_eq!(normalize(&address), Ok(address.clone()));
    }

    #[test]
    fn refuses_what_is_not_a_v3_address() {
        assert_eq!(normalize("example.com"), Err(OnionError::NotOnion));
        assert_eq!(
            normalize("expyuzz4wqqyqhjn.onion"),
            Err(OnionError::BadEncoding),
            "v2 addresses are gone"
        );
        let sub = format!("www.{TORPROJECT}");
        assert_eq!(normalize(&sub), Err(OnionError::BadEncoding));
        let bad_char = TORPROJECT.replacen('2', "1", 1);
        assert_eq!(normalize(&bad_char), Err(OnionError::BadEncoding));
        // One character changed: the checksum catches it.
        let typo = TORPROJECT.replacen("gzyx", "gzyy", 1);
        assert_eq!(normalize(&typo), Err(OnionError::Checksum));
        // A version byte other than 3.
        let mut bytes = decode_base32(&TORPROJECT.as_bytes()[..56]).unwrap();
        bytes[34] = 4;
        let v4 = format!("{}.onion", encode_base32(&bytes));
        assert_eq!(normalize(&v4), Err(OnionError::Version(4)));
    }

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            parse_endpoint(TORPROJECT, 443),
            Ok((TORPROJECT.to_owned(), 443))
        );
        assert_eq!(
            parse_endpoint(&format!("{TORPROJECT}:8443"), 443),
            Ok((TORPROJECT.to_owned(), 8443))
        );
        for port in ["0", "65536", "+1", "", "x"] {
            assert_eq!(
                parse_endpoint(&format!("{TORPROJECT}:{port}"), 443),
                Err(OnionError::BadPort),
                "{port:?}"
            );
        }
        assert_eq!(
            parse_endpoint("proxy.example:443", 443),
            Err(OnionError::NotOnion)
        );
    }
}
