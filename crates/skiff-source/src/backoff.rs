use std::fmt::Display;
use std::time::{Duration, Instant};

/// Exponential backoff within a window, restarted whenever work progresses:
/// how every network source retries a failure that may pass by itself.
pub struct Backoff {
    window: Duration,
    deadline: Instant,
    delay: Duration,
}

impl Backoff {
    pub const FIRST_DELAY: Duration = Duration::from_millis(200);
    pub const MAX_DELAY: Duration = Duration::from_secs(5);

    pub fn new(window: Duration) -> Self {
        Backoff {
            window,
            deadline: Instant::now() + window,
            delay: Self::FIRST_DELAY,
        }
    }

    /// After a failure: waits and says to try again, or says to give up
    /// (the failure is not `transient`, or the window is spent).
    pub fn retry(&mut self, transient: bool, error: &dyn Display) -> bool {
        if !transient || Instant::now() + self.delay >= self.deadline {
            return false;
        }
        tracing::warn!("{error}; retrying in {:?}", self.delay);
        std::thread::sleep(self.delay);
        self.delay = (self.delay * 2).min(Self::MAX_DELAY);
        true
    }

    /// Time left before giving up, so one attempt cannot outlast the window.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    pub fn progressed(&mut self) {
        self.deadline = Instant::now() + self.window;
        self.delay = Self::FIRST_DELAY;
    }
}
