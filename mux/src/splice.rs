//! Copying both ways between a visitor's connection and its stream, lean while idle.
//!
//! `tokio::io::copy_bidirectional` gives each direction its own buffer for the whole life of
//! the connection. A proxy holding ten thousand idle visitors would hold twenty thousand
//! buffers that carry nothing. [`splice`] waits for data with a small buffer kept inside its
//! future ([`IDLE_BUFFER`] bytes each way) and borrows a large one from a per-thread pool only
//! for a burst: from a read that fills the small buffer until a read would block. Then the
//! large buffer goes back to the pool, so its memory serves whichever connection is busy.
//!
//! Half-closes carry through as with `copy_bidirectional`: when one side's reads end, the
//! other side's writes are shut down, and the other direction goes on until it ends too.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes each direction keeps for waiting on an idle peer: enough for a request head or a
/// small TLS record in one read.
pub const IDLE_BUFFER: usize = 2 * 1024;

/// Large buffers each thread keeps for later bursts, at most.
const POOL_PER_THREAD: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer(len: usize) -> Box<[u8]> {
    let pooled = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let at = pool.iter().rposition(|b| b.len() == len)?;
        Some(pool.swap_remove(at))
    });
    pooled.unwrap_or_else(|| vec![0; len].into_boxed_slice())
}

fn give_buffer(buffer: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(buffer);
        }
    });
}

/// Copies `a` to `b` and `b` to `a` until both directions have ended, using buffers of up to
/// `burst_buffer` bytes for bursts. Returns the bytes copied each way, `(a to b, b to a)`.
///
/// # Errors
///
/// The first read, write or shutdown error of either side; the other direction stops too.
pub async fn splice<A, B>(a: &mut A, b: &mut B, burst_buffer: usize) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_reporting(a, b, burst_buffer, |_, _| {}).await
}

