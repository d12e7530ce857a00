//! A TCP relay that behaves like a long, narrow link: each direction is held back by half the
//! round trip and paced at the link rate, with a buffer of twice the bandwidth-delay product,
//! so the link itself never limits a sender whose window covers the round trip.
//!
//! The machine's kernel has no `netem`, so this stands in for it. It terminates TCP on both
//! sides: what the relay delays is the application's data, which is what a window-limited
//! protocol (yamux over one TCP connection) feels. A plain TCP connection through the same
//! relay is the baseline it is compared with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The link a relay imitates.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Round trip added between the two sides.
    pub rtt: Duration,
    /// Bytes per second in each direction.
    pub rate: u64,
}

impl Link {
    /// Bytes one direction may hold: twice the bandwidth-delay product, at least 1 MiB.
    fn buffer(&self) -> usize {
        let bdp = self.rate as f64 * self.rtt.as_secs_f64();
        ((2.0 * bdp) as usize).max(1024 * 1024)
    }
}

/// Relays every connection accepted on `listen` to `upstream` over `link`, until killed.
/// Prints `relay listening addr=...` on stderr once bound.
pub async fn serve(listen: SocketAddr, upstream: SocketAddr, link: Link) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("relay listening addr={}", listener.local_addr()?);
    loop {
        let (visitor, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Err(err) = relay(visitor, upstream, link).await {
                eprintln!("relay: {err:#}");
            }
        });
    }
}

async fn relay(visitor: TcpStream, upstream: SocketAddr, link: Link) -> anyhow::Result<()> {
    let server = TcpStream::connect(upstream)
        .await
        .with_context(|| format!("connecting to {upstream}"))?;
    visitor.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (visitor_read, visitor_write) = visitor.into_split();
    let (server_read, server_write) = server.into_split();
    let up = tokio::spawn(direction(visitor_read, server_write, link));
    let down = tokio::spawn(direction(server_read, visitor_write, link));
    // Either side's error ends only its own direction; the other drains on its own.
    let _ = up.await;
    let _ = down.await;
    Ok(())
}

/// One direction: data read at `arrival` leaves the link once the link has carried what came
/// before it at `link.rate`, and reaches the far side half a round trip later.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: Link) {
    let budget = Arc::new(Semaphore::new(link.buffer()));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>, OwnedSemaphorePermit)>();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let Ok(permit) = budget.clone().acquire_many_owned(n as u32).await else {
                return;
            };
            if tx
                .send((Instant::now(), buf[..n].to_vec(), permit))
                .is_err()
            {
                return;
            }
        }
    });
    let one_way = link.rtt / 2;
    let mut link_free = Instant::now();
    while let Some((arrival, data, permit)) = rx.recv().await {
        let serialise = Duration::from_secs_f64(data.len() as f64 / link.rate as f64);
        link_free = link_free.max(arrival) + serialise;
        tokio::time::sleep_until(link_free + one_way).await;
        if to.write_all(&data).await.is_err() {
            break;
        }
        drop(permit);
    }
    reader.abort();
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.into_split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    /// Bytes cross intact, and no reply comes back sooner than the round trip: the relay
    /// holds each direction back by half of it.
    #[tokio::test]
    async fn echoes_intact_and_never_sooner_than_the_round_trip() {
        let upstream = echo().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let link = Link {
            rtt: Duration::from_millis(120),
            rate: 50_000_000,
        };
        tokio::spawn(async move {
            while let Ok((visitor, _)) = listener.accept().await {
                tokio::spawn(relay(visitor, upstream, link));
            }
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        stream.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        stream.read_exact(&mut one).await.unwrap();
        assert!(
            started.elapsed() >= link.rtt,
            "the echo came back after {:?}",
            started.elapsed()
        );

        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let (mut read, mut write) = stream.into_split();
        let sent = payload.clone();
        let writer = tokio::spawn(async move { write.write_all(&sent).await });
        let mut got = vec![0u8; payload.len()];
        read.read_exact(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        assert!(got == payload, "the relay altered the bytes");
    }
}
