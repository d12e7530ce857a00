//! Tools for load and slow-peer measurements: file-descriptor limits, a process's memory,
//! visitors that connect from a chosen loopback source address, a real ClientHello to send
//! byte by byte, and latency summaries.
//!
//! Many visitors from many addresses: all of `127.0.0.0/8` is loopback on Linux, so a test
//! can give each group of visitors its own source address ([`spread_source`]) and model
//! visitors from many hosts without leaving the machine. That keeps per-address limits of the
//! proxy out of a measurement that is not about them, and spreads the ephemeral ports.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::visitor::{get_request, http_exchange, tls_handshake, HttpResponse};

/// Raises this process's soft limit on open files to its hard limit (children started
/// afterwards inherit it) and returns the soft limit now in force.
pub fn raise_fd_limit() -> io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // No hard limit: the kernel still caps descriptors at fs.nr_open, 1 Mi by default.
    let hard = limit.maximum.unwrap_or(1 << 20);
    if limit.current.is_some_and(|soft| soft < hard) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(hard),
                maximum: limit.maximum,
            },
        )?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(hard))
}

/// Raises the soft limit on open files as [`raise_fd_limit`] does and fails, naming the
/// numbers, unless at least `needed` descriptors may be open at once.
pub fn ensure_fd_limit(needed: u64) -> anyhow::Result<u64> {
    let soft = raise_fd_limit().context("raising RLIMIT_NOFILE to its hard limit")?;
    anyhow::ensure!(
        soft >= needed,
        "this needs {needed} open files at once but the hard limit is {soft}; \
         raise it (ulimit -Hn, or LimitNOFILE in a container or unit)"
    );
    Ok(soft)
}

/// The resident set size of process `pid`, in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// How many file descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> io::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// The source address of visitor number `index` when every `per_address` visitors share one:
/// `127.GROUP.X.Y`, with `Y` from 1 to 250. Different groups never share an address.
pub fn spread_source(group: u8, index: usize, per_address: usize) -> IpAddr {
    let n = index / per_address.max(1);
    // At most 250 * 256 addresses per group; wrapping beyond that only reuses addresses.
    let (x, y) = ((n / 250) % 256, n % 250 + 1);
    IpAddr::V4(Ipv4Addr::new(127, group, x as u8, y as u8))
}

/// Opens a TCP connection to `addr` from `source` (any port).
pub async fn connect_from(source: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Connects from `source` and completes a TLS handshake for `sni` with `config` (whose roots
/// decide what verifies).
pub async fn tls_connect_from(
    source: IpAddr,
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = connect_from(source, addr)
        .await
        .with_context(|| format!("connect to {addr} from {source}"))?;
    tls_handshake(tcp, addr, sni, config).await
}

/// `GET path` over TLS from `source`, with SNI and `Host` both `sni`.
pub async fn https_get_from(
    source: IpAddr,
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
    path: &str,
) -> anyhow::Result<HttpResponse> {
    let stream = tls_connect_from(source, addr, sni, config).await?;
    http_exchange(stream, get_request(sni, path).as_bytes()).await
}

/// The bytes of the first flight a real TLS client (rustls, with `config`) sends for `sni`:
/// the records holding its ClientHello.
pub fn client_hello(config: Arc<ClientConfig>, sni: &str) -> anyhow::Result<Vec<u8>> {
    let name = ServerName::try_from(sni.to_owned())
        .with_context(|| format!("{sni:?} is not a valid TLS server name"))?;
    let mut connection =
        rustls::ClientConnection::new(config, name).context("start a TLS client")?;
    let mut bytes = Vec::new();
    while connection.wants_write() {
        connection
            .write_tls(&mut bytes)
            .context("write the ClientHello")?;
    }
    Ok(bytes)
}

/// Durations of a series of requests, summarised by percentiles.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: Vec<Duration>,
}

impl Latencies {
    /// No samples yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample.
    pub fn push(&mut self, sample: Duration) {
        self.samples.push(sample);
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The `p`-th percentile (0 to 100, nearest rank); zero without samples.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.samples.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    /// The median.
    pub fn p50(&self) -> Duration {
        self.percentile(50.0)
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        self.samples.iter().copied().max().unwrap_or_default()
    }
}

impl fmt::Display for Latencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "n={} p50={:.1} ms p90={:.1} ms max={:.1} ms",
            self.len(),
            ms(self.p50()),
            ms(self.percentile(90.0)),
            ms(self.max())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut l = Latencies::new();
        for ms in [5, 1, 4, 2, 3] {
            l.push(Duration::from_millis(ms));
        }
        assert_eq!(l.p50(), Duration::from_millis(3));
        assert_eq!(l.percentile(90.0), Duration::from_millis(5));
        assert_eq!(l.percentile(0.0), Duration::from_millis(1));
        assert_eq!(l.max(), Duration::from_millis(5));
        assert_eq!(Latencies::new().p50(), Duration::ZERO);
    }

    #[test]
    fn sources_spread_over_distinct_addresses() {
        assert_eq!(
            spread_source(7, 0, 100),
            IpAddr::V4(Ipv4Addr::new(127, 7, 0, 1))
        );
        assert_eq!(spread_source(7, 99, 100), spread_source(7, 0, 100));
        assert_eq!(
            spread_source(7, 100, 100),
            IpAddr::V4(Ipv4Addr::new(127, 7, 0, 2))
        );
        assert_eq!(
            spread_source(7, 250 * 100, 100),
            IpAddr::V4(Ipv4Addr::new(127, 7, 1, 1))
        );
    }

    #[test]
    fn reads_this_process_rss() {
        let rss = rss_bytes(std::process::id()).unwrap_or(0);
        assert!(rss > 1024 * 1024, "{rss}");
    }
}
