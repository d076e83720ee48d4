//! `resbisect selftest`: every op of a backend checked against the `cpu` backend, or
//! (`--perf`) timed at a model's shapes.

use std::process::ExitCode;

use resbisect::engine::{on_backend, OnBackend};
use resbisect::model::Config;
use resbisect::runtime::backend::{Backend, StorageDType};
use resbisect::runtime::perf::{self, OpTiming};
use resbisect::runtime::selftest::{self, OpCheck};
use resbisect::{Error, Result};

use super::args::SelftestArgs;

pub fn selftest(a: SelftestArgs) -> Result<ExitCode> {
    if a.perf {
        return perf(&a);
    }
    let (seed, long) = (a.seed, a.long);
    let dtype = super::specs::named("--dtype", StorageDType::parse(&a.dtype))?;
    let (checks, device) = on_backend(a.backend, dtype, Checks { seed, long })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&checks).map_err(|e| Error::input(e.to_string()))?
        );
    } else {
        println!(
            "selftest of {device}, {} storage, against the cpu backend (seed {seed})",
            dtype.name()
        );
        println!(
            "{:<16} {:<44} {:>10} {:>10} {:>10} {:>6} {:>9}  result",
            "op", "shape", "nmse", "threshold", "max_abs", "guard", "ms"
        );
        for c in &checks {
            println!(
                "{:<16} {:<44} {:>10.2e} {:>10.0e} {:>10.2e} {:>6} {:>9.3}  {}",
                c.op,
                c.shape,
                c.nmse,
                c.threshold,
                c.max_abs,
                if c.guard_ok { "ok" } else { "HIT" },
                c.seconds * 1e3,
                if c.passed { "pass" } else { "FAIL" }
            );
        }
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    eprintln!("{} checks, {failed} failed", checks.len());
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The op checks, and the device they ran on.
struct Checks {
    seed: u64,
    long: bool,
}

impl OnBackend for Checks {
    type Output = (Vec<OpCheck>, String);

    fn run<B: Backend + 'static>(self, b: B) -> Result<Self::Output> {
        Ok((selftest::run(&b, self.seed, self.long)?, b.device()))
    }
}

/// The op timings, and the device they ran on.
struct Perf<'a> {
    config: &'a Config,
    ctx: usize,
}

impl OnBackend for Perf<'_> {
    type Output = (Vec<OpTiming>, String);

    fn run<B: Backend + 'static>(self, b: B) -> Result<Self::Output> {
        Ok((perf::run(&b, self.config, self.ctx)?, b.device()))
    }
}

/// `selftest --perf`: time each op at a preset's decode and prefill shapes.
fn perf(a: &SelftestArgs) -> Result<ExitCode> {
    let (preset, ctx, json) = (a.preset.as_str(), a.ctx, a.json);
    let dtype = super::specs::named("--dtype", StorageDType::parse(&a.dtype))?;
    let config = resbisect::synth::preset(preset)?.config;
    if ctx == 0 || ctx >= config.n_ctx.max(8192) {
        return Err(Error::input(format!("--ctx must be 1..{}", config.n_ctx.max(8192))));
    }
    let (timings, device) = on_backend(a.backend, dtype, Perf { config: &config, ctx })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&timings).map_err(|e| Error::input(e.to_string()))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "op timings of {device}, {} storage, {preset} shapes, context {ctx}",
        dtype.name()
    );
    println!(
        "{:<8} {:<22} {:<34} {:>10} {:>12} {:>8}",
        "phase", "op", "shape", "us", "bytes", "GB/s"
    );
    for t in &timings {
        println!(
            "{:<8} {:<22} {:<34} {:>10.2} {:>12} {:>8.1}",
            t.phase,
            t.op,
            t.shape,
            t.micros,
            t.bytes,
            t.gb_per_s()
        );
    }
    let decode = timings.iter().filter(|t| t.phase == "decode");
    let (layer_us, layer_bytes) = decode.clone().fold((0.0, 0), |(us, by), t| {
        (us + t.micros * t.per_layer as f64, by + t.bytes * t.per_layer)
    });
    let outside_us: f64 = decode.filter(|t| t.per_layer == 0).map(|t| t.micros).sum();
    let step_us = layer_us * config.n_layer as f64 + outside_us;
    println!(
        "decode layer {layer_us:.1} us ({:.1} GB/s over {layer_bytes} bytes); step of {} layers and the head {step_us:.0} us = {:.0} tokens/s",
        layer_bytes as f64 / (layer_us * 1e3),
        config.n_layer,
        1e6 / step_us
    );
    Ok(ExitCode::SUCCESS)
}
