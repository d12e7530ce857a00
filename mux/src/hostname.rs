//! Hostname normalisation shared by the wire format, the proxy's routing and its policy.
//!
//! Routing compares names exactly after normalisation, so every place a name enters the system
//! (SNI, Host header, bind message, authorized file) goes through [`normalize`].

/// Longest hostname accepted, in bytes, without a trailing dot (RFC 1035).
pub const MAX_HOSTNAME_LEN: usize = 253;

/// Why a text is not an acceptable hostname.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    /// Empty, or only a dot.
    #[error("empty hostname")]
    Empty,
    /// Longer than [`MAX_HOSTNAME_LEN`].
    #[error("hostname longer than {MAX_HOSTNAME_LEN} bytes")]
    TooLong,
    /// A label is empty or longer than 63 bytes.
    #[error("hostname has an empty label or one longer than 63 bytes")]
    BadLabel,
    /// A character other than letters, digits, `-` and `_`, or a label starting or ending with `-`.
    #[error("hostname may hold only letters, digits, '-' and '_', and labels may not start or end with '-'")]
    BadCharacter,
}

/// Lower-cases `name`, strips one trailing dot, and checks it is a DNS hostname.
///
/// Underscores are allowed (they appear in real service names); IP literals pass as names of
/// digits, which is harmless: nothing binds them unless a policy says so.
pub fn normalize(name: &str) -> Result<String, HostnameError> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(HostnameError::Empty);
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(HostnameError::TooLong);
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(HostnameError::BadLabel);
        }
        let valid_chars = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid_chars || label.starts_with('-') || label.ends_with('-') {
            return Err(HostnameError::BadCharacter);
        }
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_and_trailing_dot() {
        assert_eq!(normalize("Example.TEST.").as_deref(), Ok("example.test"));
        assert_eq!(normalize("a_b.example").as_deref(), Ok("a_b.example"));
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(normalize(""), Err(HostnameError::Empty));
        assert_eq!(normalize("."), Err(HostnameError::Empty));
        assert_eq!(normalize("a..b"), Err(HostnameError::BadLabel));
        assert_eq!(normalize(&"a".repeat(64)), Err(HostnameError::BadLabel));
        assert_eq!(normalize("-a.b"), Err(HostnameError::BadCharacter));
        assert_eq!(normalize("a b"), Err(HostnameError::BadCharacter));
        assert_eq!(normalize("*.example"), Err(HostnameError::BadCharacter));
        let long = vec!["a".repeat(63); 5].join(".");
        assert_eq!(normalize(&long), Err(HostnameError::TooLong));
    }
}
