//! The reset budget of an HBONE connection: a peer that resets the streams the tunnel
//! has connected upstream for could make it connect to the application at any rate
//! (h2's own limit counts only streams reset before they are accepted). Each stream the
//! peer resets takes a token from its connection's bucket; while the bucket is empty,
//! the connection's upstream connects wait for a token each, so they follow the refill
//! rate. A peer that resets nothing is never held back.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Resets a connection may make before its upstream connects are paced.
pub const RESET_BURST: f64 = 100.0;
/// Tokens regained per second; the pace of upstream connects while the bucket is empty.
pub const RESET_REFILL_PER_SECOND: f64 = 20.0;

/// The size and refill rate of each HBONE connection's reset budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResetBudgetConfig {
    pub burst: f64,
    pub per_second: f64,
}

impl Default for ResetBudgetConfig {
    fn default() -> Self {
        ResetBudgetConfig {
            burst: RESET_BURST,
            per_second: RESET_REFILL_PER_SECOND,
        }
    }
}

pub(crate) struct ResetBudget {
    config: ResetBudgetConfig,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, config: ResetBudgetConfig) {
        let gained = now.duration_since(self.at).as_secs_f64() * config.per_second;
        self.tokens = (self.tokens + gained).min(config.burst);
        self.at = now;
    }
}

impl ResetBudget {
    pub(crate) fn new(config: ResetBudgetConfig) -> Self {
        Self::new_at(config, Instant::now())
    }

    fn new_at(config: ResetBudgetConfig, now: Instant) -> Self {
        ResetBudget {
            config,
            bucket: Mutex::new(Bucket {
                tokens: config.burst,
                at: now,
            }),
        }
    }

    /// A stream of this connection was reset by the peer.
    pub(crate) fn charge(&self) {
        self.charge_at(Instant::now());
    }

    /// How long the next upstream connect must wait, taking its token when it is
    /// paced; `None` when the budget is not spent (the connect goes at once).
    pub(crate) fn delay(&self) -> Option<Duration> {
        self.delay_at(Instant::now())
    }

    /// The debt is bounded, so a peer that stops resetting is paced no longer than a
    /// full refill.
    fn charge_at(&self, now: Instant) {
        let mut bucket = self.lock();
        bucket.refill(now, self.config);
        bucket.tokens = (bucket.tokens - 1.0).max(-self.config.burst);
    }

    fn delay_at(&self, now: Instant) -> Option<Duration> {
        let mut bucket = self.lock();
        bucket.refill(now, self.config);
        if bucket.tokens >= 1.0 {
            return None;
        }
        // The token is taken now and waited for: concurrent connects queue one
        // refill interval apart.
        let wait = (1.0 - bucket.tokens) / self.config.per_second;
        bucket.tokens -= 1.0;
        Some(Duration::from_secs_f64(wait))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connects_go_at_once_until_resets_spend_the_budget_then_follow_the_refill() {
        let start = Instant::now();
        let budget = ResetBudget::new_at(ResetBudgetConfig::default(), start);
        assert_eq!(budget.delay_at(start), None);
        for _ in 0..RESET_BURST as usize - 1 {
            budget.charge_at(start);
        }
        assert_eq!(budget.delay_at(start), None, "one token left");
        budget.charge_at(start);
        let interval = Duration::from_secs_f64(1.0 / RESET_REFILL_PER_SECOND);
        let close = |got: Option<Duration>, want: Duration| {
            let got = got.expect("paced");
            assert!(
                got.abs_diff(want) < Duration::from_micros(1),
                "{got:?} != {want:?}"
            );
        };
        close(budget.delay_at(start), interval);
        // Each paced connect takes a token: the next waits one interval more.
        close(budget.delay_at(start), interval * 2);
        // Time refills the bucket: 3.5 intervals later the budget holds a token again.
        let later = start + interval.mul_f64(3.5);
        assert_eq!(budget.delay_at(later), None);
        // The debt is bounded: many more resets cost at most a full refill.
        for _ in 0..10_000 {
            budget.charge_at(later);
        }
        close(budget.delay_at(later), interval.mul_f64(RESET_BURST + 1.0));
    }
}