/// [`splice`], telling `report` the bytes written each way since its last call, `(a to b, b
/// to a)`, each time the copy waits, ends or fails, and only when some were: once per burst
/// rather than once per read, so a counter behind it costs next to nothing. Bytes written
/// before an error are reported too.
///
/// # Errors
///
/// As [`splice`].
pub async fn splice_reporting<A, B, F>(
    a: &mut A,
    b: &mut B,
    burst_buffer: usize,
    mut report: F,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    F: FnMut(u64, u64),
{
    let burst_buffer = burst_buffer.max(IDLE_BUFFER);
    let mut a_to_b = Pump::new(burst_buffer);
    let mut b_to_a = Pump::new(burst_buffer);
    let mut reported = (0u64, 0u64);
    poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b));
        let backward = match forward {
            Poll::Ready(Err(_)) => Poll::Pending,
            _ => b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)),
        };
        let copied = (a_to_b.copied, b_to_a.copied);
        if copied != reported {
            report(copied.0 - reported.0, copied.1 - reported.1);
            reported = copied;
        }
        match (forward, backward) {
            (Poll::Ready(Err(err)), _) | (_, Poll::Ready(Err(err))) => Poll::Ready(Err(err)),
            (Poll::Ready(Ok(forward)), Poll::Ready(Ok(backward))) => {
                Poll::Ready(Ok((forward, backward)))
            }
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction's state.
struct Pump {
    idle: [u8; IDLE_BUFFER],
    burst: Option<Box<[u8]>>,
    burst_len: usize,
    /// Whether the bytes waiting to be written are in `burst` (else in `idle`).
    in_burst: bool,
    pos: usize,
    cap: usize,
    copied: u64,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Drop for Pump {
    fn drop(&mut self) {
        if let Some(buffer) = self.burst.take() {
            give_buffer(buffer);
        }
    }
}

impl Pump {
    fn new(burst_len: usize) -> Self {
        Self {
            idle: [0; IDLE_BUFFER],
            burst: None,
            burst_len,
            in_burst: false,
            pos: 0,
            cap: 0,
            copied: 0,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            while self.pos < self.cap {
                let pending = match (&self.burst, self.in_burst) {
                    (Some(burst), true) => &burst[self.pos..self.cap],
                    _ => &self.idle[self.pos..self.cap],
                };
                let n = ready!(writer.as_mut().poll_write(cx, pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.copied));
            }
            // Everything read so far is written: read more, into the burst buffer if a burst
            // is on, else into the idle one.
            let read = match self.burst.as_mut() {
                Some(burst) => {
                    let mut buf = ReadBuf::new(burst);
                    match reader.as_mut().poll_read(cx, &mut buf) {
                        Poll::Ready(result) => {
                            Poll::Ready(result.map(|()| (buf.filled().len(), true)))
                        }
                        Poll::Pending => {
                            // The burst is over; the waker is registered, and the next poll
                            // waits with the idle buffer.
                            if let Some(buffer) = self.burst.take() {
                                give_buffer(buffer);
                            }
                            Poll::Pending
                        }
                    }
                }
                None => {
                    let mut buf = ReadBuf::new(&mut self.idle);
                    reader
                        .as_mut()
                        .poll_read(cx, &mut buf)
                        .map(|result| result.map(|()| (buf.filled().len(), false)))
                }
            };
            match read {
                Poll::Ready(Ok((0, _))) => self.read_done = true,
                Poll::Ready(Ok((n, in_burst))) => {
                    self.in_burst = in_burst;
                    self.pos = 0;
                    self.cap = n;
                    if !in_burst && n == IDLE_BUFFER {
                        // More is likely waiting: fetch it in large reads.
                        self.burst = Some(take_buffer(self.burst_len));
                    }
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A payload whose every byte depends on its position, so reordering shows.
    fn payload(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn carries_both_ways_through_tiny_pipes_and_half_closes() {
        // Duplex pipes of 7 bytes force partial reads and writes everywhere.
        let (mut left, mut left_inner) = tokio::io::duplex(7);
        let (mut right_inner, mut right) = tokio::io::duplex(7);
        let splicer =
            tokio::spawn(async move { splice(&mut left_inner, &mut right_inner, 64 * 1024).await });
        let up = payload(100_000);
        let down = payload(70_001);
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let writer_left = async move {
            left.write_all(&up_sent).await?;
            left.shutdown().await?;
            let mut got = Vec::new();
            left.read_to_end(&mut got).await?;
            io::Result::Ok(got)
        };
        let writer_right = async move {
            let mut got = Vec::new();
            // The left side's shutdown arrives as the end of this read.
            right.read_to_end(&mut got).await?;
            right.write_all(&down_sent).await?;
            right.shutdown().await?;
            io::Result::Ok(got)
        };
        let (from_right, from_left) = tokio::try_join!(writer_left, writer_right).unwrap();
        assert!(from_left == up, "left to right altered");
        assert!(from_right == down, "right to left altered");
        let (forward, backward) = splicer.await.unwrap().unwrap();
        assert_eq!((forward, backward), (100_000, 70_001));
    }

    #[tokio::test]
    async fn small_exchanges_never_take_a_burst_buffer() {
        let (mut left, mut left_inner) = tokio::io::duplex(64 * 1024);
        let (mut right_inner, mut right) = tokio::io::duplex(64 * 1024);
        let splicer = tokio::spawn(async move {
            let mut pump = Pump::new(64 * 1024);
            poll_fn(|cx| {
                let result =
                    pump.poll_copy(cx, Pin::new(&mut left_inner), Pin::new(&mut right_inner));
                // Waiting to read (not to write), no burst buffer is held.
                if result.is_pending() && pump.pos == pump.cap {
                    assert!(pump.burst.is_none(), "an idle pump holds a burst buffer");
                }
                result
            })
            .await
        });
        for round in 0..10u8 {
            let message = vec![round; 500];
            left.write_all(&message).await.unwrap();
            let mut got = vec![0; 500];
            right.read_exact(&mut got).await.unwrap();
            assert_eq!(got, message);
        }
        // A burst: more than the idle buffer at once.
        let burst = payload(200_000);
        let sent = burst.clone();
        let write = tokio::spawn(async move {
            left.write_all(&sent).await.unwrap();
            left.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        right.read_to_end(&mut got).await.unwrap();
        write.await.unwrap();
        assert!(got == burst, "the burst arrived altered");
        assert_eq!(splicer.await.unwrap().unwrap(), 5_000 + 200_000);
    }

    #[tokio::test]
    async fn reports_every_byte_each_way_in_few_calls() {
        let (mut left, mut left_inner) = tokio::io::duplex(7);
        let (mut right_inner, mut right) = tokio::io::duplex(7);
        let splicer = tokio::spawn(async move {
            let mut reports = Vec::new();
            let total = splice_reporting(&mut left_inner, &mut right_inner, 64 * 1024, |a, b| {
                assert!(a > 0 || b > 0, "an empty report");
                reports.push((a, b));
            })
            .await;
            (total, reports)
        });
        let up = payload(30_000);
        let down = payload(20_001);
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let writer_left = async move {
            left.write_all(&up_sent).await?;
            left.shutdown().await?;
            let mut got = Vec::new();
            left.read_to_end(&mut got).await?;
            io::Result::Ok(got)
        };
        let writer_right = async move {
            let mut got = Vec::new();
            right.read_to_end(&mut got).await?;
            right.write_all(&down_sent).await?;
            right.shutdown().await?;
            io::Result::Ok(got)
        };
        let (from_right, from_left) = tokio::try_join!(writer_left, writer_right).unwrap();
        assert!(from_left == up && from_right == down);
        let (total, reports) = splicer.await.unwrap();
        assert_eq!(total.unwrap(), (30_000, 20_001));
        let sum = reports
            .iter()
            .fold((0, 0), |(a, b), (da, db)| (a + da, b + db));
        assert_eq!(sum, (30_000, 20_001));
    }

    #[tokio::test]
    async fn bytes_copied_before_an_error_are_reported() {
        let (mut left, mut left_inner) = tokio::io::duplex(1024);
        let (mut right_inner, mut right) = tokio::io::duplex(1024);
        let reported = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = reported.clone();
        let splicer = tokio::spawn(async move {
            splice_reporting(&mut left_inner, &mut right_inner, 4096, |a, _| {
                seen.fetch_add(a, std::sync::atomic::Ordering::Relaxed);
            })
            .await
        });
        left.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        right.read_exact(&mut got).await.unwrap();
        drop(right);
        left.write_all(b"to nobody").await.unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), splicer)
            .await
            .expect("the splice ended")
            .unwrap();
        assert!(result.is_err(), "{result:?}");
        assert_eq!(reported.load(std::sync::atomic::Ordering::Relaxed), 5);
    }

    #[tokio::test]
    async fn a_write_error_ends_the_splice() {
        let (mut left, mut left_inner) = tokio::io::duplex(1024);
        let (mut right_inner, right) = tokio::io::duplex(1024);
        drop(right);
        let splicer =
            tokio::spawn(async move { splice(&mut left_inner, &mut right_inner, 4096).await });
        left.write_all(b"to nobody").await.unwrap();
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), splicer)
            .await
            .expect("the splice ended")
            .unwrap();
        assert!(result.is_err(), "{result:?}");
    }
}
