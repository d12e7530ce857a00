//! What a visitor measures: downloads, connection setup, idle connections, and the load
//! generators (wrk, iperf3) run as their own processes.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// The address a visitor dials and the name it asks for.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where visitors connect.
    pub addr: SocketAddr,
    /// The `Host` header (routes shroud's and PageKite's visitors; ignored by the others).
    pub host: String,
}

/// Bytes received per interval of a download, from the moment the response head arrived.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    /// Length of one interval.
    pub interval_ms: u64,
    /// Bytes received in each interval.
    pub bytes: Vec<u64>,
}

impl Series {
    /// Mean rate, in MB/s (10^6 bytes), over the intervals from `from` to `to`.
    pub fn rate_mbs(&self, from: Duration, to: Duration) -> f64 {
        let interval = Duration::from_millis(self.interval_ms);
        let first = (from.as_millis() / interval.as_millis()) as usize;
        let last = ((to.as_millis() / interval.as_millis()) as usize).min(self.bytes.len());
        if last <= first {
            return 0.0;
        }
        let bytes: u64 = self.bytes[first..last].iter().sum();
        bytes as f64 / ((last - first) as f64 * interval.as_secs_f64()) / 1e6
    }

    fn add(&mut self, other: &Series) {
        if self.bytes.len() < other.bytes.len() {
            self.bytes.resize(other.bytes.len(), 0);
        }
        for (mine, theirs) in self.bytes.iter_mut().zip(&other.bytes) {
            *mine += theirs;
        }
    }
}

/// Downloads an endless body for `duration` on one connection and records its rate.
pub async fn download(
    target: &Target,
    duration: Duration,
    interval: Duration,
) -> anyhow::Result<Series> {
    let mut stream = TcpStream::connect(target.addr)
        .await
        .with_context(|| format!("connecting to {}", target.addr))?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /bytes/{} HTTP/1.1\r\nHost: {}\r\n\r\n",
        1u64 << 50,
        target.host
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let body_start = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .context("no response head within 10 s")??;
        if n == 0 {
            bail!("connection closed before the response head");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            anyhow::ensure!(
                head.starts_with(b"HTTP/1.1 200"),
                "answered {:?}",
                String::from_utf8_lossy(&head[..end.min(64)])
            );
            break head.len() - end - 4;
        }
        anyhow::ensure!(head.len() < 16 * 1024, "response head too long");
    };
    let start = Instant::now();
    let slots = (duration.as_millis() / interval.as_millis()).max(1) as usize;
    let mut series = Series {
        interval_ms: interval.as_millis() as u64,
        bytes: vec![0; slots],
    };
    series.bytes[0] += body_start as u64;
    let deadline = tokio::time::Instant::from_std(start + duration);
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await;
        let n = match read {
            Err(_) => break,
            Ok(Ok(0)) => bail!("the download ended early"),
            Ok(Ok(n)) => n,
            Ok(Err(err)) => return Err(err).context("reading the download"),
        };
        let slot = (start.elapsed().as_millis() / interval.as_millis()) as usize;
        if let Some(bucket) = series.bytes.get_mut(slot) {
            *bucket += n as u64;
        }
    }
    Ok(series)
}

/// `streams` downloads at once; their summed series.
pub async fn parallel_download(
    target: &Target,
    streams: usize,
    duration: Duration,
    interval: Duration,
) -> anyhow::Result<Series> {
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            download(&target, duration, interval).await
        }));
    }
    let mut total = Series {
        interval_ms: interval.as_millis() as u64,
        bytes: Vec::new(),
    };
    for task in tasks {
        total.add(&task.await.context("download task")??);
    }
    Ok(total)
}

/// Connection setup, `count` times in a row: from the visitor's `connect` to the origin
/// reading the first byte of the request sent right after it. Returns microseconds each.
pub async fn setup_latency(target: &Target, count: usize) -> anyhow::Result<Vec<f64>> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let sample = tokio::time::timeout(Duration::from_secs(10), setup_once(target))
            .await
            .context("a connection took over 10 s")??;
        samples.push(sample);
    }
    Ok(samples)
}

