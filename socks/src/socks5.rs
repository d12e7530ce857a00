//! SOCKS5 (RFC 1928), the CONNECT command only, with username/password authentication
//! (RFC 1929) accepted whatever the credentials.
//!
//! The credentials are not a password check: like Tor's `IsolateSOCKSAuth`, they let a program
//! ask that its streams not share a circuit with streams given other credentials. Every field
//! has a fixed maximum length (255 bytes), so a request is at most a few hundred bytes and the
//! reader never buffers more than it was sent.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::dest::{Destination, DestinationError};
use crate::request::{Reply, RequestError};

/// The protocol version byte every SOCKS5 message starts with.
pub const VERSION: u8 = 5;
/// Method: no authentication.
pub const METHOD_NO_AUTH: u8 = 0x00;
/// Method: username and password (RFC 1929).
pub const METHOD_USER_PASS: u8 = 0x02;
/// Method selection: none of the offered methods is acceptable.
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xff;
/// The username/password sub-negotiation's version byte.
pub const USER_PASS_VERSION: u8 = 1;
/// Command: CONNECT.
pub const CMD_CONNECT: u8 = 1;
/// Address type: IPv4.
pub const ATYP_IPV4: u8 = 1;
/// Address type: a domain name.
pub const ATYP_DOMAIN: u8 = 3;
/// Address type: IPv6.
pub const ATYP_IPV6: u8 = 4;

/// A CONNECT request, after the greeting and any authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Where to.
    pub destination: Destination,
    /// The username and password given, if the program authenticated: `len(user) user
    /// len(pass) pass`, as they came.
    pub credentials: Option<Vec<u8>>,
}

/// Reads a SOCKS5 handshake from `io` whose version byte has been read already, answering the
/// method selection and the authentication on `io`, up to the CONNECT request.
///
/// On a request that cannot be served (another command, an unknown address type, a bad name)
/// the error carries the [`Reply`] to send; [`crate::write_reply`] sends it.
pub async fn read_connect<S>(io: &mut S) -> Result<Connect, RequestError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Greeting: NMETHODS, METHODS.
    let count = io.read_u8().await?;
    if count == 0 {
        return Err(RequestError::Malformed("SOCKS5 greeting offers no method"));
    }
    let mut methods = [0u8; 255];
    let methods = &mut methods[..usize::from(count)];
    io.read_exact(methods).await?;
    // Prefer username/password when offered, as Tor does: it is how a program asks for
    // isolation.
    let method = if methods.contains(&METHOD_USER_PASS) {
        METHOD_USER_PASS
    } else if methods.contains(&METHOD_NO_AUTH) {
        METHOD_NO_AUTH
    } else {
        io.write_all(&[VERSION, METHOD_NONE_ACCEPTABLE]).await?;
        io.flush().await?;
        return Err(RequestError::NoAcceptableMethod);
    };
    io.write_all(&[VERSION, method]).await?;
    io.flush().await?;

    let credentials = if method == METHOD_USER_PASS {
        Some(read_user_pass(io).await?)
    } else {
        None
    };

    // Request: VER CMD RSV ATYP DST.ADDR DST.PORT.
    let mut head = [0u8; 4];
    io.read_exact(&mut head).await?;
    let [version, command, _reserved, address_type] = head;
    if version != VERSION {
        return Err(RequestError::Malformed(
            "SOCKS5 request with another version",
        ));
    }
    let host = match address_type {
        ATYP_IPV4 => {
            let mut octets = [0u8; 4];
            io.read_exact(&mut octets).await?;
            Host::Ip(std::net::Ipv4Addr::from(octets).into())
        }
        ATYP_IPV6 => {
            let mut octets = [0u8; 16];
            io.read_exact(&mut octets).await?;
            Host::Ip(std::net::Ipv6Addr::from(octets).into())
        }
        ATYP_DOMAIN => {
            let len = io.read_u8().await?;
            let mut name = vec![0u8; usize::from(len)];
            io.read_exact(&mut name).await?;
            Host::Name(name)
        }
        other => {
            return Err(RequestError::Refused {
                reply: Reply::AddressTypeNotSupported,
                reason: format!("SOCKS5 address type {other} is not supported"),
            })
        }
    };
    let port = io.read_u16().await?;
    if command != CMD_CONNECT {
        return Err(RequestError::Refused {
            reply: Reply::CommandNotSupported,
            reason: format!("SOCKS5 command {command} is not supported (only CONNECT, 1)"),
        });
    }
    let destination = match host {
        Host::Ip(ip) if port != 0 => Ok(Destination::ip(ip, port)),
        Host::Ip(_) => Err(DestinationError::PortZero),
        Host::Name(name) => Destination::from_name_bytes(&name, port),
    }
    .map_err(RequestError::Destination)?;
    Ok(Connect {
        destination,
        credentials,
    })
}

/// A host as the request carried it, before it is checked.
enum Host {
    Ip(std::net::IpAddr),
    Name(Vec<u8>),
}

/// Reads RFC 1929's username/password message and accepts it, whatever it holds.
async fn read_user_pass<S>(io: &mut S) -> Result<Vec<u8>, RequestError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let version = io.read_u8().await?;
    if version != USER_PASS_VERSION {
        // RFC 1929: a non-zero status means failure, and the connection must close.
        io.write_all(&[USER_PASS_VERSION, 1]).await?;
        io.flush().await?;
        return Err(RequestError::Malformed(
            "SOCKS5 username/password message with another version",
        ));
    }
    let mut credentials = Vec::new();
    for _ in 0..2 {
        let len = io.read_u8().await?;
        let start = credentials.len();
        credentials.push(len);
        credentials.resize(start + 1 + usize::from(len), 0);
        io.read_exact(&mut credentials[start + 1..]).await?;
    }
    io.write_all(&[USER_PASS_VERSION, 0]).await?;
    io.flush().await?;
    Ok(credentials)
}

/// The reply to a CONNECT request: `reply`'s code, and an unspecified bound address (Tor's
/// streams have no local address worth telling).
pub fn encode_reply(reply: Reply) -> [u8; 10] {
    [VERSION, reply.socks5_code(), 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0]
}
