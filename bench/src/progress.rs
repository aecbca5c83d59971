//! The live progress line: which run of how many, and how far the current workload is (bytes, requests,
//! flows). Workloads bump lock-free counters; a ticker on the main runtime prints them, overwriting one
//! line on a terminal and every 10 s otherwise (a log file then shows the run is alive, not a flood).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shared progress of the run under way.
#[derive(Clone, Default)]
pub struct Progress(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// "[run 7/75] bulk sockmap", set by the runner.
    run: Mutex<String>,
    /// What the workload is doing now ("opening flows", "holding"), set by the workload.
    phase: Mutex<&'static str>,
    done: AtomicU64,
    total: AtomicU64,
    unit: Mutex<Unit>,
    started: Mutex<Option<Instant>>,
}

/// How `done` / `total` are shown.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub enum Unit {
    #[default]
    Count,
    Bytes,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Progress {
    /// A new run starts: its label, and the counters reset.
    pub fn start_run(&self, label: String) {
        *lock(&self.0.run) = label;
        self.phase("starting", 0, Unit::Count);
        *lock(&self.0.started) = Some(Instant::now());
    }

    /// The workload enters a phase with `total` steps (0: open-ended) counted in `unit`.
    pub fn phase(&self, phase: &'static str, total: u64, unit: Unit) {
        *lock(&self.0.phase) = phase;
        *lock(&self.0.unit) = unit;
        self.0.done.store(0, Ordering::Relaxed);
        self.0.total.store(total, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.done.fetch_add(n, Ordering::Relaxed);
    }

    /// The current line, e.g. `[run 7/75] bulk sockmap: transfer 120.0 of 256.0 MiB (4 s)`.
    pub fn line(&self) -> String {
        let run = lock(&self.0.run).clone();
        let phase = *lock(&self.0.phase);
        let unit = *lock(&self.0.unit);
        let (done, total) = (
            self.0.done.load(Ordering::Relaxed),
            self.0.total.load(Ordering::Relaxed),
        );
        let secs = lock(&self.0.started).map_or(0.0, |t| t.elapsed().as_secs_f64());
        let amount = match (unit, total) {
            (Unit::Count, 0) => format!(" {done}"),
            (Unit::Count, t) => format!(" {done} of {t}"),
            (Unit::Bytes, 0) => format!(" {:.1} MiB", done as f64 / 1048576.0),
            (Unit::Bytes, t) => format!(
                " {:.1} of {:.1} MiB",
                done as f64 / 1048576.0,
                t as f64 / 1048576.0
            ),
        };
        let amount = if done == 0 && total == 0 {
            String::new()
        } else {
            amount
        };
        format!("{run}: {phase}{amount} ({secs:.0} s)")
    }

    /// Prints the line until `stop` fires: every 0.5 s in place on a terminal, every 10 s otherwise.
    pub async fn ticker(self, mut stop: tokio::sync::oneshot::Receiver<()>) {
        let tty = std::io::stderr().is_terminal();
        let every = Duration::from_millis(if tty { 500 } else { 10_000 });
        loop {
            tokio::select! {
                _ = &mut stop => break,
                () = tokio::time::sleep(every) => {}
            }
            let line = self.line();
            let mut err = std::io::stderr().lock();
            if tty {
                // \x1b[2K clears the line, so a shorter line leaves no tail of the longer one.
                let _ = write!(err, "\r\x1b[2K{line}");
            } else {
                let _ = writeln!(err, "  ... {line}");
            }
            let _ = err.flush();
        }
        if tty {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }

    /// Clears the in-place line before a normal line is printed (no-op off a terminal).
    pub fn clear_line() {
        if std::io::stderr().is_terminal() {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_run_phase_and_amount() {
        let p = Progress::default();
        p.start_run("[run 3/10] bulk sockmap".into());
        p.phase("transfer", 256 << 20, Unit::Bytes);
        p.add(128 << 20);
        let l = p.line();
        assert!(
            l.starts_with("[run 3/10] bulk sockmap: transfer 128.0 of 256.0 MiB ("),
            "{l}"
        );
        p.phase("opening flows", 2000, Unit::Count);
        p.add(5);
        assert!(p.line().contains("opening flows 5 of 2000"), "{}", p.line());
        p.phase("holding", 0, Unit::Count);
        assert!(p.line().contains("holding ("), "{}", p.line());
    }
}
