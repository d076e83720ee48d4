//! The kernels for one GPU: kernels/ops.hip (with compat.h) compiled by NVRTC for its
//! architecture and storage dtype, cached on disk by source and architecture, since a
//! compile takes seconds and the source rarely changes.

use std::path::PathBuf;

use cudarc::nvrtc::Ptx;
use sha2::{Digest, Sha256};

use super::quiet::quietly;
use crate::error::{Error, Result};
use crate::runtime::backend::StorageDType;
use crate::runtime::gpu::kernels::{storage_define, KERNEL_COMPAT, KERNEL_SOURCE};

/// The one translation unit NVRTC compiles: the storage define, compat.h, ops.hip.
fn nvrtc_source(dtype: StorageDType) -> String {
    let ops: String = KERNEL_SOURCE
        .lines()
        .filter(|l| !l.starts_with("#include \"compat.h\""))
        .map(|l| format!("{l}\n"))
        .collect();
    format!("#define {}\n{KERNEL_COMPAT}\n{ops}", storage_define(dtype))
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    base.unwrap_or_else(std::env::temp_dir)
        .join("resbisect")
        .join("kernels")
}

/// The cache file of a source compiled for `arch`.
fn cached_path(source: &str, arch: &str) -> PathBuf {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update(arch.as_bytes());
    let key: String = h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect();
    cache_dir().join(format!("ops-{arch}-{key}.ptx"))
}

/// The PTX of the kernels for `arch` (`sm_90`) storing `dtype`: from the cache, or
/// compiled now and cached.
pub(super) fn kernels_ptx(arch: &str, dtype: StorageDType) -> Result<Ptx> {
    let source = nvrtc_source(dtype);
    let cached = cached_path(&source, arch);
    if let Ok(text) = std::fs::read_to_string(&cached) {
        return Ok(Ptx::from_src(text));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "-std=c++17".into()],
        ..Default::default()
    };
    crate::trace::notice(|| {
        format!(
            "cuda: compiling the kernels for {arch} ({}) with NVRTC, once per machine and source \
             (about two minutes); later runs load them from {}",
            dtype.name(),
            cache_dir().display()
        )
    });
    let ptx = quietly(|| cudarc::nvrtc::compile_ptx_with_opts(&source, opts))
        .ok_or_else(|| Error::input("--backend cuda: NVRTC (libnvrtc) could not be loaded"))?
        .map_err(|e| Error::engine(format!("cuda: compiling kernels/ops.hip with NVRTC for {arch}: {e}")))?;
    // The cache is an optimisation: a failure to write it only costs the next compile.
    if std::fs::create_dir_all(cache_dir()).is_ok() {
        let tmp = cached.with_extension(format!("tmp-{}", std::process::id()));
        if std::fs::write(&tmp, ptx.to_src()).is_ok() {
            let _ = std::fs::rename(&tmp, &cached);
        }
    }
    Ok(ptx)
}
