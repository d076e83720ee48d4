// compat.h — the few things the runtime's kernels (ops.hip, HIP dialect) need that differ
// between AMD (hipcc, wave64 on CDNA) and NVIDIA (NVRTC): warp width, shuffles, launch
// bounds, half conversions. One storage type per build: RB_STORE_F32, RB_STORE_F16 or
// RB_STORE_BF16.
#pragma once

#if defined(__HIPCC__)
#include <hip/hip_runtime.h>
#define RB_WARP 64
#define RB_SHFL_XOR(v, m) __shfl_xor((v), (m))
// At most `threads` per block; hipcc's second bound counts waves per SIMD, not blocks.
#define RB_LAUNCH_BOUNDS(threads, blocks) __launch_bounds__(threads)
__device__ __forceinline__ float rb_half_to_float(unsigned short h) {
    _Float16 v;
    __builtin_memcpy(&v, &h, 2);
    return (float)v;
}
__device__ __forceinline__ unsigned short rb_float_to_half(float f) {
    _Float16 v = (_Float16)f;
    unsigned short h;
    __builtin_memcpy(&h, &v, 2);
    return h;
}
#else  // NVRTC / nvcc
#define RB_WARP 32
#define RB_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
// At most `threads` per block, registers bounded so that `blocks` fit on one SM.
#define RB_LAUNCH_BOUNDS(threads, blocks) __launch_bounds__(threads, blocks)
__device__ __forceinline__ float rb_half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short rb_float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// Programmatic dependent launch (sm_90 and later; nothing elsewhere). The `cuda` driver
// launches every kernel so that it may start before the launch ahead of it has finished.
// RB_WAIT_PRIOR() returns once every earlier launch has finished and its writes are
// visible, and from then on lets the launch after this one start. Every kernel calls it
// before it touches memory; the decode matvecs first put loads of their weights in
// flight, so a kernel that writes weights (a dequantized matrix) calls
// RB_WAIT_PRIOR_NEXT_AT_END() instead: the launch after it starts only once it has ended.
// kernels.rs checks both rules.
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define RB_WAIT_PRIOR() asm volatile("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;" ::: "memory")
#define RB_WAIT_PRIOR_NEXT_AT_END() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define RB_WAIT_PRIOR() ((void)0)
#define RB_WAIT_PRIOR_NEXT_AT_END() ((void)0)
#endif

// bfloat16: the top half of an f32, rounded to nearest even (NaN kept quiet).
__device__ __forceinline__ float rb_bf16_to_float(unsigned short b) { return __uint_as_float(((unsigned int)b) << 16); }
__device__ __forceinline__ unsigned short rb_float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(RB_STORE_F32)
typedef float store_t;
#define LD(x) (x)
#define ST(f) (f)
#elif defined(RB_STORE_F16)
typedef unsigned short store_t;
#define LD(x) rb_half_to_float(x)
#define ST(f) rb_float_to_half(f)
#elif defined(RB_STORE_BF16)
typedef unsigned short store_t;
#define LD(x) rb_bf16_to_float(x)
#define ST(f) rb_float_to_bf16(f)
#else
#error "define one of RB_STORE_F32, RB_STORE_F16, RB_STORE_BF16"
#endif
