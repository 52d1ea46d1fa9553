//! A progress line on stderr for long work: redrawn in place on a terminal, one line
//! per tenth of the work otherwise (logs stay readable).

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    start: Instant,
    tty: bool,
    last_tenth: usize,
    enabled: bool,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: usize) -> Progress {
        Progress {
            label: label.into(),
            total: total.max(1),
            done: 0,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            last_tenth: 0,
            enabled: true,
        }
    }

    /// A progress that prints nothing (tests, `--quiet`).
    pub fn hidden() -> Progress {
        Progress { enabled: false, ..Progress::new("", 1) }
    }

    pub fn set_label(&mut self, label: impl Into<String>) {
        self.label = label.into();
    }

    pub fn advance(&mut self, n: usize) {
        self.done = (self.done + n).min(self.total);
        if !self.enabled {
            return;
        }
        let frac = self.done as f64 / self.total as f64;
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if frac > 0.0 { elapsed / frac - elapsed } else { 0.0 };
        if self.tty {
            let width = 30;
            let filled = (frac * width as f64) as usize;
            eprint!(
                "\r{} [{}{}] {}/{} {:.0}s left   ",
                self.label,
                "=".repeat(filled),
                " ".repeat(width - filled),
                self.done,
                self.total,
                eta
            );
            let _ = std::io::stderr().flush();
        } else {
            let tenth = (frac * 10.0) as usize;
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                eprintln!("{}: {}% ({}/{}), {:.0}s elapsed", self.label, tenth * 10, self.done, self.total, elapsed);
            }
        }
    }

    /// A line of its own (an intermediate result) on stderr, below the progress line.
    pub fn note(&mut self, line: &str) {
        if !self.enabled {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{line}");
    }

    pub fn finish(&mut self) {
        if self.enabled && self.tty {
            eprintln!();
        }
    }
}
