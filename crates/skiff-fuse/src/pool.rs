//! Threads that wait: a read that misses is handed to one, which blocks on
//! the network until its chunks land. A work-stealing pool (rayon) spins
//! its idle threads with `sched_yield` before they sleep, so every miss
//! paid for busy threads on both cores; these sleep on a channel.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crossbeam_channel::{unbounded, Sender};

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct WaitPool {
    jobs: Sender<Job>,
}

impl WaitPool {
    /// `threads` threads named `NAME-N`, each taking one job at a time.
    pub(crate) fn new(threads: usize, name: &str) -> io::Result<WaitPool> {
        let (jobs, queue) = unbounded::<Job>();
        for n in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{n}"))
                .spawn(move || {
                    // Ends when the pool is dropped and the queue drained.
                    for job in queue {
                        // A job that panics takes only itself down, not the thread.
                        if catch_unwind(AssertUnwindSafe(job)).is_err() {
                            tracing::error!("a background fetch panicked");
                        }
                    }
                })?;
        }
        Ok(WaitPool { jobs })
    }

    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        // The threads only stop once this sender is gone.
        let _ = self.jobs.send(Box::new(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn jobs_run_in_parallel_and_a_panic_costs_only_its_job() {
        let pool = WaitPool::new(4, "test").unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        pool.spawn(|| panic!("one bad job"));
        let started = Instant::now();
        for _ in 0..8 {
            let done = done.clone();
            pool.spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        while done.load(Ordering::SeqCst) < 8 {
            assert!(started.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        // Eight 100 ms waits on four threads: about 200 ms, not 800.
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "{:?}",
            started.elapsed()
        );
    }
}
