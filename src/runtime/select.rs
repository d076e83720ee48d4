//! Backend selection: [`BackendKind`] and `with_backend!`, the one place a backend kind
//! and a storage dtype become a concrete backend type.

/// Which backend runs the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Cpu,
    /// NVIDIA GPU 0 (CUDA, NVRTC and cuBLAS loaded at run time).
    Cuda,
    /// AMD GPU 0 (builds with `--features hip`).
    Hip,
}

/// Evaluate `$body` with `$b` bound to a new backend of `$kind` storing `$dtype`
/// (monomorphized per backend and storage type).
#[macro_export]
macro_rules! with_backend {
    ($kind:expr, $dtype:expr, |$b:ident| $body:expr) => {{
        use $crate::runtime::backend::StorageDType as __D;
        use $crate::runtime::BackendKind as __K;
        match ($kind, $dtype) {
            (__K::Cpu, d) => {
                let $b = $crate::runtime::cpu::CpuBackend::new(d);
                $body
            }
            (__K::Cuda, __D::F32) => {
                let $b = $crate::runtime::cuda::CudaBackend::<f32>::new(0)?;
                $body
            }
            (__K::Cuda, __D::F16) => {
                let $b = $crate::runtime::cuda::CudaBackend::<half::f16>::new(0)?;
                $body
            }
            (__K::Cuda, __D::BF16) => {
                let $b = $crate::runtime::cuda::CudaBackend::<half::bf16>::new(0)?;
                $body
            }
            #[cfg(feature = "hip")]
            (__K::Hip, __D::F32) => {
                let $b = $crate::runtime::hip::HipBackend::<f32>::new()?;
                $body
            }
            #[cfg(feature = "hip")]
            (__K::Hip, __D::F16) => {
                let $b = $crate::runtime::hip::HipBackend::<half::f16>::new()?;
                $body
            }
            #[cfg(feature = "hip")]
            (__K::Hip, __D::BF16) => {
                let $b = $crate::runtime::hip::HipBackend::<half::bf16>::new()?;
                $body
            }
            #[cfg(not(feature = "hip"))]
            (__K::Hip, _) => {
                return Err($crate::Error::input(
                    "--backend hip: this resbisect was built without the hip feature (cargo build --features hip)",
                ))
            }
        }
    }};
}
