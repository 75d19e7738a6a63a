//! Exponential backoff with jitter for reconnects.
//!
//! After the `n`th failure in a row (from 0) the ceiling is
//! `min_ms * 2^n`, capped at `max_ms`; the delay is drawn evenly from
//! `[ceiling / 2, ceiling]`, but never below `min_ms`. So the first retry
//! waits exactly `min_ms`, waits roughly double while failures go on, no
//! wait is ever longer than `max_ms`, and boxes that lost their broker
//! together do not all come back in the same millisecond. The jitter
//! comes from a seeded generator (SplitMix64), so tests replay exactly.

/// The backoff state: failures in a row and the generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    failures: u32,
    state: u64,
}

impl Backoff {
    /// A backoff between `min_ms` (at least 1) and `max_ms` (at least
    /// `min_ms`).
    pub fn new(min_ms: u64, max_ms: u64, seed: u64) -> Backoff {
        let min_ms = min_ms.max(1);
        Backoff {
            min_ms,
            max_ms: max_ms.max(min_ms),
            failures: 0,
            state: seed,
        }
    }

    /// Failures since the last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The longest the next delay can be.
    pub fn ceiling_ms(&self) -> u64 {
        let factor = 1u64 << self.failures.min(62);
        self.min_ms.saturating_mul(factor).min(self.max_ms)
    }

    /// The delay before the next attempt; counts one more failure.
    pub fn next_delay_ms(&mut self) -> u64 {
        let ceiling = self.ceiling_ms();
        let floor = (ceiling / 2).max(self.min_ms).min(ceiling);
        self.failures = self.failures.saturating_add(1);
        floor + self.next_random() % (ceiling - floor + 1)
    }

    /// A good connection: the next failure waits `min_ms` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// SplitMix64.
    fn next_random(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.state;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }
}
