//! Admission counters: the retry budget that keeps retries from multiplying load,
//! and the token bucket behind local rate limits.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::traffic::RetryBudgetConfig;

/// Retries allowed in a sliding window: `percent` of the requests seen in it, plus
/// a reserve of `min_per_second` for every second of the window.
pub struct RetryBudget {
    config: RetryBudgetConfig,
    window: Mutex<Window>,
}

struct Window {
    /// One slot per second of the interval: (requests, retries).
    slots: Vec<(u64, u64)>,
    /// The second the newest slot counts.
    head_second: u64,
    origin: Instant,
}

impl RetryBudget {
    /// An empty budget.
    pub fn new(config: RetryBudgetConfig) -> Self {
        let seconds = config.interval.as_secs().max(1) as usize;
        RetryBudget {
            config,
            window: Mutex::new(Window {
                slots: vec![(0, 0); seconds],
                head_second: 0,
                origin: Instant::now(),
            }),
        }
    }

    /// The settings it enforces.
    pub fn config(&self) -> &RetryBudgetConfig {
        &self.config
    }

    /// Counts an original request.
    pub fn deposit(&self, now: Instant) {
        let mut w = self.window.lock().expect("budget lock");
        w.slot(now).0 += 1;
    }

    /// Takes one retry if the budget allows it.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut w = self.window.lock().expect("budget lock");
        w.slot(now);
        let (requests, retries) = w.slots.iter().fold((0, 0), |(a, b), (r, t)| (a + r, b + t));
        let reserve = self.config.min_per_second as u64 * w.slots.len() as u64;
        let allowed = requests * self.config.percent as u64 / 100 + reserve;
        if retries < allowed {
            w.slot(now).1 += 1;
            true
        } else {
            false
        }
    }
}

impl Window {
    /// The slot for `now`, clearing slots that fell out of the window.
    fn slot(&mut self, now: Instant) -> &mut (u64, u64) {
        let second = now.saturating_duration_since(self.origin).as_secs();
        let len = self.slots.len() as u64;
        if second > self.head_second {
            let stale = (second - self.head_second).min(len);
            for s in 1..=stale {
                let i = ((self.head_second + s) % len) as usize;
                self.slots[i] = (0, 0);
            }
            self.head_second = second;
        }
        let i = (self.head_second % len) as usize;
        &mut self.slots[i]
    }
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate: rate as f64,
            burst: burst as f64,
            state: Mutex::new((burst as f64, now)),
        }
    }

    /// Takes a token if one is left.
    pub fn try_take(&self, now: Instant) -> bool {
        let mut s = self.state.lock().expect("bucket lock");
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// How long to wait before retry `n` (1-based): `base` doubled each time, with
/// up to 50 % jitter, capped at 10 s.
pub fn backoff(base: Duration, n: u32, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << (n.saturating_sub(1)).min(10));
    exp.min(Duration::from_secs(10))
        .mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(percent: u32, min_per_second: u32) -> RetryBudget {
        RetryBudget::new(RetryBudgetConfig {
            percent,
            interval: Duration::from_secs(10),
            min_per_second,
        })
    }

    #[test]
    fn retries_stay_within_percent_plus_reserve() {
        let b = budget(20, 0);
        let t0 = Instant::now();
        for _ in 0..100 {
            b.deposit(t0);
        }
        let granted = (0..100).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 20);

        let b = budget(20, 1);
        let granted = (0..100).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 10, "the reserve alone: 1/s over a 10 s window");
    }

    #[test]
    fn old_requests_leave_the_window() {
        let b = budget(50, 0);
        let t0 = Instant::now();
        for _ in 0..100 {
            b.deposit(t0);
        }
        assert!(b.try_withdraw(t0 + Duration::from_secs(9)));
        assert!(!b.try_withdraw(t0 + Duration::from_secs(11)));
    }

    #[test]
    fn bucket_refills_at_rate() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(10, 5, t0);
        assert_eq!((0..10).filter(|_| bucket.try_take(t0)).count(), 5);
        let later = t0 + Duration::from_millis(500);
        assert_eq!((0..10).filter(|_| bucket.try_take(later)).count(), 5);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let base = Duration::from_millis(25);
        assert_eq!(backoff(base, 1, 0.0), Duration::from_millis(25));
        assert_eq!(backoff(base, 3, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(base, 3, 1.0), Duration::from_millis(50));
        assert_eq!(backoff(base, 30, 0.0), Duration::from_secs(10));
    }
}
