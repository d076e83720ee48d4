//! Probing CUDA's dynamically loaded libraries without noise: cudarc panics where a
//! library is missing, and a missing GPU must be one clear line, not a panic message.

thread_local! {
    /// Set while this thread runs [`quietly`]: its panics are not printed.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f`, turning a panic of a dynamic library loader into `None` without printing it.
/// Per thread: engines start their backends at the same time, and a process-wide swap of
/// the panic hook would race.
pub(super) fn quietly<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> Option<R> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let printing = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|quiet| quiet.get()) {
                printing(info);
            }
        }));
    });
    QUIET.with(|quiet| quiet.set(true));
    let r = std::panic::catch_unwind(f).ok();
    QUIET.with(|quiet| quiet.set(false));
    r
}
