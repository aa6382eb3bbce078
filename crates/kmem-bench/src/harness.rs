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

/// A loop whose iterations per sample are calibrated during warm-up to last `sample_time`
/// (the pair cases). `f(n)` runs `n` operations.
pub(crate) struct TimedSampler<F: FnMut(u64)> {
    f: F,
    warmup_time: Duration,
    sample_time: Duration,
    iters: u64,
}

impl<F: FnMut(u64)> TimedSampler<F> {
    pub(crate) fn new(f: F, warmup_time: Duration, sample_time: Duration) -> Self {
        TimedSampler {
            f,
            warmup_time,
            sample_time,
            iters: 0,
        }
    }
}

/// Fewest operations in a timed sample, so that the timer's own cost stays negligible.
const MIN_SAMPLE_OPS: u64 = 64;

impl<F: FnMut(u64)> Sampler for TimedSampler<F> {
    fn warm_up(&mut self) -> u64 {
        // Double the batch until the warm-up time is spent; the last batch gives the rate.
        let start = Instant::now();
        let mut n = 16u64;
        let mut rate;
        loop {
            let t = Instant::now();
            (self.f)(n);
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
        (self.f)(self.iters);
        ns_per_op(t.elapsed(), self.iters)
    }
}

/// A fixed amount of work per sample, the same for every allocator, so each runs the same
/// operation sequence (the churns, the cross-thread free). `f(n)` runs `n` units of
/// `ops_per_unit` operations each.
pub(crate) struct FixedSampler<F: FnMut(u64)> {
    f: F,
    warmup_units: u64,
    units: u64,
    ops_per_unit: u64,
}

impl<F: FnMut(u64)> FixedSampler<F> {
    pub(crate) fn new(f: F, warmup_units: u64, units: u64, ops_per_unit: u64) -> Self {
        FixedSampler {
            f,
            warmup_units,
            units: units.max(1),
            ops_per_unit: ops_per_unit.max(1),
        }
    }
}

impl<F: FnMut(u64)> Sampler for FixedSampler<F> {
    fn warm_up(&mut self) -> u64 {
        (self.f)(self.warmup_units);
        self.units * self.ops_per_unit
    }

    fn sample(&mut self) -> f64 {
        let t = Instant::now();
        (self.f)(self.units);
        ns_per_op(t.elapsed(), self.units * self.ops_per_unit)
    }
}

/// The order-0 pair on a page source: a [`TimedSampler`] over [`pair_loop`].
pub(crate) fn pair_sampler<S: PageSource>(
    mut src: S,
    warmup_time: Duration,
    sample_time: Duration,
) -> TimedSampler<impl FnMut(u64)> {
    TimedSampler::new(move |n| pair_loop(&mut src, n), warmup_time, sample_time)
}

/// The page churn: a [`FixedSampler`] over [`WorkingSet::run`](crate::workload::WorkingSet::run).
pub(crate) fn churn_sampler<S: PageSource>(
    mut churn: Churn<S>,
    warmup_steps: u64,
    steps: u64,
) -> FixedSampler<impl FnMut(u64)> {
    FixedSampler::new(move |n| churn.run(n), warmup_steps, steps, 1)
}
