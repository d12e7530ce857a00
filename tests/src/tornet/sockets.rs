//! Which process holds a TCP connection, read from `/proc`.

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One row of `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug)]
struct TcpSocket {
    local: SocketAddr,
    remote: SocketAddr,
    established: bool,
    /// Sent its SYN and has no answer yet.
    syn_sent: bool,
    inode: u64,
}

/// Every TCP socket of this network namespace, IPv4 and IPv6.
fn tcp_sockets() -> Vec<TcpSocket> {
    let mut sockets = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        // No tcp6 table means no IPv6; nothing to list.
        let Ok(table) = fs::read_to_string(path) else {
            continue;
        };
        sockets.extend(
            table
                .lines()
                .skip(1)
                .filter_map(|line| parse_tcp_row(line, v6)),
        );
    }
    sockets
}

/// Parses `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn parse_tcp_row(line: &str, v6: bool) -> Option<TcpSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    Some(TcpSocket {
        local: parse_proc_addr(fields.get(1)?, v6)?,
        remote: parse_proc_addr(fields.get(2)?, v6)?,
        // 01 is TCP_ESTABLISHED.
        established: *fields.get(3)? == "01",
        // 02 is TCP_SYN_SENT.
        syn_sent: *fields.get(3)? == "02",
        inode: fields.get(9)?.parse().ok()?,
    })
}

/// Parses `0100007F:1F90`: the address as the kernel's 32-bit words in
/// native byte order, each printed as hex; the port as plain hex.
fn parse_proc_addr(field: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..addr.len()).step_by(8) {
        let word = u32::from_str_radix(addr.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = if v6 {
        let octets: [u8; 16] = bytes.try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        let octets: [u8; 4] = bytes.try_into().ok()?;
        IpAddr::V4(Ipv4Addr::from(octets))
    };
    Some(unmapped(SocketAddr::new(ip, port)))
}

/// `addr` with an IPv4-mapped IPv6 address turned into plain IPv4, so
/// sockets of dual-stack listeners compare equal to what peers report.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The inodes of the sockets process `pid` has open (empty if it is gone
/// or not ours to inspect).
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    fds.filter_map(|fd| {
        let target = fs::read_link(fd.ok()?.path()).ok()?;
        let target = target.to_str()?;
        target
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

/// The process that holds the TCP connection from `local` to `remote`, if any
/// process we may inspect does.
///
/// Both ends are needed: Linux reuses an ephemeral port for connections to
/// different destinations, so on a busy loopback (a Tor network's relays
/// talking among themselves) a local address alone can name several sockets
/// of several processes.
///
/// Reads `/proc/net/tcp{,6}` for the socket's inode, then every
/// `/proc/PID/fd` for a link to `socket:[INODE]`.
pub fn socket_owner(local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let (local, remote) = (unmapped(local), unmapped(remote));
    let inodes: HashSet<u64> = tcp_sockets()
        .into_iter()
        // Inode 0: a socket no process holds any more (TIME_WAIT).
        .filter(|socket| socket.local == local && socket.remote == remote && socket.inode != 0)
        .map(|socket| socket.inode)
        .collect();
    if inodes.is_empty() {
        return None;
    }
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| !socket_inodes(pid).is_disjoint(&inodes))
}

/// The established TCP connections of process `pid`, as (local, remote)
/// address pairs. Empty if the process is gone or not ours to inspect.
pub fn tcp_connections_of(pid: u32) -> Vec<(SocketAddr, SocketAddr)> {
    let inodes = socket_inodes(pid);
    if inodes.is_empty() {
        return Vec::new();
    }
    tcp_sockets()
        .into_iter()
        .filter(|socket| socket.established && inodes.contains(&socket.inode))
        .map(|socket| (socket.local, socket.remote))
        .collect()
}

/// The connections to `port` that are open or still waiting for an answer to their SYN (as
/// to a listener whose queue is full), as (their local address, the process holding them).
pub fn connections_to(port: u16) -> Vec<(SocketAddr, Option<u32>)> {
    tcp_sockets()
        .into_iter()
        .filter(|socket| (socket.syn_sent || socket.established) && socket.remote.port() == port)
        .map(|socket| {
            let owner = socket_owner(socket.local, socket.remote);
            (socket.local, owner)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_rows() {
        let v4 = "   0: 0100007F:1F90 0200007F:A2C4 01 00000000:00000000 00:00000000 \
                  00000000  1000        0 12345 1 0000000000000000 20 4 30 10 -1";
        let row = parse_tcp_row(v4, false).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(row.local, "127.0.0.1:8080".parse().unwrap());
            assert_eq!(row.remote, "127.0.0.2:41668".parse().unwrap());
        }
        assert!(row.established);
        assert_eq!(row.inode, 12345);

        let mapped = "   1: 0000000000000000FFFF00000100007F:0050 \
                      00000000000000000000000000000000:0000 0A 00000000:00000000 \
                      00:00000000 00000000  1000        0 777 1 0000000000000000 100 0 0 10 0";
        let row = parse_tcp_row(mapped, true).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(row.local, "127.0.0.1:80".parse().unwrap());
        }
        assert!(!row.established);
    }
}
