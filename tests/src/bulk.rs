//! The bulk-transfer protocol spoken by [`crate::origin::BulkOrigin`] and
//! [`crate::visitor::bulk_transfer`], and the byte generator both ends share.
//!
//! The protocol, on one bidirectional byte stream:
//!
//! 1. The visitor sends N as an 8-byte big-endian integer.
//! 2. Both ends then send N bytes at the same time: the visitor the
//!    [`PatternGen`] stream seeded with [`VISITOR_SEED`], the origin the one
//!    seeded with [`ORIGIN_SEED`].
//! 3. Once the origin has received all N bytes it sends the 32-byte SHA-256
//!    of what it received, and shuts down its write side.
//!
//! The visitor knows both streams, so it checks the origin→visitor direction
//! byte by byte and the visitor→origin direction through the origin's hash.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Seed of the bytes the visitor sends.
pub const VISITOR_SEED: u64 = 0x5649_5349_544f_5221; // "VISITOR!"
/// Seed of the bytes the origin sends.
pub const ORIGIN_SEED: u64 = 0x4f52_4947_494e_2121; // "ORIGIN!!"

/// Size of the buffers each end reads and writes with.
pub(crate) const BUF_LEN: usize = 64 * 1024;

/// Length of the random table [`PatternGen`] copies its blocks from.
const TABLE_LEN: usize = 1 << 20;
/// Length of each block [`PatternGen`] copies in one piece.
const BLOCK_LEN: usize = 4096;

/// A deterministic, fast stream of pseudo-random bytes.
///
/// The stream is a sequence of 4 KiB blocks, each copied from a random
/// offset in a fixed 1 MiB table of xorshift64* output; the seed drives a
/// second xorshift64* that picks the offsets. Generating is thus mostly
/// `memcpy`, which keeps the harness far cheaper than the tunnel it tests
/// even in debug builds (word-by-word generation was the bottleneck there),
/// while the stream still never repeats a pattern a faulty relay could hit
/// by accident: a dropped, duplicated or reordered block shows up at once.
///
/// The stream depends only on the seed, never on how callers slice it: two
/// generators with one seed produce the same bytes however their `fill`
/// calls are sized.
#[derive(Debug, Clone)]
pub struct PatternGen {
    rng: XorShift,
    block_start: usize,
    block_used: usize,
}

impl PatternGen {
    /// A generator for the stream named by `seed`.
    pub fn new(seed: u64) -> Self {
        PatternGen {
            rng: XorShift::new(seed),
            block_start: 0,
            block_used: BLOCK_LEN,
        }
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, mut buf: &mut [u8]) {
        let table = table();
        while !buf.is_empty() {
            if self.block_used == BLOCK_LEN {
                // Modulo bias is irrelevant here; only unpredictability is.
                self.block_start = (self.rng.next_u64() % TABLE_LEN as u64) as usize;
                self.block_used = 0;
            }
            let take = (BLOCK_LEN - self.block_used).min(buf.len());
            let from = self.block_start + self.block_used;
            let (head, rest) = buf.split_at_mut(take);
            head.copy_from_slice(&table[from..from + take]);
            self.block_used += take;
            buf = rest;
        }
    }
}

/// The table blocks are copied from; one block longer than [`TABLE_LEN`] so
/// that a block starting anywhere in it never wraps.
fn table() -> &'static [u8] {
    static TABLE: OnceLock<Box<[u8]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut rng = XorShift::new(0x0054_4142_4c45); // "TABLE"
        let mut table = vec![0u8; TABLE_LEN + BLOCK_LEN];
        for chunk in table.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        table.into_boxed_slice()
    })
}

/// xorshift64*, seeded through splitmix64.
#[derive(Debug, Clone)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // splitmix64 spreads similar seeds apart; zero is the one state
        // xorshift cannot leave.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        XorShift(if z == 0 { 1 } else { z })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One direction of a bulk transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Bytes the visitor sent and the origin received.
    VisitorToOrigin,
    /// Bytes the origin sent and the visitor received.
    OriginToVisitor,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::VisitorToOrigin => "visitor→origin",
            Direction::OriginToVisitor => "origin→visitor",
        })
    }
}

/// Why a bulk transfer failed its check. [`crate::visitor::bulk_transfer`]
/// returns it inside its `anyhow::Error`; find it with `downcast_ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkError {
    /// The stream ended before all bytes of `direction` arrived.
    Truncated {
        /// Which direction fell short.
        direction: Direction,
        /// How many bytes arrived.
        received: u64,
        /// How many were due.
        expected: u64,
    },
    /// Bytes arrived, but not the ones that were sent.
    Corrupted {
        /// Which direction was damaged.
        direction: Direction,
        /// The first differing byte, when the receiver could tell (the
        /// visitor→origin direction is checked by hash, so there it cannot).
        offset: Option<u64>,
    },
}

