//! Progress bars for the demo's longer steps: drawn on standard error, only when it is a
//! terminal, and only once a step has run for a second (a quick run shows none).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long a step runs before its bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// What a bar counts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Unit {
    /// Bytes (shown as KiB, MiB...).
    Bytes,
    /// Items (requests, pages...).
    Items,
}

/// A progress bar that may be updated from several threads; cleared when dropped.
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    /// The bar may be drawn (standard error is a terminal).
    armed: bool,
    shown: AtomicBool,
}

impl Progress {
    /// A bar that is never drawn (`kmem proc`, or standard error not a terminal).
    pub fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            start: Instant::now(),
            armed: false,
            shown: AtomicBool::new(false),
        }
    }

    /// A bar of `total` units, drawn on standard error once the step has run for a second.
    pub fn on_stderr(what: &str, total: u64, unit: Unit) -> Progress {
        let template = match unit {
            Unit::Bytes => "{msg:>10} [{wide_bar}] {bytes}/{total_bytes}",
            Unit::Items => "{msg:>10} [{wide_bar}] {pos}/{len}",
        };
        let style = ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
            .with_style(style)
            .with_message(what.to_string());
        Progress {
            bar,
            start: Instant::now(),
            armed: true,
            shown: AtomicBool::new(false),
        }
    }

    /// Counts `n` more units done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
        if self.armed
            && !self.shown.load(Relaxed)
            && self.start.elapsed() >= SHOW_AFTER
            && !self.shown.swap(true, Relaxed)
        {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
