//! Phase timestamps on stderr when `RESBISECT_TRACE` is set (seconds since the process
//! started): where the wall time of a dump or a bisect goes, on any machine, without a
//! profiler. Off, a mark costs one atomic load. Also notices of a long wait (a kernel
//! compile), which reach the user through a sink the program installs, so the library
//! itself never prints them.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Option<Instant>> = OnceLock::new();
static NOTICE_SINK: OnceLock<fn(&str)> = OnceLock::new();

/// Start the clock; the first call decides whether tracing is on.
pub fn init() {
    START.get_or_init(|| std::env::var_os("RESBISECT_TRACE").map(|_| Instant::now()));
}

/// Print `what()` with the time since [`init`], when tracing is on.
pub fn mark(what: impl FnOnce() -> String) {
    if let Some(Some(start)) = START.get() {
        let thread = std::thread::current();
        eprintln!(
            "[{:8.3} s] {:<10} {}",
            start.elapsed().as_secs_f64(),
            thread.name().unwrap_or("-"),
            what()
        );
    }
}

/// Where [`notice`] sends its lines; the first call decides (the CLI: stderr).
pub fn set_notice_sink(sink: fn(&str)) {
    let _ = NOTICE_SINK.set(sink);
}

/// Tell the user why the next step takes long (one line), where a sink is installed.
pub fn notice(what: impl FnOnce() -> String) {
    if let Some(sink) = NOTICE_SINK.get() {
        sink(&what());
    }
}
