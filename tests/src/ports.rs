//! Ports free on 127.0.0.1 a moment ago, for programs whose configuration cannot say "any
//! port" (tor, rathole, sshd). Another process may take one before the program binds it; the
//! program then fails to start, and its caller says so or tries again with new ports.

use std::net::{Ipv4Addr, TcpListener};

use anyhow::Context as _;

/// One port free right now on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let [port] = free_ports()?;
    Ok(port)
}

/// `N` distinct ports free right now on 127.0.0.1: every probe stays bound until all are
/// chosen, so no two are equal.
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let probes = (0..N)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("binding 127.0.0.1:0 to find free ports")?;
    let mut ports = [0; N];
    for (port, probe) in ports.iter_mut().zip(&probes) {
        *port = probe.local_addr()?.port();
    }
    Ok(ports)
}

/// `n` distinct ports free right now on 127.0.0.1, as [`free_ports`] but counted at run time.
pub fn free_port_list(n: usize) -> anyhow::Result<Vec<u16>> {
    let probes = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("binding 127.0.0.1:0 to find free ports")?;
    probes
        .iter()
        .map(|probe| Ok(probe.local_addr()?.port()))
        .collect()
}