async fn setup_once(target: &Target) -> anyhow::Result<f64> {
    let started = crate::clock::monotonic_ns();
    let mut stream = TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET /stamp HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        target.host
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no response head from /stamp")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "/stamp answered {head:?}");
    let reached: u64 = body.trim().parse().context("/stamp's body")?;
    anyhow::ensure!(
        reached >= started,
        "the origin's clock reading predates the connect"
    );
    Ok((reached - started) as f64 / 1e3)
}

/// Visitor connections held open and idle, each having completed one request through the
/// tunnel (so each is known to reach the origin).
pub struct IdleVisitors {
    streams: Vec<TcpStream>,
}

impl IdleVisitors {
    /// None yet.
    pub fn new() -> Self {
        Self {
            streams: Vec::new(),
        }
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Opens connections, `parallel` at a time, until `total` are open.
    pub async fn grow_to(
        &mut self,
        target: &Target,
        total: usize,
        parallel: usize,
    ) -> anyhow::Result<()> {
        let wanted = total.saturating_sub(self.streams.len());
        let gate = Arc::new(Semaphore::new(parallel));
        let mut tasks = Vec::with_capacity(wanted);
        for _ in 0..wanted {
            let gate = gate.clone();
            let target = target.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                tokio::time::timeout(Duration::from_secs(20), idle_once(&target))
                    .await
                    .context("an idle connection took over 20 s to open")?
            }));
        }
        let mut first_error = None;
        for task in tasks {
            match task.await.context("idle connection task")? {
                Ok(stream) => self.streams.push(stream),
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err.context(format!(
                "only {} of {total} idle connections opened",
                self.streams.len()
            ))),
            None => Ok(()),
        }
    }
}

/// One `GET /page` on a new connection.
pub async fn get_page(target: &Target) -> anyhow::Result<()> {
    idle_once(target).await.map(drop)
}

/// A connection that has had one `GET /page` answered and stays open.
async fn idle_once(target: &Target) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect(target.addr).await?;
    let request = format!("GET /page HTTP/1.1\r\nHost: {}\r\n\r\n", target.host);
    stream.write_all(request.as_bytes()).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed before the response ended");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            anyhow::ensure!(
                got.starts_with(b"HTTP/1.1 200"),
                "answered {:?}",
                String::from_utf8_lossy(&got[..end])
            );
            if got.len() >= end + 4 + 612 {
                return Ok(stream);
            }
        }
    }
}

/// Resident memory of `pid` and every process below it, in KiB.
pub fn tree_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in process_tree(pid) {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            total += status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    anyhow::ensure!(total > 0, "process {pid} is gone");
    Ok(total)
}

/// CPU time (user and system) used so far by `pid` and every process below it, in seconds.
pub fn tree_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
    let mut ticks = 0u64;
    let mut found = false;
    for pid in process_tree(pid) {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name: state is the first; utime and stime the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        if let (Some(user), Some(system)) = (fields.get(11), fields.get(12)) {
            ticks += user.parse::<u64>().unwrap_or(0) + system.parse::<u64>().unwrap_or(0);
            found = true;
        }
    }
    anyhow::ensure!(found, "process {pid} is gone");
    Ok(ticks as f64 / ticks_per_second)
}

/// `pid` and its descendants, read off /proc.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The command name may hold spaces and parentheses; fields resume after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Requests per second and latency, as wrk reports them (and as [`tls_new_connections`]
/// reports its own load, in the same form).
#[derive(Debug, Clone, Serialize)]
pub struct WrkResult {
    /// Requests per second.
    pub rps: f64,
    /// Median latency, in ms.
    pub p50_ms: f64,
    /// 99th percentile latency, in ms.
    pub p99_ms: f64,
    /// Connect, read, write and timeout errors, and non-2xx answers.
    pub errors: u64,
}

