//! Progress display (indicatif, on stderr). Tests and `--json` runs can hide it.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Whether to draw progress bars.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    pub enabled: bool,
}

impl Ui {
    pub fn hidden() -> Ui {
        Ui { enabled: false }
    }

    /// A bar counting `len` items (connections being opened).
    pub fn counter(&self, len: u64, what: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:40}] {pos}/{len} {per_sec} {msg} ({elapsed})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// A bar over `secs` seconds of a timed phase; the message shows live rates.
    pub fn timer(&self, secs: u64, what: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(secs.max(1));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos}/{len}s {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        bar
    }

    /// A spinner for a phase of unknown length (draining, settling).
    pub fn spinner(&self, what: &str) -> ProgressBar {
        if !self.enabled {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} {spinner} {msg} ({elapsed})")
                .expect("valid template"),
        );
        bar.set_prefix(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}

/// `1234567.0` → `"1.23M"`: short numbers for live messages and tables.
pub fn si(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Bytes as KiB/MiB.
pub fn bytes(b: f64) -> String {
    let a = b.abs();
    if a >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / 1024.0 / 1024.0)
    } else if a >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}
