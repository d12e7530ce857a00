//! PROXY protocol headers (HAProxy's spec, version 1 text and version 2 binary): with
//! `--proxy-protocol`, each connection to the origin starts with one, so that the origin learns
//! the visitor's address instead of seeing every connection come from this client.
//!
//! The stream header carries the visitor's address and port and the proxy's public port, but
//! not the proxy's public IP address: the destination address sent is the unspecified address
//! of the visitor's family (`0.0.0.0` or `::`), with the public port as destination port.
//!
//! A visitor of the client's onion service has no address at all: [`encode_unknown`] says so
//! in the form the spec makes every receiver accept (v1 `UNKNOWN`, v2 `LOCAL`), and the origin
//! then uses the connection's own addresses, as if no header had been sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The first twelve bytes of every version 2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY: the connection was relayed on behalf of another party.
const V2_PROXY: u8 = 0x21;
/// Version 2, command LOCAL: no peer to describe; the receiver must accept the connection and
/// use its real endpoints.
const V2_LOCAL: u8 = 0x20;
/// Version 2 address family and transport: unspecified (what LOCAL is sent with).
const V2_UNSPEC: u8 = 0x00;
/// Version 2 address family and transport: TCP over IPv4.
const V2_TCP4: u8 = 0x11;
/// Version 2 address family and transport: TCP over IPv6.
const V2_TCP6: u8 = 0x21;
/// The length of what follows a version 2 header's first 16 bytes, over IPv4: two addresses,
/// two ports.
const V2_TCP4_LEN: u16 = 4 + 4 + 2 + 2;
/// The same over IPv6.
const V2_TCP6_LEN: u16 = 16 + 16 + 2 + 2;

/// Which PROXY protocol header the origin expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Version {
    /// Version 1: one line of text, PROXY TCP4 SRC DST SPORT DPORT (TCP6 for IPv6).
    V1,
    /// Version 2: binary, after a fixed 12-byte signature.
    V2,
}

/// The header that tells the origin a connection comes from `visitor`, to the proxy's
/// `public_port`. The destination address is the unspecified address of the visitor's family
/// (the client does not know the proxy's public address). A visitor with an IPv4-mapped IPv6
/// address is described as the IPv4 visitor it is.
pub fn encode(version: Version, visitor: SocketAddr, public_port: u16) -> Vec<u8> {
    let source = visitor.ip().to_canonical();
    let (source_port, destination_port) = (visitor.port(), public_port);
    match version {
        Version::V1 => {
            let (family, destination) = match source {
                IpAddr::V4(_) => ("TCP4", IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                IpAddr::V6(_) => ("TCP6", IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
            };
            format!("PROXY {family} {source} {destination} {source_port} {destination_port}\r\n")
                .into_bytes()
        }
        Version::V2 => {
            let mut header = V2_SIGNATURE.to_vec();
            match source {
                IpAddr::V4(source) => {
                    header.extend_from_slice(&[V2_PROXY, V2_TCP4]);
                    header.extend_from_slice(&V2_TCP4_LEN.to_be_bytes());
                    header.extend_from_slice(&source.octets());
                    header.extend_from_slice(&Ipv4Addr::UNSPECIFIED.octets());
                }
                IpAddr::V6(source) => {
                    header.extend_from_slice(&[V2_PROXY, V2_TCP6]);
                    header.extend_from_slice(&V2_TCP6_LEN.to_be_bytes());
                    header.extend_from_slice(&source.octets());
                    header.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
                }
            }
            header.extend_from_slice(&source_port.to_be_bytes());
            header.extend_from_slice(&destination_port.to_be_bytes());
            header
        }
    }
}

/// The header for a connection whose visitor has no address to tell (an onion service's
/// visitor): v1 `PROXY UNKNOWN`, v2 the `LOCAL` command with no addresses. The spec has every
/// receiver accept both and fall back to the connection's own addresses.
pub fn encode_unknown(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut header = V2_SIGNATURE.to_vec();
            header.extend_from_slice(&[V2_LOCAL, V2_UNSPEC, 0, 0]);
            header
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_visitor() -> SocketAddr {
        "192.0.2.1:5000".parse().unwrap()
    }

    fn v6_visitor() -> SocketAddr {
        "[2001:db8::1]:5000".parse().unwrap()
    }

    #[test]
    fn v1_ipv4() {
        assert_eq!(
            encode(Version::V1, v4_visitor(), 443),
            b"PROXY TCP4 192.0.2.1 0.0.0.0 5000 443\r\n"
        );
    }

    #[test]
    fn v1_ipv6() {
        assert_eq!(
            encode(Version::V1, v6_visitor(), 443),
            b"PROXY TCP6 2001:db8::1 :: 5000 443\r\n"
        );
    }

    #[test]
    fn v2_ipv4() {
        let mut expected = vec![
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54,
            0x0a, // signature
            0x21, // version 2, PROXY
            0x11, // TCP over IPv4
            0x00, 0x0c, // 12 bytes follow
        ];
        expected.extend_from_slice(&[192, 0, 2, 1, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0x13, 0x88, 0x01, 0xbb]); // 5000, 443
        assert_eq!(encode(Version::V2, v4_visitor(), 443), expected);
    }

    #[test]
    fn v2_ipv6() {
        let mut expected = vec![
            0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54,
            0x0a, // signature
            0x21, // version 2, PROXY
            0x21, // TCP over IPv6
            0x00, 0x24, // 36 bytes follow
        ];
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0; 16]);
        expected.extend_from_slice(&[0x13, 0x88, 0x01, 0xbb]); // 5000, 443
        assert_eq!(encode(Version::V2, v6_visitor(), 443), expected);
    }

    #[test]
    fn an_ipv4_mapped_visitor_is_sent_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5000".parse().unwrap();
        assert_eq!(
            encode(Version::V1, mapped, 443),
            b"PROXY TCP4 192.0.2.1 0.0.0.0 5000 443\r\n"
        );
        assert_eq!(
            encode(Version::V2, mapped, 443),
            encode(Version::V2, v4_visitor(), 443)
        );
        assert_eq!(encode(Version::V2, mapped, 443)[13], 0x11);
    }

    #[test]
    fn a_visitor_without_an_address_is_unknown_or_local() {
        assert_eq!(encode_unknown(Version::V1), b"PROXY UNKNOWN\r\n");
        let mut expected = V2_SIGNATURE.to_vec();
        // Version 2 LOCAL, family and transport unspecified, nothing follows.
        expected.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(encode_unknown(Version::V2), expected);
    }

    #[test]
    fn versions_are_spelt_v1_and_v2_on_the_command_line() {
        use clap::ValueEnum as _;
        assert_eq!(Version::from_str("v1", false), Ok(Version::V1));
        assert_eq!(Version::from_str("v2", false), Ok(Version::V2));
    }
}