/// Runs wrk against `/page` for `duration` with `connections` connections on two threads,
/// with keep-alive or with a new connection for every request.
pub async fn wrk(
    target: &Target,
    duration: Duration,
    connections: usize,
    keep_alive: bool,
) -> anyhow::Result<WrkResult> {
    let mut command = tokio::process::Command::new("wrk");
    command
        .arg("-t2")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs()))
        .arg("--latency")
        .arg("--timeout")
        .arg("5s")
        .arg("-H")
        .arg(format!("Host: {}", target.host));
    if !keep_alive {
        command.arg("-H").arg("Connection: close");
    }
    command
        .arg(format!("http://{}/page", target.addr))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(duration + Duration::from_secs(30), command.output())
        .await
        .context("wrk did not finish")?
        .context("running wrk (is it installed?)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    anyhow::ensure!(
        output.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    parse_wrk(&text)
}

fn parse_wrk(text: &str) -> anyhow::Result<WrkResult> {
    let number_after = |label: &str| -> Option<String> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|rest| rest.split_whitespace().next().unwrap_or("").to_owned())
    };
    let rps: f64 = number_after("Requests/sec:")
        .context("no Requests/sec in wrk's output")?
        .parse()?;
    let p50 = parse_duration_ms(&number_after("50%").context("no 50% line")?)?;
    let p99 = parse_duration_ms(&number_after("99%").context("no 99% line")?)?;
    let mut errors = 0;
    if let Some(line) = text
        .lines()
        .find(|l| l.trim().starts_with("Socket errors:"))
    {
        errors += line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Some(n) = number_after("Non-2xx or 3xx responses:") {
        errors += n.parse::<u64>().unwrap_or(0);
    }
    Ok(WrkResult {
        rps,
        p50_ms: p50,
        p99_ms: p99,
        errors,
    })
}

/// wrk prints durations as `812.00us`, `1.23ms` or `2.01s`.
fn parse_duration_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("reading {text:?}"))?;
    Ok(match unit {
        "us" => number / 1e3,
        "ms" => number,
        "s" => number * 1e3,
        "m" => number * 60e3,
        other => bail!("unknown unit {other:?} in wrk's output"),
    })
}

/// Longest a visitor of [`tls_new_connections`] may take for one request.
const TLS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A new TLS connection for every request, `connections` visitors at once for `duration`:
/// each connects, completes a TLS handshake for `target.host` (the certificate verified
/// against `ca`, with a configuration of its own so that no session is resumed), sends
/// `GET /page` with `Connection: close` and reads the whole answer, then starts again.
/// Latency runs from `connect()` to the answer's last byte, so it holds the handshake, which
/// is where a proxy routes (by SNI). Requests still open when `duration` ends are not
/// counted, as wrk does not count them; requests per second count answered ones.
pub async fn tls_new_connections(
    target: &Target,
    ca: &shroud_tests::TestCa,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<WrkResult> {
    let roots = ca.root_store();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        let (target, roots) = (target.clone(), roots.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies_ms = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            while tokio::time::Instant::now() < deadline {
                // A new configuration has an empty session cache: a full handshake.
                let config = shroud_tests::client_config(roots.clone(), &[]);
                let started = Instant::now();
                let request = async {
                    let tls =
                        shroud_tests::tls_connect_with(target.addr, &target.host, config).await?;
                    page_closing(tls, &target.host).await
                };
                let bounded = tokio::time::timeout(TLS_REQUEST_TIMEOUT, request);
                match tokio::time::timeout_at(deadline, bounded).await {
                    // The run ended during this request.
                    Err(_) => break,
                    Ok(Ok(Ok(()))) => latencies_ms.push(started.elapsed().as_secs_f64() * 1e3),
                    Ok(Ok(Err(err))) => {
                        errors += 1;
                        first_error.get_or_insert(err);
                    }
                    Ok(Err(_)) => {
                        errors += 1;
                        first_error.get_or_insert(anyhow::anyhow!(
                            "a request took over {TLS_REQUEST_TIMEOUT:?}"
                        ));
                    }
                }
            }
            (latencies_ms, errors, first_error)
        }));
    }
    let mut latencies_ms = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let (latencies, failed, error) = task.await.context("a TLS visitor task")?;
        latencies_ms.extend(latencies);
        errors += failed;
        if first_error.is_none() {
            first_error = error;
        }
    }
    if latencies_ms.is_empty() {
        let err = first_error.unwrap_or_else(|| anyhow::anyhow!("no request was made"));
        return Err(err.context("no TLS request succeeded"));
    }
    Ok(WrkResult {
        rps: latencies_ms.len() as f64 / duration.as_secs_f64(),
        p50_ms: median(&latencies_ms),
        p99_ms: percentile(&latencies_ms, 99.0),
        errors,
    })
}

