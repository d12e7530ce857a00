//! Where a local program asked to go, and whether that is somewhere a proxy into Tor must not
//! take it.
//!
//! A name stays a name: it is never looked up here, so it reaches the Tor exit as text and the
//! exit resolves it. A name that is an IP address in disguise (`127.1`, `0x7f000001`,
//! `2130706433`: forms resolvers read as addresses) is refused rather than guessed at.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A destination's host: a name, resolved by whoever carries the connection (the exit), or an
/// address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name in normal form: lower case, no trailing dot.
    Name(String),
    /// An IP address. An IPv4-mapped IPv6 address is held as the IPv4 address it maps.
    Ip(IpAddr),
}

/// A host and port a program asked to connect to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The host.
    pub host: Host,
    /// The TCP port, never 0.
    pub port: u16,
}

/// Why a destination is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// Port 0.
    #[error("port 0 is not a destination")]
    PortZero,
    /// The name is not a DNS hostname.
    #[error("{name:?} is not a hostname: {reason}")]
    BadName {
        /// The name as given (lossily, if it was not UTF-8).
        name: String,
        /// Why.
        reason: String,
    },
    /// The name reads as a number, which resolvers may take for an IP address.
    #[error("{0:?} looks like a numeric address; give the address itself")]
    Numeric(String),
}

impl Destination {
    /// A destination from a host as a program gave it, as text: an IPv4 address, an IPv6
    /// address (with or without brackets), or a hostname, normalised.
    pub fn parse(host: &str, port: u16) -> Result<Self, DestinationError> {
        if port == 0 {
            return Err(DestinationError::PortZero);
        }
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Self::ip(ip, port));
        }
        let name =
            shroud_mux::hostname::normalize(host).map_err(|err| DestinationError::BadName {
                name: host.to_owned(),
                reason: err.to_string(),
            })?;
        if looks_numeric(&name) {
            return Err(DestinationError::Numeric(name));
        }
        Ok(Self {
            host: Host::Name(name),
            port,
        })
    }

    /// A destination from raw name bytes (SOCKS5's domain address type).
    pub fn from_name_bytes(name: &[u8], port: u16) -> Result<Self, DestinationError> {
        match std::str::from_utf8(name) {
            Ok(name) => Self::parse(name, port),
            Err(_) => Err(DestinationError::BadName {
                name: String::from_utf8_lossy(name).into_owned(),
                reason: "not ASCII".to_owned(),
            }),
        }
    }

    /// A destination at an address (an IPv4-mapped IPv6 address becomes IPv4).
    pub fn ip(ip: IpAddr, port: u16) -> Self {
        Self {
            host: Host::Ip(ip.to_canonical()),
            port,
        }
    }

    /// Whether this destination is this machine or a network only it and its neighbours can
    /// reach: loopback, private, link-local, carrier-grade NAT, unspecified, multicast or
    /// broadcast addresses, and `localhost` names. A proxy into Tor must not lead there: on
    /// the real network an exit would either refuse or reach its own neighbourhood.
    pub fn is_local(&self) -> bool {
        match &self.host {
            Host::Ip(ip) => is_local_ip(*ip),
            Host::Name(name) => {
                name == "localhost"
                    || name.ends_with(".localhost")
                    || name == "localhost.localdomain"
            }
        }
    }

    /// Whether the host is an onion service's address (`*.onion`), reached inside Tor.
    pub fn is_onion(&self) -> bool {
        matches!(&self.host, Host::Name(name) if name.ends_with(".onion"))
    }

    /// The host as text, without brackets: what Tor is asked to connect to.
    pub fn host_text(&self) -> String {
        match &self.host {
            Host::Name(name) => name.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Name(name) => write!(f, "{name}:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// Whether a name's last label is a number (decimal, or `0x` hex), as in `127.1`, `0x7f.1` or
/// `2130706433`: `inet_aton` and many resolvers read such names as IPv4 addresses. No
/// top-level domain is numeric.
fn looks_numeric(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    let hex = last
        .strip_prefix("0x")
        .is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()));
    hex || last.bytes().all(|b| b.is_ascii_digit())
}

fn is_local_ip(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(ip) => is_local_v4(ip),
        IpAddr::V6(ip) => is_local_v6(ip),
    }
}

fn is_local_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 0 // "this network", 0.0.0.0 included
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || (a == 100 && (64..128).contains(&b)) // carrier-grade NAT, RFC 6598
        || ip.is_multicast()
        || a >= 240 // reserved, and the broadcast address
}

fn is_local_v6(ip: Ipv6Addr) -> bool {
    let segments = ip.segments();
    let embedded_v4 = || {
        let [.., a, b, c, d] = ip.octets();
        Ipv4Addr::new(a, b, c, d)
    };
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (segments[0] & 0xfe00) == 0xfc00 // unique local, fc00::/7
        || (segments[0] & 0xffc0) == 0xfe80 // link-local, fe80::/10
        || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated), fec0::/10
        // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96) addresses lead to
        // the IPv4 address inside.
        || (segments[..6] == [0; 6] && is_local_v4(embedded_v4()))
        || (segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && is_local_v4(embedded_v4()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(host: &str) -> bool {
        Destination::parse(host, 443).unwrap().is_local()
    }

    #[test]
    fn local_and_private_addresses_are_local() {
        for host in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "[::1]",
            "::",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "localhost",
            "LOCALHOST.",
            "app.localhost",
            "localhost.localdomain",
        ] {
            assert!(local(host), "{host} is local");
        }
    }

    #[test]
    fn public_addresses_and_names_are_not_local() {
        for host in [
            "93.184.216.34",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::93.184.216.34",
            "example.com",
            "localhost.example.com",
            "notlocalhost",
        ] {
            assert!(!local(host), "{host} is not local");
        }
    }

    #[test]
    fn names_are_normalised_and_addresses_recognised() {
        let d = Destination::parse("Example.COM.", 443).unwrap();
        assert_eq!(d.host, Host::Name("example.com".into()));
        assert_eq!(d.to_string(), "example.com:443");
        let d = Destination::parse("[2001:db8::1]", 80).unwrap();
        assert_eq!(d.to_string(), "[2001:db8::1]:80");
        assert_eq!(d.host_text(), "2001:db8::1");
        let d = Destination::parse("::ffff:192.0.2.1", 80).unwrap();
        assert_eq!(d.host, Host::Ip("192.0.2.1".parse().unwrap()));
        assert!(Destination::parse("x.onion", 80).unwrap().is_onion());
    }

    #[test]
    fn numeric_names_and_bad_names_are_refused() {
        for host in [
            "127.1",
            "2130706433",
            "0x7f000001",
            "0x7f.0.0.1",
            "1.2.3.4.5",
        ] {
            assert!(
                matches!(
                    Destination::parse(host, 80),
                    Err(DestinationError::Numeric(_))
                ),
                "{host}"
            );
        }
        for host in ["", "a b.example", "-x.example", "a..b", "ex\0ample.com"] {
            assert!(
                matches!(
                    Destination::parse(host, 80),
                    Err(DestinationError::BadName { .. })
                ),
                "{host:?}"
            );
        }
        assert_eq!(
            Destination::parse("example.com", 0),
            Err(DestinationError::PortZero)
        );
        assert!(Destination::from_name_bytes(&[0xff, 0xfe], 80).is_err());
    }
}
