//! Helpers the fuzz targets share: a way to run the async readers without a runtime, and a
//! reader that hands its bytes out in small pieces (with the odd `Pending`), to exercise
//! partial reads the way a slow network does.

#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

/// Runs `future` to completion. The readers here never wait on anything outside themselves
/// (a `Pending` from [`Chunked`] is woken at once), so polling again is always right.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// A reader over `data` that yields pieces of 1 to 16 bytes, and `Pending` before some of
/// them, in an order drawn from `seed`. Its `position` is how much has been read.
pub struct Chunked<'a> {
    data: &'a [u8],
    /// Bytes handed out so far.
    pub position: usize,
    state: u64,
    pending_next: bool,
}

impl<'a> Chunked<'a> {
    /// A reader over `data`, its piece sizes drawn from `seed`.
    pub fn new(data: &'a [u8], seed: u64) -> Self {
        Self {
            data,
            position: 0,
            state: seed | 1,
            pending_next: false,
        }
    }

    /// A reader over `data` whose piece sizes are drawn from a hash of `data` itself, so the
    /// corpus needs no extra bytes and a crash reproduces from its input alone.
    pub fn seeded_by_content(data: &'a [u8]) -> Self {
        Self::new(data, fnv1a(data))
    }

    fn next(&mut self) -> u64 {
        // xorshift64
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// What has not been read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.data[self.position..]
    }
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pending_next {
            self.pending_next = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let roll = self.next();
        self.pending_next = roll % 5 == 0;
        let size = 1 + (roll >> 8) as usize % 16;
        let rest = self.rest();
        let n = size.min(rest.len()).min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.position += n;
        Poll::Ready(Ok(()))
    }
}

/// FNV-1a over `data`.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}