/// One `GET /page` on a new TLS connection to `target`, as one visitor of
/// [`tls_new_connections`] makes it.
pub async fn tls_get_page(target: &Target, ca: &shroud_tests::TestCa) -> anyhow::Result<()> {
    let config = shroud_tests::client_config(ca.root_store(), &[]);
    let tls = shroud_tests::tls_connect_with(target.addr, &target.host, config).await?;
    page_closing(tls, &target.host).await
}

/// `GET /page` for `host` with `Connection: close` on `stream`; the whole page must come back.
async fn page_closing<S>(stream: S, host: &str) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = shroud_tests::visitor::get_request(host, "/page");
    let response = shroud_tests::http_exchange(stream, request.as_bytes()).await?;
    anyhow::ensure!(response.status == 200, "answered {}", response.status);
    anyhow::ensure!(
        response.body.len() == crate::origin::PAGE_LEN,
        "a page of {} bytes",
        response.body.len()
    );
    Ok(())
}

/// iperf3's single-stream figure on loopback, in MB/s: what the machine's TCP stack does with
/// no HTTP and no tunnel, to calibrate the HTTP download.
pub async fn iperf3_loopback(duration: Duration) -> anyhow::Result<f64> {
    let port = shroud_tests::ports::free_port()?;
    let mut server = tokio::process::Command::new("iperf3")
        .args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting iperf3 -s (is iperf3 installed?)")?;
    // The server is ready when it accepts; try for up to 5 s.
    let ready = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(5),
            "iperf3 -s did not listen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = tokio::time::timeout(
        duration + Duration::from_secs(20),
        tokio::process::Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-J", "-t"])
            .arg(duration.as_secs().to_string())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("iperf3 -c did not finish")??;
    let _ = server.kill().await;
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("iperf3's JSON")?;
    let bits = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's JSON")?;
    Ok(bits / 8.0 / 1e6)
}

/// The median of `values` (the mean of the middle two for an even count); `NaN` when empty.
pub fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

/// The `p`th percentile of `values`, by nearest rank; `NaN` when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if p == 50.0 && sorted.len().is_multiple_of(2) {
        let mid = sorted.len() / 2;
        return (sorted[mid - 1] + sorted[mid]) / 2.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 4s test @ http://127.0.0.1:1/page
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.04us  301.11us  12.00ms   90.00%
  Latency Distribution
     50%  750.00us
     75%    1.01ms
     90%    1.20ms
     99%    2.50ms
  80000 requests in 4.00s, 60.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:  20000.50
Transfer/sec:     15.00MB
";
        let result = parse_wrk(text).unwrap();
        assert_eq!(result.rps, 20000.5);
        assert_eq!(result.p50_ms, 0.75);
        assert_eq!(result.p99_ms, 2.5);
        assert_eq!(result.errors, 6);
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(
            percentile(&(1..=100).map(f64::from).collect::<Vec<_>>(), 99.0),
            99.0
        );
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn series_rate_covers_the_asked_window() {
        let series = Series {
            interval_ms: 100,
            bytes: vec![1_000_000; 20],
        };
        assert!(
            (series.rate_mbs(Duration::from_secs(1), Duration::from_secs(2)) - 10.0).abs() < 1e-9
        );
        assert_eq!(
            series.rate_mbs(Duration::from_secs(3), Duration::from_secs(4)),
            0.0
        );
    }
}
