//! Capped exponential backoff with full jitter: the one retry/backoff
//! policy of the project, used by the agent's reconnects, the controller's
//! step retries, its EC2 calls and its agent calls.
//!
//! `sleep = uniform(0, min(max, initial * 2^attempt))`. [`Backoff`] counts
//! attempts (an agent resets it when a session reached Welcome);
//! [`Backoff::delay`] is the same curve for callers that count themselves.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        let max = if max.as_nanos() < initial.as_nanos() { initial } else { max };
        Backoff { initial, max, attempt: 0 }
    }

    /// A random sleep before retry number `attempt` (0-based), without
    /// counting it.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(rand::random::<f64>())
    }

    /// Failures since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The upper bound of the sleep after failure number `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.checked_mul(factor).map_or(self.max, |d| d.min(self.max))
    }

    /// The sleep for the current attempt given `unit` in [0, 1], then counts
    /// the attempt. Pure: the caller supplies the randomness.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// [`Backoff::next_with`] with a random unit.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let ceilings: Vec<u64> = (0..8).map(|a| b.ceiling(a).as_secs()).collect();
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(60));
        assert_eq!(b.ceiling(40), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_with(0.0), Duration::ZERO);
        assert_eq!(b.next_with(1.0), Duration::from_millis(200));
        assert_eq!(b.next_with(0.5), Duration::from_millis(200));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        assert_eq!(b.next_with(7.0), Duration::from_secs(1), "unit is clamped");
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..10 {
            b.next_with(1.0);
        }
        assert_eq!(b.attempt(), 10);
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next_with(1.0), Duration::from_secs(1));
    }
}
