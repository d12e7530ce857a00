//! The origin every contender forwards to: a small HTTP/1.1 server, run as its own process
//! (`shroud-bench origin`) so that its CPU and memory are not the driver's.
//!
//! | request          | answer                                                              |
//! |------------------|---------------------------------------------------------------------|
//! | `GET /page`      | a 612-byte page (the size of nginx's welcome page)                  |
//! | `GET /bytes/N`   | N bytes, written from a 256 KiB buffer                              |
//! | `GET /stamp`     | the monotonic clock, in ns, when this connection's first byte came  |
//! | anything else    | 404                                                                 |
//!
//! Connections are kept alive unless the request says `Connection: close`, and never timed
//! out: an idle visitor connection stays open at the origin for as long as the visitor keeps it.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Size of the buffer `/bytes/N` is written from, and of each write.
const CHUNK: usize = 256 * 1024;
/// The body of `/page`.
pub(crate) const PAGE_LEN: usize = 612;

/// Serves on `listen` until the process is killed. Prints `origin listening addr=...` on
/// stderr once bound.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("origin listening addr={}", listener.local_addr()?);
    // Not zeros, so nothing on the way could profit from compressing them.
    let chunk: Arc<[u8]> = (0..CHUNK)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("origin: accept: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let chunk = chunk.clone();
        tokio::spawn(async move {
            // A visitor that goes away mid-response is the normal end of a download.
            let _ = connection(stream, chunk).await;
        });
    }
}

async fn connection(mut stream: TcpStream, chunk: Arc<[u8]>) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    let mut first_byte_ns = None;
    loop {
        let Some(head_len) = read_head(&mut stream, &mut buf, &mut first_byte_ns).await? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.drain(..head_len);
        let path = head.split_whitespace().nth(1).unwrap_or("");
        let close = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close"));
        let connection = if close { "close" } else { "keep-alive" };
        if path == "/page" {
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {PAGE_LEN}\r\nConnection: {connection}\r\n\r\n"
            )
            .into_bytes();
            response.extend_from_slice(&chunk[..PAGE_LEN]);
            stream.write_all(&response).await?;
        } else if path == "/stamp" {
            let body = first_byte_ns.unwrap_or(0).to_string();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await?;
        } else if let Some(n) = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<u64>().ok())
        {
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: {connection}\r\n\r\n"
            );
            stream.write_all(header.as_bytes()).await?;
            let mut left = n;
            while left > 0 {
                let len = left.min(CHUNK as u64) as usize;
                stream.write_all(&chunk[..len]).await?;
                left -= len as u64;
            }
        } else {
            let response = format!(
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: {connection}\r\n\r\n"
            );
            stream.write_all(response.as_bytes()).await?;
        }
        if close {
            stream.shutdown().await?;
            return Ok(());
        }
    }
}

/// Reads until `buf` holds a whole request head; returns its length, or `None` on a clean
/// end of stream. Notes the monotonic time of the connection's first byte.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    first_byte_ns: &mut Option<u64>,
) -> anyhow::Result<Option<usize>> {
    let mut scratch = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        anyhow::ensure!(buf.len() <= MAX_HEAD, "request head over {MAX_HEAD} bytes");
        let n = stream.read(&mut scratch).await?;
        if n == 0 {
            anyhow::ensure!(buf.is_empty(), "connection closed mid-request");
            return Ok(None);
        }
        first_byte_ns.get_or_insert_with(crate::clock::monotonic_ns);
        buf.extend_from_slice(&scratch[..n]);
    }
}
