//! Address overrides from curl-style `--resolve NAME:PORT:ADDR` entries, which the client's
//! direct transport and the proxy's announcements to discovery both honour: tests and operators
//! point a name at an address of their choosing while TLS still checks the name.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// Why `--resolve` entries could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A `--resolve` entry could not be read.
    #[error("--resolve {entry:?}: {reason}")]
    BadResolve {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Address overrides from curl-style `--resolve NAME:PORT:ADDR` entries.
///
/// Names are matched without regard to case or a trailing dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolve {
    entries: HashMap<(String, u16), SocketAddr>,
}

impl Resolve {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads every `--resolve` entry; a later entry for the same name and port wins.
    pub fn from_entries<S: AsRef<str>>(entries: &[S]) -> Result<Self, ResolveError> {
        let mut resolve = Self::new();
        for entry in entries {
            let entry = entry.as_ref();
            let (name, port, addr) =
                parse_resolve(entry).map_err(|reason| ResolveError::BadResolve {
                    entry: entry.to_owned(),
                    reason,
                })?;
            resolve.insert(&name, port, addr);
        }
        Ok(resolve)
    }

    /// Sends connections for `name:port` to `addr:port`.
    pub fn insert(&mut self, name: &str, port: u16, addr: IpAddr) {
        self.entries
            .insert((lookup_name(name), port), SocketAddr::new(addr, port));
    }

    /// The override for `name:port`, if there is one.
    pub fn get(&self, name: &str, port: u16) -> Option<SocketAddr> {
        self.entries.get(&(lookup_name(name), port)).copied()
    }

    /// Whether there are no overrides.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn lookup_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Reads one curl-style `NAME:PORT:ADDR` entry into (lower-cased name, port, address).
///
/// `ADDR` is an IPv4 or IPv6 address; IPv6 may be written with or without brackets
/// (`[::1]` or `::1`).
pub fn parse_resolve(s: &str) -> Result<(String, u16, IpAddr), String> {
    const SHAPE: &str = "expected NAME:PORT:ADDR, like proxy.example:443:192.0.2.7";
    let (name, rest) = s.split_once(':').ok_or_else(|| SHAPE.to_owned())?;
    let (port, addr) = rest.split_once(':').ok_or_else(|| SHAPE.to_owned())?;
    let name = shroud_mux::hostname::normalize(name)
        .map_err(|err| format!("{name:?} is not a hostname: {err}"))?;
    let port = match port.parse::<u16>() {
        Ok(port) if port != 0 => port,
        _ => return Err(format!("{port:?} is not a port number from 1 to 65535")),
    };
    let bare = addr
        .strip_prefix('[')
        .and_then(|addr| addr.strip_suffix(']'))
        .unwrap_or(addr);
    let addr = bare
        .parse::<IpAddr>()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    Ok((name, port, addr))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn parses_resolve_entries() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(
            parse_resolve("Proxy.Example.:443:192.0.2.7"),
            Ok(("proxy.example".to_owned(), 443, v4))
        );
        assert_eq!(
            parse_resolve("p.test:8443:[::1]"),
            Ok(("p.test".to_owned(), 8443, IpAddr::V6(Ipv6Addr::LOCALHOST)))
        );
        assert_eq!(
            parse_resolve("p.test:8443:::1"),
            Ok(("p.test".to_owned(), 8443, IpAddr::V6(Ipv6Addr::LOCALHOST)))
        );
        assert_eq!(
            parse_resolve("p.test:1:2001:db8::1").map(|(_, _, addr)| addr.to_string()),
            Ok("2001:db8::1".to_owned())
        );
    }

    #[test]
    fn refuses_bad_resolve_entries() {
        for (entry, says) in [
            ("p.test", "expected NAME:PORT:ADDR"),
            ("p.test:443", "expected NAME:PORT:ADDR"),
            (":443:127.0.0.1", "is not a hostname"),
            ("p test:443:127.0.0.1", "is not a hostname"),
            ("p.test:0:127.0.0.1", "is not a port number"),
            ("p.test:https:127.0.0.1", "is not a port number"),
            ("p.test:70000:127.0.0.1", "is not a port number"),
            ("p.test:443:", "is not an IP address"),
            ("p.test:443:localhost", "is not an IP address"),
            ("p.test:443:[127.0.0.1", "is not an IP address"),
            ("p.test:443:1.2.3.4,5.6.7.8", "is not an IP address"),
        ] {
            let err = parse_resolve(entry).unwrap_err();
            assert!(err.contains(says), "{entry}: {err}");
        }
        let err = Resolve::from_entries(&["p.test:443:nope"]).unwrap_err();
        assert!(matches!(err, ResolveError::BadResolve { .. }), "{err:?}");
        assert!(err.to_string().contains("p.test:443:nope"), "{err}");
    }

    #[test]
    fn overrides_match_any_case_and_trailing_dot() {
        let resolve = Resolve::from_entries(&["proxy.test:443:127.0.0.1"]).unwrap();
        let want = Some(SocketAddr::from(([127, 0, 0, 1], 443)));
        assert_eq!(resolve.get("PROXY.test.", 443), want);
        assert_eq!(resolve.get("proxy.test", 444), None);
        assert_eq!(resolve.get("other.test", 443), None);
    }
}
