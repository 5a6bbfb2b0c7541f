//! Progress on stderr for the long commands (eval, heads, perplexity, bench, fetch), with `indicatif`.
//!
//! On a terminal a bar (or a spinner) is redrawn in place, and the command's own lines are printed above it. When
//! stderr is not a terminal (a log file, a test capturing it, CI) there is no bar: the command prints plain lines
//! instead, one per update or every few seconds (see [`Progress::is_bar`] and [`Progress::line`]). Quiet prints
//! nothing at all.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    quiet: bool,
}

/// `label` then the bar, then what the caller fills in as `{msg}`.
fn bar_style(label: &str, unit: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{label} {{bar:28.cyan/blue}} {{pos}}/{{len}} {unit}  {{elapsed_precise}} elapsed, ETA {{eta}}  {{wide_msg}}"
    ))
    .expect("a valid template")
    .progress_chars("=> ")
}

fn on_terminal(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

impl Progress {
    /// A bar over `total` steps counted in `unit`, labelled `label` (e.g. `[eval]`).
    pub fn bar(label: &str, total: u64, unit: &str, quiet: bool) -> Self {
        let bar = on_terminal(quiet).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(bar_style(label, unit));
            b
        });
        Progress { bar, quiet }
    }

    /// A spinner for a step of unknown length, showing `msg`.
    pub fn spinner(msg: &str, quiet: bool) -> Self {
        let bar = on_terminal(quiet).then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{spinner} {wide_msg} ({elapsed})")
                    .expect("a valid template"),
            );
            b.set_message(msg.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        let p = Progress { bar, quiet };
        if p.bar.is_none() {
            p.line(msg);
        }
        p
    }

    /// Whether a bar is drawn; when not (and not quiet), the caller prints plain lines with [`Progress::line`].
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    pub fn quiet(&self) -> bool {
        self.quiet
    }

    /// Prints a line on stderr: above the bar on a terminal, plainly otherwise, not at all when quiet.
    pub fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None if !self.quiet => eprintln!("{s}"),
            None => {}
        }
    }

    /// Moves the bar to `pos` with `msg` beside it (on a terminal; nothing otherwise).
    pub fn set(&self, pos: u64, msg: impl Into<String>) {
        if let Some(b) = &self.bar {
            b.set_message(msg.into());
            b.set_position(pos);
        }
    }

    /// Changes the spinner's or bar's message.
    pub fn message(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None => self.line(msg),
        }
    }

    /// Takes the bar or spinner off the screen (its work is done, or failed).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // A bar left behind by an error would be overwritten by the error message.
        self.finish();
    }
}

/// `1m05s`, `2h03m`.
pub fn hms(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_draws_no_bar_and_templates_parse() {
        let p = Progress::bar("[t]", 3, "steps", true);
        assert!(!p.is_bar() && p.quiet());
        p.set(1, "ignored");
        p.line("not printed");
        let q = Progress::spinner("x", true);
        assert!(!q.is_bar() && q.quiet());
        // The templates are built at run time: check they parse.
        let _ = bar_style("[t]", "steps");
        assert_eq!(hms(65.0), "1m05s");
        assert_eq!(hms(7380.0), "2h03m");
    }
}
