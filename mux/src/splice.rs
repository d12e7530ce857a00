//! Copying both ways between a visitor's connection and its stream, holding nothing while idle.
//!
//! `tokio::io::copy_bidirectional` gives each direction its own buffer for the whole life of
//! the connection. A proxy holding ten thousand idle visitors would hold twenty thousand
//! buffers that carry nothing. [`splice`] holds a buffer only while it has bytes to pass on:
//! each read borrows one from a per-thread pool, and a read that finds nothing to read (or a
//! direction that has written out all it read and would wait) gives it straight back. A
//! direction waiting for data thus costs no buffer at all, and the pool's memory serves
//! whichever connections are busy.
//!
//! Half-closes carry through as with `copy_bidirectional`: when one side's reads end, the
//! other side's writes are shut down, and the other direction goes on until it ends too.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes a direction keeps, out of the pool, when its writer makes it wait with no more than
/// this left to write: a request head or a small record waiting on a slow peer does not hold a
/// large buffer.
pub const IDLE_BUFFER: usize = 2 * 1024;

/// Large buffers each thread keeps for later reads, at most.
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

/// Copies `a` to `b` and `b` to `a` until both directions have ended, reading into buffers of
/// `burst_buffer` bytes (at least [`IDLE_BUFFER`]) held only while they carry bytes. Returns
/// the bytes copied each way, `(a to b, b to a)`.
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
    /// The buffer holding `buffer[pos..cap]`, bytes read and not yet written; `None` while
    /// there are none. A pool buffer is `burst_len` long; anything else is a small one of
    /// its own (see [`IDLE_BUFFER`]).
    buffer: Option<Box<[u8]>>,
    burst_len: usize,
    pos: usize,
    cap: usize,
    copied: u64,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.release();
    }
}

impl Pump {
    fn new(burst_len: usize) -> Self {
        Self {
            buffer: None,
            burst_len,
            pos: 0,
            cap: 0,
            copied: 0,
            read_done: false,
            need_flush: false,
            done: false,
        }
    }

    /// Gives the buffer back to the pool (or drops a small one of its own).
    fn release(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            if buffer.len() == self.burst_len {
                give_buffer(buffer);
            }
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
                let buffer = self.buffer.as_deref().unwrap_or_default();
                let n = match writer.as_mut().poll_write(cx, &buffer[self.pos..self.cap]) {
                    Poll::Ready(written) => written?,
                    Poll::Pending => {
                        self.shrink_while_waiting();
                        return Poll::Pending;
                    }
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                self.release();
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.copied));
            }
            // Everything read so far is written: read more, into a large buffer (the one held
            // from the last read, or one from the pool).
            if self
                .buffer
                .as_ref()
                .is_none_or(|b| b.len() != self.burst_len)
            {
                self.release();
                self.buffer = Some(take_buffer(self.burst_len));
            }
            let buffer = self.buffer.as_deref_mut().unwrap_or_default();
            let mut buf = ReadBuf::new(buffer);
            match reader.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    self.pos = 0;
                    self.cap = n;
                    if n == 0 {
                        self.read_done = true;
                    }
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    // Nothing to pass on: wait holding no buffer.
                    self.release();
                    self.pos = 0;
                    self.cap = 0;
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// The writer makes us wait: if what is left to write is small, move it into a buffer of
    /// its own size and give the large one back, so a slow peer does not pin a pool buffer
    /// for a few bytes.
    fn shrink_while_waiting(&mut self) {
        let left = self.cap - self.pos;
        if left > IDLE_BUFFER || self.burst_len <= IDLE_BUFFER {
            return;
        }
        let Some(buffer) = self.buffer.as_ref().filter(|b| b.len() == self.burst_len) else {
            return;
        };
        let small: Box<[u8]> = buffer[self.pos..self.cap].into();
        self.release();
        self.buffer = Some(small);
        self.pos = 0;
        self.cap = left;
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
    async fn a_pump_waiting_to_read_holds_no_buffer() {
        let (mut left, mut left_inner) = tokio::io::duplex(64 * 1024);
        let (mut right_inner, mut right) = tokio::io::duplex(64 * 1024);
        let splicer = tokio::spawn(async move {
            let mut pump = Pump::new(64 * 1024);
            poll_fn(|cx| {
                let result =
                    pump.poll_copy(cx, Pin::new(&mut left_inner), Pin::new(&mut right_inner));
                // Waiting to read (not to write), no buffer is held.
                if result.is_pending() && pump.pos == pump.cap {
                    assert!(pump.buffer.is_none(), "an idle pump holds a buffer");
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

    /// A few bytes held up by a slow writer sit in a buffer of their own size, not in a large
    /// one from the pool; they still arrive intact once the writer has room.
    #[tokio::test]
    async fn a_few_bytes_waiting_on_the_writer_hold_no_large_buffer() {
        let (mut left, mut left_inner) = tokio::io::duplex(64 * 1024);
        let (mut right_inner, mut right) = tokio::io::duplex(100);
        let message = payload(1_000);
        left.write_all(&message).await.unwrap();
        let mut pump = Pump::new(64 * 1024);
        let waiting = poll_fn(|cx| {
            Poll::Ready(pump.poll_copy(cx, Pin::new(&mut left_inner), Pin::new(&mut right_inner)))
        })
        .await;
        assert!(
            waiting.is_pending(),
            "the copy finished with the writer full"
        );
        assert_eq!(pump.cap - pump.pos, 900, "the writer took 100 bytes");
        let held = pump.buffer.as_ref().map_or(0, |b| b.len());
        assert!(held <= IDLE_BUFFER, "{held} bytes held for 900 waiting");
        let copier = tokio::spawn(async move {
            poll_fn(|cx| pump.poll_copy(cx, Pin::new(&mut left_inner), Pin::new(&mut right_inner)))
                .await
        });
        let mut got = vec![0; 1_000];
        right.read_exact(&mut got).await.unwrap();
        assert!(got == message, "the bytes arrived altered");
        left.shutdown().await.unwrap();
        assert_eq!(copier.await.unwrap().unwrap(), 1_000);
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
