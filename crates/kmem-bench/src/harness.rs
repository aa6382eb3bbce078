//! The timing harness: warm-up and calibration, timed samples, medians.

use std::time::{Duration, Instant};

use crate::source::PageSource;
use crate::workload::{Churn, pair_loop};

/// The median of `xs` (the mean of the two middle values for an even count); NaN when empty.
/// NaNs sort last.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Nanoseconds per operation of `ops` operations that took `d`.
pub fn ns_per_op(d: Duration, ops: u64) -> f64 {
    d.as_nanos() as f64 / ops.max(1) as f64
}

/// One allocator in one case: warmed up once, then sampled once per round.
pub(crate) trait Sampler {
    /// Warms up (and calibrates, where the case does); returns the operations per sample.
    fn warm_up(&mut self) -> u64;
    /// Runs one timed sample; returns ns per operation.
    fn sample(&mut self) -> f64;
}

/// The order-0 pair: iterations per sample calibrated during warm-up to last `sample_time`.
pub(crate) struct PairSampler<S: PageSource> {
    src: S,
    warmup_time: Duration,
    sample_time: Duration,
    iters: u64,
}

impl<S: PageSource> PairSampler<S> {
    pub(crate) fn new(src: S, warmup_time: Duration, sample_time: Duration) -> Self {
        PairSampler {
            src,
            warmup_time,
            sample_time,
            iters: 0,
        }
    }
}

/// Fewest operations in a timed sample, so that the timer's own cost stays negligible.
const MIN_SAMPLE_OPS: u64 = 64;

impl<S: PageSource> Sampler for PairSampler<S> {
    fn warm_up(&mut self) -> u64 {
        // Double the batch until the warm-up time is spent; the last batch gives the rate.
        let start = Instant::now();
        let mut n = 16u64;
        let mut rate;
        loop {
            let t = Instant::now();
            pair_loop(&mut self.src, n);
            rate = ns_per_op(t.elapsed(), n);
            if start.elapsed() >= self.warmup_time || n >= 1 << 30 {
                break;
            }
            n *= 2;
        }
        let want = self.sample_time.as_nanos() as f64 / rate.max(0.01);
        self.iters = (want as u64).clamp(MIN_SAMPLE_OPS, 1 << 32);
        self.iters
    }

    fn sample(&mut self) -> f64 {
        let t = Instant::now();
        pair_loop(&mut self.src, self.iters);
        ns_per_op(t.elapsed(), self.iters)
    }
}

/// The churn: a fixed number of steps per sample, the same for every allocator, so each runs
/// the same operation sequence.
pub(crate) struct ChurnSampler<S: PageSource> {
    churn: Churn<S>,
    warmup_steps: u64,
    steps: u64,
}

impl<S: PageSource> ChurnSampler<S> {
    pub(crate) fn new(churn: Churn<S>, warmup_steps: u64, steps: u64) -> Self {
        ChurnSampler {
            churn,
            warmup_steps,
            steps: steps.max(1),
        }
    }
}

impl<S: PageSource> Sampler for ChurnSampler<S> {
    fn warm_up(&mut self) -> u64 {
        self.churn.run(self.warmup_steps);
        self.steps
    }

    fn sample(&mut self) -> f64 {
        let t = Instant::now();
        self.churn.run(self.steps);
        ns_per_op(t.elapsed(), self.steps)
    }
}
