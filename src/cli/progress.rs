//! Progress bars on stderr for the library's long steps.

use indicatif::{ProgressBar, ProgressStyle};

use resbisect::engine::Progress;

/// indicatif bars on stderr; indicatif draws nothing when stderr is not a terminal.
#[derive(Default)]
pub struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn stage(&mut self, label: &str, total: usize) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        // Each stage is a phase: RESBISECT_TRACE=1 shows where a dump's time goes.
        resbisect::trace::mark(|| format!("stage: {label}"));
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} layers {elapsed}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        self.bar = Some(bar);
    }

    fn tick(&mut self) {
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