impl BulkError {
    /// The direction that failed.
    pub fn direction(&self) -> Direction {
        match self {
            BulkError::Truncated { direction, .. } | BulkError::Corrupted { direction, .. } => {
                *direction
            }
        }
    }
}

impl fmt::Display for BulkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BulkError::Truncated {
                direction,
                received,
                expected,
            } => write!(
                f,
                "{direction}: stream ended after {received} of {expected} bytes"
            ),
            BulkError::Corrupted {
                direction,
                offset: Some(offset),
            } => write!(
                f,
                "{direction}: received bytes differ from those sent, first at offset {offset}"
            ),
            BulkError::Corrupted {
                direction,
                offset: None,
            } => write!(
                f,
                "{direction}: SHA-256 of the received bytes differs from that of the bytes sent"
            ),
        }
    }
}

impl std::error::Error for BulkError {}

/// Writes `n` bytes of the stream `seed` to `writer` in pieces of at most `chunk` bytes,
/// returning their SHA-256 if `hash` is set. With a `pace`, one piece per tick of it, each
/// flushed at once. Flushes at the end; does not shut down.
pub(crate) async fn send_pattern<W: AsyncWrite + Unpin>(
    writer: &mut W,
    seed: u64,
    n: u64,
    hash: bool,
    chunk: usize,
    pace: Option<Duration>,
) -> std::io::Result<Option<[u8; 32]>> {
    let mut pattern = PatternGen::new(seed);
    let mut hasher = hash.then(Sha256::new);
    let mut buf = vec![0u8; chunk];
    let mut ticks = pace.map(tokio::time::interval);
    let mut left = n;
    while left > 0 {
        if let Some(ticks) = &mut ticks {
            ticks.tick().await;
        }
        let len = chunk_len(left, buf.len());
        let piece = &mut buf[..len];
        pattern.fill(piece);
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(&*piece);
        }
        writer.write_all(piece).await?;
        if ticks.is_some() {
            writer.flush().await?;
        }
        left -= len as u64;
    }
    writer.flush().await?;
    Ok(hasher.map(|h| h.finalize().into()))
}

/// What [`receive_hashed`] saw.
pub(crate) enum Received {
    /// All `n` bytes arrived; their SHA-256.
    Complete([u8; 32]),
    /// The stream ended after this many bytes.
    Truncated(u64),
}

/// Reads exactly `n` bytes (never more) from `reader` and hashes them.
pub(crate) async fn receive_hashed<R: AsyncRead + Unpin>(
    reader: &mut R,
    n: u64,
) -> std::io::Result<Received> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_LEN];
    let mut got = 0u64;
    while got < n {
        let len = chunk_len(n - got, buf.len());
        let read = reader.read(&mut buf[..len]).await?;
        if read == 0 {
            return Ok(Received::Truncated(got));
        }
        hasher.update(&buf[..read]);
        got += read as u64;
    }
    Ok(Received::Complete(hasher.finalize().into()))
}

/// The smaller of `left` and `cap`, as a buffer length.
pub(crate) fn chunk_len(left: u64, cap: usize) -> usize {
    usize::try_from(left).map_or(cap, |left| left.min(cap))
}

#[cfg(test)]
mod tests {
    use super::PatternGen;

    #[test]
    fn stream_does_not_depend_on_slicing() {
        let mut whole = vec![0u8; 20_000];
        PatternGen::new(7).fill(&mut whole);

        let mut pieces = vec![0u8; 20_000];
        let mut pattern = PatternGen::new(7);
        let mut at = 0;
        for (i, len) in [1usize, 3, 8, 5, 13, 4096, 64, 7, 0, 5000, 2]
            .iter()
            .cycle()
            .enumerate()
        {
            if at == pieces.len() || i > 100_000 {
                break;
            }
            let end = (at + len).min(pieces.len());
            pattern.fill(&mut pieces[at..end]);
            at = end;
        }
        assert_eq!(at, pieces.len());
        assert_eq!(whole, pieces);
    }

    #[test]
    fn seeds_give_different_streams() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        PatternGen::new(super::VISITOR_SEED).fill(&mut a);
        PatternGen::new(super::ORIGIN_SEED).fill(&mut b);
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 64]);
    }
}
