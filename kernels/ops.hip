// ops.hip — every op of the runtime's Backend trait as GPU kernels, written once in HIP
// dialect. NVRTC compiles it for the `cuda` backend, hipcc for the `hip` backend; the
// differences live in compat.h. Values are stored as store_t (f32, f16 or bf16, one per
// build) and every op computes in f32, rounding once when it stores.
#include "compat.h"

#define RB_NEG_INF (-__int_as_float(0x7f800000))

// ---------------------------------------------------------------- elementwise and rows

extern "C" __global__ void rb_embed(const store_t* table, const unsigned int* ids, store_t* out, int width, int rows) {
    RB_WAIT_PRIOR();
    int r = blockIdx.x;
    if (r >= rows) return;
    const store_t* src = table + (long)ids[r] * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[(long)r * width + c] = src[c];
}

extern "C" __global__ void rb_add(const store_t* a, const store_t* b, store_t* out, long n) {
    RB_WAIT_PRIOR();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ST(LD(a[i]) + LD(b[i]));
}

extern "C" __global__ void rb_silu_mul(const store_t* gate, const store_t* up, store_t* out, long n) {
    RB_WAIT_PRIOR();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = LD(gate[i]);
        out[i] = ST(g / (1.0f + expf(-g)) * LD(up[i]));
    }
}

// GELU (tanh approximation) of the gate times up: 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))).
extern "C" __global__ void rb_gelu_tanh_mul(const store_t* gate, const store_t* up, store_t* out, long n) {
    RB_WAIT_PRIOR();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = LD(gate[i]);
        out[i] = ST(0.5f * g * (1.0f + tanhf(0.7978846f * (g + 0.044715f * g * g * g))) * LD(up[i]));
    }
}

// x[r, c] += bias[c] over n values of rows of `width`.
extern "C" __global__ void rb_add_bias(store_t* x, const store_t* bias, long n, long width) {
    RB_WAIT_PRIOR();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = ST(LD(x[i]) + LD(bias[i % width]));
}

// With `dyn_row`, dst moves by that many rows of `width`, read on the device (the decode
// step record), so a recorded step writes where the step it replays says.
extern "C" __global__ void rb_copy(const store_t* src, store_t* dst, long n, const int* dyn_row, long width) {
    RB_WAIT_PRIOR();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (dyn_row) dst += (long)(*dyn_row) * width;
    if (i < n) dst[i] = src[i];
}

// Fault injection: kind 0 scale, 1 offset, 2 NaN, 3 zero, on rows from_row.. of x.
extern "C" __global__ void rb_perturb(store_t* x, long start, long n, int kind, float value) {
    RB_WAIT_PRIOR();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = LD(x[start + i]);
    float r = kind == 0 ? v * value : kind == 1 ? v + value : kind == 2 ? __int_as_float(0x7fc00000) : 0.0f;
    x[start + i] = ST(r);
}

// Decode matmuls (rows ≤ RB_GEMV_ROWS): one warp per output column streams its weight row
// with 16-byte loads, so reading the weights once at full bandwidth is the whole cost
// (a GEMM tiling leaves most of the GPU idle at one row).
#define RB_GEMV_ROWS 4

// Each lane first issues the loads of RB_GEMV_CHUNK 16-byte pieces of its weight row,
// then multiplies, so enough bytes are in flight to stream at full bandwidth.
#define RB_GEMV_CHUNK 8

// Sum over the block; every thread gets the total. `scratch` holds one float per warp.
__device__ float rb_block_sum(float v, float* scratch) {
    for (int m = RB_WARP / 2; m > 0; m /= 2) v += RB_SHFL_XOR(v, m);
    int warp = threadIdx.x / RB_WARP, lane = threadIdx.x % RB_WARP, warps = blockDim.x / RB_WARP;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < warps; w++) total += scratch[w];
    __syncthreads();
    return total;
}

// The residual sum and RMSNorm a decode matvec computes on its way in (`a` null: none):
// sum = a + b, x = rms_norm(sum) · w, eps inside the root.
struct RbAddNorm {
    const store_t *a, *b, *w;
    store_t* sum;
    float eps;
};

// The matvec input row, once the launch ahead has finished: `x` itself, or with a norm,
// the normed row in the block's dynamic shared memory (k values, k a multiple of 16 bytes'
// worth, given by the launch), block 0 also storing sum and x. Each value rounds as in
// rb_add_rms_norm; Σ sum² adds up in this block's order, not the norm kernel's. Every
// thread of the block calls it.
extern __shared__ uint4 rb_dynamic_shared[];
__device__ const store_t* rb_matvec_input(const store_t* x, const RbAddNorm& norm, int k) {
    RB_WAIT_PRIOR();
    if (!norm.a) return x;
    __shared__ float scratch[32];
    store_t* xs = (store_t*)rb_dynamic_shared;
    const int V = 16 / (int)sizeof(store_t);
    const bool first = blockIdx.x == 0;
    float ss = 0.0f;
    #pragma unroll 4
    for (int c = threadIdx.x * V; c < k; c += blockDim.x * V) {
        store_t av[V], bv[V], s[V];
        *(uint4*)av = *(const uint4*)(norm.a + c);
        *(uint4*)bv = *(const uint4*)(norm.b + c);
        #pragma unroll
        for (int i = 0; i < V; i++) {
            s[i] = ST(LD(av[i]) + LD(bv[i]));
            const float v = LD(s[i]);
            ss += v * v;
        }
        *(uint4*)(xs + c) = *(uint4*)s;
        if (first) *(uint4*)(norm.sum + c) = *(uint4*)s;
    }
    const float scale = 1.0f / sqrtf(rb_block_sum(ss, scratch) / k + norm.eps);
    #pragma unroll 4
    for (int c = threadIdx.x * V; c < k; c += blockDim.x * V) {
        store_t wv[V], s[V];
        *(uint4*)wv = *(const uint4*)(norm.w + c);
        *(uint4*)s = *(const uint4*)(xs + c);
        #pragma unroll
        for (int i = 0; i < V; i++) s[i] = ST(LD(s[i]) * scale * LD(wv[i]));
        *(uint4*)(xs + c) = *(uint4*)s;
        if (first) *(uint4*)((store_t*)x + c) = *(uint4*)s;
    }
    __syncthreads();
    return xs;
}

// Dot products of weight row `wr` with rows 0..rows of the input, summed over the warp:
// every lane gets acc[r]. The first weights are in flight before the input (which the
// launch ahead writes) is read; a warp without a column (`active` false) only takes part
// in the input's computation.
__device__ __forceinline__ void rb_warp_dots(const store_t* x, const RbAddNorm& norm, const store_t* wr, bool active, int rows, int k,
                                             float* acc) {
    const int lane = threadIdx.x % RB_WARP;
    #pragma unroll
    for (int r = 0; r < RB_GEMV_ROWS; r++) acc[r] = 0.0f;
    const int V = 16 / sizeof(store_t);
    const int step = RB_WARP * V;
    const bool wide = k % V == 0;
    int c0 = lane * V;
    uint4 wv[RB_GEMV_CHUNK];
    #pragma unroll
    for (int u = 0; u < RB_GEMV_CHUNK; u++)
        if (wide && active && c0 + u * step < k) wv[u] = *(const uint4*)(wr + c0 + u * step);
    x = rb_matvec_input(x, norm, k);
    if (!active) return;
    if (wide) {
        while (c0 < k) {
            #pragma unroll
            for (int u = 0; u < RB_GEMV_CHUNK; u++) {
                const int c = c0 + u * step;
                if (c >= k) break;
                store_t w[V];
                *(uint4*)w = wv[u];
                #pragma unroll
                for (int r = 0; r < RB_GEMV_ROWS; r++) {
                    if (r < rows) {
                        store_t xv[V];
                        *(uint4*)xv = *(const uint4*)(x + (long)r * k + c);
                        #pragma unroll
                        for (int i = 0; i < V; i++) acc[r] += LD(w[i]) * LD(xv[i]);
                    }
                }
            }
            c0 += step * RB_GEMV_CHUNK;
            #pragma unroll
            for (int u = 0; u < RB_GEMV_CHUNK; u++)
                if (c0 + u * step < k) wv[u] = *(const uint4*)(wr + c0 + u * step);
        }
    } else {
        for (int c = lane; c < k; c += RB_WARP) {
            float wv = LD(wr[c]);
            #pragma unroll
            for (int r = 0; r < RB_GEMV_ROWS; r++)
                if (r < rows) acc[r] += wv * LD(x[(long)r * k + c]);
        }
    }
    #pragma unroll
    for (int r = 0; r < RB_GEMV_ROWS; r++)
        for (int o = RB_WARP / 2; o > 0; o /= 2) acc[r] += RB_SHFL_XOR(acc[r], o);
}

// The output column this warp computes.
__device__ __forceinline__ int rb_warp_column() { return blockIdx.x * (blockDim.x / RB_WARP) + threadIdx.x / RB_WARP; }

extern "C" __global__ void rb_gemv(const store_t* x, const store_t* w, store_t* out, int rows, int k, int n) {
    const int j = rb_warp_column();
    float acc[RB_GEMV_ROWS];
    rb_warp_dots(x, RbAddNorm{}, w + (long)min(j, n - 1) * k, j < n, rows, k, acc);
    if (j < n && threadIdx.x % RB_WARP == 0)
        for (int r = 0; r < rows; r++) out[(long)r * n + j] = ST(acc[r]);
}

// Which of three column ranges (n0, n1, then the rest) column *j falls in; *j becomes its
// column within that part.
__device__ __forceinline__ int rb_part(int* j, int n0, int n1) {
    if (*j < n0) return 0;
    *j -= n0;
    if (*j < n1) return 1;
    *j -= n1;
    return 2;
}

// Three projections of the same input in one launch (q, k and v): columns 0..n0 of w0,
// then n1 of w1, then n2 of w2. With a norm (na not null, one row, k values of dynamic
// shared memory), the input is rms_norm(na + nb) · nw, stored into x and the sum into nsum
// (rb_matvec_input).
extern "C" __global__ void rb_gemv3(const store_t* x, const store_t* w0, const store_t* w1, const store_t* w2, store_t* o0, store_t* o1, store_t* o2,
                                    int rows, int k, int n0, int n1, int n2, const store_t* na, const store_t* nb, const store_t* nw, store_t* nsum,
                                    float eps) {
    int j = rb_warp_column(), part = rb_part(&j, n0, n1);
    const store_t* w = part == 0 ? w0 : part == 1 ? w1 : w2;
    store_t* out = part == 0 ? o0 : part == 1 ? o1 : o2;
    const int n = part == 0 ? n0 : part == 1 ? n1 : n2;
    const bool active = j < n;
    float acc[RB_GEMV_ROWS];
    rb_warp_dots(x, RbAddNorm{na, nb, nw, nsum, eps}, w + (long)(active ? j : 0) * k, active, rows, k, acc);
    if (active && threadIdx.x % RB_WARP == 0)
        for (int r = 0; r < rows; r++) out[(long)r * n + j] = ST(acc[r]);
}

// Gate and up projections of one input and their product act = silu(g)·u in one launch:
// the first half of a block's warps computes gate columns, the second half the same up
// columns, and the gate warps form the product from both rounded values, as rb_silu_mul
// does. The norm, as in rb_gemv3. Blocks of RB_GEMV_THREADS.
#define RB_GEMV_THREADS 256
extern "C" __global__ void rb_gemv_gate_up_silu(const store_t* x, const store_t* wg, const store_t* wu, store_t* g, store_t* u, store_t* act,
                                                int rows, int k, int n, const store_t* na, const store_t* nb, const store_t* nw, store_t* nsum,
                                                float eps) {
    constexpr int HALF = RB_GEMV_THREADS / RB_WARP / 2;
    __shared__ float up_values[RB_GEMV_ROWS][HALF];
    const int warp = threadIdx.x / RB_WARP, lane = threadIdx.x % RB_WARP;
    const bool up = warp >= HALF;
    const int j = blockIdx.x * HALF + warp % HALF;
    const bool active = j < n;
    float acc[RB_GEMV_ROWS];
    rb_warp_dots(x, RbAddNorm{na, nb, nw, nsum, eps}, (up ? wu : wg) + (long)(active ? j : 0) * k, active, rows, k, acc);
    if (active && lane == 0)
        for (int r = 0; r < rows; r++) {
            const store_t v = ST(acc[r]);
            (up ? u : g)[(long)r * n + j] = v;
            if (up) up_values[r][warp - HALF] = LD(v);
        }
    __syncthreads();
    if (active && !up && lane == 0)
        for (int r = 0; r < rows; r++) {
            const float gv = LD(ST(acc[r]));
            act[(long)r * n + j] = ST(gv / (1.0f + expf(-gv)) * up_values[r][warp]);
        }
}

// out[rows, n] = x[rows, k] · w[n, k]ᵀ with f32 accumulation, in 16×16 shared tiles. The
// `hip` backend's matmul (the `cuda` backend uses cuBLAS on the matrix units instead).
#define RB_MM_TILE 16
extern "C" __global__ void rb_matmul(const store_t* x, const store_t* w, store_t* out, int rows, int k, int n) {
    RB_WAIT_PRIOR();
    __shared__ float xs[RB_MM_TILE][RB_MM_TILE + 1];
    __shared__ float ws[RB_MM_TILE][RB_MM_TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * RB_MM_TILE + ty, col = blockIdx.x * RB_MM_TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < k; k0 += RB_MM_TILE) {
        xs[ty][tx] = (row < rows && k0 + tx < k) ? LD(x[(long)row * k + k0 + tx]) : 0.0f;
        int wrow = blockIdx.x * RB_MM_TILE + ty;
        ws[ty][tx] = (wrow < n && k0 + tx < k) ? LD(w[(long)wrow * k + k0 + tx]) : 0.0f;
        __syncthreads();
        #pragma unroll
        for (int i = 0; i < RB_MM_TILE; i++) acc += xs[ty][i] * ws[tx][i];
        __syncthreads();
    }
    if (row < rows && col < n) out[(long)row * n + col] = ST(acc);
}

extern "C" __global__ void rb_rms_norm(const store_t* x, const store_t* w, store_t* out, int width, float eps) {
    RB_WAIT_PRIOR();
    __shared__ float scratch[32];
    const store_t* row = x + (long)blockIdx.x * width;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float v = LD(row[c]);
        ss += v * v;
    }
    float scale = 1.0f / sqrtf(rb_block_sum(ss, scratch) / width + eps);
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[(long)blockIdx.x * width + c] = ST(LD(row[c]) * scale * LD(w[c]));
}

// sum = a + b (stored), then out = rms_norm(sum) · w: rb_add and rb_rms_norm in one launch,
// with the same roundings and summation order.
extern "C" __global__ void rb_add_rms_norm(const store_t* a, const store_t* b, const store_t* w, store_t* sum, store_t* out, int width, float eps) {
    RB_WAIT_PRIOR();
    __shared__ float scratch[32];
    const long base = (long)blockIdx.x * width;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        sum[base + c] = ST(LD(a[base + c]) + LD(b[base + c]));
        float v = LD(sum[base + c]);
        ss += v * v;
    }
    float scale = 1.0f / sqrtf(rb_block_sum(ss, scratch) / width + eps);
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[base + c] = ST(LD(sum[base + c]) * scale * LD(w[c]));
}

// Interleaved RoPE: pair (2i, 2i+1) of a head rotates by pos · base^(-2i/d).
__device__ __forceinline__ void rb_rope_pair(store_t* p, float pos, int i, int head_dim, float base) {
    float inv_freq = powf(base, -2.0f * (float)i / (float)head_dim);
    float s, c;
    sincosf(pos * inv_freq, &s, &c);
    float a = LD(p[0]), b = LD(p[1]);
    p[0] = ST(a * c - b * s);
    p[1] = ST(a * s + b * c);
}

// Offset within a head of the first dim of pair i: 2i (adjacent pairs) or i (NeoX: i with
// i + d/2). The second dim sits `rb_rope_stride` after it.
__device__ __forceinline__ int rb_rope_first(int i, int neox) { return neox ? i : 2 * i; }
__device__ __forceinline__ int rb_rope_stride(int head_dim, int neox) { return neox ? head_dim / 2 : 1; }

// Pair i of `head` rotated. Without a table, base^(-2i/d) as rb_rope_pair forms it (plain
// llama, bit for bit); with one, by pos · inv_freq[i] (the host folds frequency factors,
// linear and YaRN scaling in), cos and sin scaled by mscale (YaRN's attention factor).
__device__ __forceinline__ void rb_rope_rotate(store_t* head, float pos, int i, int head_dim, float base, const float* inv_freq, int neox, float mscale) {
    if (!inv_freq) {
        rb_rope_pair(head + 2 * i, pos, i, head_dim, base);
        return;
    }
    float s, c;
    sincosf(pos * inv_freq[i], &s, &c);
    s *= mscale;
    c *= mscale;
    store_t* p = head + rb_rope_first(i, neox);
    const int o = rb_rope_stride(head_dim, neox);
    float a = LD(p[0]), b = LD(p[o]);
    p[0] = ST(a * c - b * s);
    p[o] = ST(a * s + b * c);
}

// RoPE in place on every pair of `rows` rows of `heads` heads; row r sits at positions[r].
extern "C" __global__ void rb_rope(store_t* x, const float* positions, int rows, int heads, int head_dim, float base, const float* inv_freq, int neox,
                                   float mscale) {
    RB_WAIT_PRIOR();
    int half = head_dim / 2;
    long pairs = (long)rows * heads * half;
    long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= pairs) return;
    long rh = t / half;
    rb_rope_rotate(x + rh * head_dim, positions[rh / heads], (int)(t % half), head_dim, base, inv_freq, neox, mscale);
}

// RoPE on q and k, and k and v appended to the caches from row `row0` (or the row the step
// record holds): four launches of rb_rope and rb_copy in one.
extern "C" __global__ void rb_rope_append(store_t* q, store_t* k, const store_t* v, store_t* kc, store_t* vc, const float* positions, int rows, int n_head, int n_kv,
                                          int head_dim, float base, const int* dyn_row, int row0, const float* inv_freq, int neox, float mscale) {
    RB_WAIT_PRIOR();
    const int half = head_dim / 2;
    const long kvw = (long)n_kv * head_dim;
    const long q_pairs = (long)rows * n_head * half, k_pairs = (long)rows * n_kv * half, v_values = rows * kvw;
    const long first = (dyn_row ? *dyn_row : row0) * kvw;
    const int pair_neox = inv_freq ? neox : 0;
    long t = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < q_pairs) {
        long rh = t / half;
        rb_rope_rotate(q + rh * head_dim, positions[rh / n_head], (int)(t % half), head_dim, base, inv_freq, neox, mscale);
    } else if ((t -= q_pairs) < k_pairs) {
        long rh = t / half;
        int i = (int)(t % half);
        rb_rope_rotate(k + rh * head_dim, positions[rh / n_kv], i, head_dim, base, inv_freq, neox, mscale);
        long at = rh * head_dim + rb_rope_first(i, pair_neox);
        long o = rb_rope_stride(head_dim, pair_neox);
        kc[first + at] = k[at];
        kc[first + at + o] = k[at + o];
    } else if ((t -= k_pairs) < v_values) {
        vc[first + t] = v[t];
    }
}

// Index of the largest value of one row (the first on ties; 0 when no value beats -inf,
// NaN never does), returned to every thread. Each thread keeps the first maximum of its
// strided values, then warps and the block's warps reduce by shuffles: on the decode
// step's critical path, so no tree of barriers over shared memory.
__device__ __forceinline__ void rb_argmax_pick(float& bv, int& bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) bv = v, bi = i;
}
__device__ unsigned int rb_argmax_row(const store_t* x, int width) {
    __shared__ float warp_v[32];
    __shared__ int warp_i[32];
    __shared__ int best;
    float bv = RB_NEG_INF;
    int bi = 0x7fffffff;
    #pragma unroll 8
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const float v = LD(x[c]);
        if (v > bv) bv = v, bi = c;
    }
    for (int o = RB_WARP / 2; o > 0; o /= 2) rb_argmax_pick(bv, bi, RB_SHFL_XOR(bv, o), RB_SHFL_XOR(bi, o));
    const int warp = threadIdx.x / RB_WARP, lane = threadIdx.x % RB_WARP, warps = blockDim.x / RB_WARP;
    if (lane == 0) warp_v[warp] = bv, warp_i[warp] = bi;
    __syncthreads();
    if (warp == 0) {
        bv = lane < warps ? warp_v[lane] : RB_NEG_INF;
        bi = lane < warps ? warp_i[lane] : 0x7fffffff;
        for (int o = RB_WARP / 2; o > 0; o /= 2) rb_argmax_pick(bv, bi, RB_SHFL_XOR(bv, o), RB_SHFL_XOR(bi, o));
        if (lane == 0) best = bi;
    }
    __syncthreads();
    return best == 0x7fffffff ? 0u : (unsigned int)best;
}

extern "C" __global__ void rb_argmax(const store_t* x, int width, unsigned int* out) {
    RB_WAIT_PRIOR();
    const unsigned int best = rb_argmax_row(x, width);
    if (threadIdx.x == 0) out[0] = best;
}

// Greedy decode without a round trip to the host: the argmax becomes the token of the
// step record, which takes the next step's position, RoPE position and tap slot from
// the host in the same launch.
extern "C" __global__ void rb_argmax_step(const store_t* x, int width, unsigned int* record, int pos, float rope_pos, int slot) {
    RB_WAIT_PRIOR();
    const unsigned int best = rb_argmax_row(x, width);
    if (threadIdx.x == 0) record[0] = best, record[1] = (unsigned int)pos, record[2] = __float_as_uint(rope_pos), record[3] = (unsigned int)slot;
}

// ---------------------------------------------------------------- attention
// Causal GQA attention of q rows (absolute positions first_pos..) against the KV cache,
// with an online softmax: scores are never materialized beyond one tile of keys. With a
// sliding window (window > 0) the query at position i sees keys i - window < j <= i only;
// window 0 sees the whole prefix.

#define RB_ATTN_QB 64
#define RB_ATTN_KT 32

// First key the query at `qpos` sees.
__device__ __forceinline__ int rb_first_key(int qpos, int window) { return window > 0 ? max(0, qpos - window + 1) : 0; }

// Keys per shared-memory tile: 32, or 16 for head dim 256 so K and V tiles stay in 32 KiB.
template <int HD>
struct RbKeyTile {
    static constexpr int KT = HD > 128 ? 16 : RB_ATTN_KT;
};

// Prefill: a block holds RB_ATTN_QB queries of one head; key tiles pass through shared memory.
template <int HD>
__device__ void rb_attention_tiled(const store_t* q, const store_t* kc, const store_t* vc, store_t* out, int rows, int n_head, int n_kv, int first_pos, const int* dyn_first,
                                   int window) {
    if (dyn_first) first_pos = *dyn_first;
    constexpr int KT = RbKeyTile<HD>::KT;
    __shared__ float ks[KT][HD];
    __shared__ float vs[KT][HD];
    const int head = blockIdx.y, kvh = head / (n_head / n_kv);
    const int qw = n_head * HD, kvw = n_kv * HD;
    const int r = blockIdx.x * RB_ATTN_QB + threadIdx.x;
    const bool active = r < rows;
    const int qpos = first_pos + r;
    const float scale = rsqrtf((float)HD);
    float qv[HD], acc[HD];
    float m = RB_NEG_INF, l = 0.0f;
    #pragma unroll
    for (int d = 0; d < HD; d++) {
        qv[d] = active ? LD(q[(long)r * qw + head * HD + d]) * scale : 0.0f;
        acc[d] = 0.0f;
    }
    int block_rows = min(rows - blockIdx.x * RB_ATTN_QB, RB_ATTN_QB);
    int last_key = first_pos + blockIdx.x * RB_ATTN_QB + block_rows - 1;
    // The block's first query sees the lowest key; tiles before it are skipped.
    const int lowest = rb_first_key(first_pos + blockIdx.x * RB_ATTN_QB, window);
    const int lo = active ? rb_first_key(qpos, window) : 0;
    for (int kt = lowest / KT * KT; kt <= last_key; kt += KT) {
        for (int e = threadIdx.x; e < KT * HD; e += blockDim.x) {
            int j = e / HD, d = e % HD, key = kt + j;
            bool in = key <= last_key;
            ks[j][d] = in ? LD(kc[(long)key * kvw + kvh * HD + d]) : 0.0f;
            vs[j][d] = in ? LD(vc[(long)key * kvw + kvh * HD + d]) : 0.0f;
        }
        __syncthreads();
        // A tile this query sees no key of is skipped (an all-masked first tile would
        // make the running max -inf and its correction NaN).
        if (active && kt <= qpos && kt + KT > lo) {
            float s[KT];
            float tmax = RB_NEG_INF;
            #pragma unroll
            for (int j = 0; j < KT; j++) {
                float dot = 0.0f;
                #pragma unroll
                for (int d = 0; d < HD; d++) dot += qv[d] * ks[j][d];
                s[j] = kt + j <= qpos && kt + j >= lo ? dot : RB_NEG_INF;
                tmax = fmaxf(tmax, s[j]);
            }
            float new_m = fmaxf(m, tmax);
            float corr = expf(m - new_m);
            l *= corr;
            #pragma unroll
            for (int d = 0; d < HD; d++) acc[d] *= corr;
            #pragma unroll
            for (int j = 0; j < KT; j++) {
                // Masked keys contribute exactly nothing (not 0·v, which is NaN for a NaN v).
                if (kt + j <= qpos && kt + j >= lo) {
                    float p = expf(s[j] - new_m);
                    l += p;
                    #pragma unroll
                    for (int d = 0; d < HD; d++) acc[d] += p * vs[j][d];
                }
            }
            m = new_m;
        }
        __syncthreads();
    }
    if (active) {
        #pragma unroll
        for (int d = 0; d < HD; d++) out[(long)r * qw + head * HD + d] = ST(acc[d] / l);
    }
}

// Decode (few rows): keys split over `splits` blocks per (row, head), so a long cache
// spreads over the whole GPU. Within a block each warp takes every `warps`-th group of
// RbKeysPerWarp consecutive keys; its lanes own HD / RB_WARP dimensions, so a key row is
// one coalesced load, the score one warp reduction, and the value accumulation needs no
// reduction at all. A group's K and V rows are loaded together, before its scores are
// reduced, so the two loads overlap. The warps' online softmax states merge in the
// block; the blocks' states (max, sum, unnormalized values) go to `part` for
// rb_attention_merge.
#define RB_SPLIT_MAX_WARPS 16
// Most key splits per (row, head) (ATTN_MAX_SPLITS in plan.rs): the merge unrolls over them.
#define RB_ATTN_MAX_SPLITS 16

// Keys per warp and step: 16 / (dims per lane), at least 2, so a lane holds 32 K and V
// values in flight whatever the head dim.
template <int HD>
struct RbKeysPerWarp {
    static constexpr int DPL = HD / RB_WARP;
    static constexpr int N = 16 / DPL > 2 ? 16 / DPL : 2;
};

// K and V rows of keys k0 .. k0 + KPW below `end`, this lane's dims from d0.
template <int KPW, int DPL>
__device__ __forceinline__ void rb_load_keys(store_t (&kr)[KPW][DPL], store_t (&vr)[KPW][DPL], const store_t* kc, const store_t* vc, int k0, int begin, int end, long kvw,
                                             int col) {
    #pragma unroll
    for (int u = 0; u < KPW; u++) {
        if (k0 + u >= begin && k0 + u < end) {
            #pragma unroll
            for (int i = 0; i < DPL; i++) {
                kr[u][i] = kc[(long)(k0 + u) * kvw + col + i];
                vr[u][i] = vc[(long)(k0 + u) * kvw + col + i];
            }
        }
    }
}

template <int HD>
__device__ void rb_attention_part(const store_t* q, const store_t* kc, const store_t* vc, float* part, int rows, int n_head, int n_kv, int first_pos, const int* dyn_first,
                                  int window) {
    // The step record and the cache rows before the first query's position were written
    // before the launch ahead (which appends rows from first_pos on): like a matvec's
    // weights, the first group's loads of them are in flight before the wait.
    if (dyn_first) first_pos = *dyn_first;
    constexpr int DPL = RbKeysPerWarp<HD>::DPL, KPW = RbKeysPerWarp<HD>::N;
    __shared__ float wm[RB_SPLIT_MAX_WARPS], wl[RB_SPLIT_MAX_WARPS];
    __shared__ float wacc[RB_SPLIT_MAX_WARPS][HD];
    const int lane = threadIdx.x % RB_WARP, warp = threadIdx.x / RB_WARP, warps = blockDim.x / RB_WARP;
    const int head = blockIdx.y, r = blockIdx.x, split = blockIdx.z, splits = gridDim.z;
    const int kvh = head / (n_head / n_kv);
    const int qw = n_head * HD, kvw = n_kv * HD;
    const int qpos = first_pos + r;
    const int lo = rb_first_key(qpos, window);
    const int per_split = (qpos - lo + splits) / splits;  // ceil((qpos + 1 - lo) / splits)
    const int key_begin = lo + split * per_split, key_end = min(qpos + 1, key_begin + per_split);
    const int d0 = lane * DPL, col = kvh * HD + d0;
    store_t kr[KPW][DPL], vr[KPW][DPL];
    int k0 = key_begin + warp * KPW;
    rb_load_keys<KPW, DPL>(kr, vr, kc, vc, k0, k0, min(key_end, first_pos), kvw, col);
    RB_WAIT_PRIOR();
    rb_load_keys<KPW, DPL>(kr, vr, kc, vc, k0, max(k0, first_pos), key_end, kvw, col);
    const float scale = rsqrtf((float)HD);
    float qv[DPL], acc[DPL];
    #pragma unroll
    for (int i = 0; i < DPL; i++) qv[i] = LD(q[(long)r * qw + head * HD + d0 + i]) * scale, acc[i] = 0.0f;
    float m = RB_NEG_INF, l = 0.0f;
    for (; k0 < key_end; k0 += warps * KPW) {
        if (k0 != key_begin + warp * KPW) rb_load_keys<KPW, DPL>(kr, vr, kc, vc, k0, k0, key_end, kvw, col);
        float s[KPW];
        #pragma unroll
        for (int u = 0; u < KPW; u++) {
            s[u] = 0.0f;
            #pragma unroll
            for (int i = 0; i < DPL; i++) s[u] += qv[i] * LD(kr[u][i]);
        }
        float step_max = RB_NEG_INF;
        #pragma unroll
        for (int u = 0; u < KPW; u++) {
            for (int o = RB_WARP / 2; o > 0; o /= 2) s[u] += RB_SHFL_XOR(s[u], o);
            if (k0 + u < key_end) step_max = fmaxf(step_max, s[u]);
        }
        float new_m = fmaxf(m, step_max);
        float corr = expf(m - new_m);
        l *= corr;
        #pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= corr;
        #pragma unroll
        for (int u = 0; u < KPW; u++) {
            // Keys past the end contribute exactly nothing (their registers hold no key).
            if (k0 + u < key_end) {
                float p = expf(s[u] - new_m);
                l += p;
                #pragma unroll
                for (int i = 0; i < DPL; i++) acc[i] += p * LD(vr[u][i]);
            }
        }
        m = new_m;
    }
    #pragma unroll
    for (int i = 0; i < DPL; i++) wacc[warp][d0 + i] = acc[i];
    if (lane == 0) wm[warp] = m, wl[warp] = l;
    __syncthreads();
    float bm = RB_NEG_INF;
    for (int i = 0; i < warps; i++) bm = fmaxf(bm, wm[i]);
    // Layout of a state: max, sum of weights, then HD weighted values.
    float* dst = part + (((long)r * n_head + head) * splits + split) * (HD + 2);
    for (int d = threadIdx.x; d <= HD; d += blockDim.x) {
        float sum = 0.0f;
        for (int i = 0; i < warps; i++) {
            float f = wm[i] == RB_NEG_INF ? 0.0f : expf(wm[i] - bm);
            sum += (d < HD ? wacc[i][d] : wl[i]) * f;
        }
        dst[d < HD ? 2 + d : 1] = sum;
    }
    if (threadIdx.x == 0) dst[0] = bm;
}

// Merge the `splits` partial states of each (row, head): one block each, a thread per dim.
// Unrolled over the most splits, so every state's loads are in flight at once.
template <int HD>
__device__ void rb_attention_merge(const float* part, store_t* out, int n_head, int splits) {
    const int head = blockIdx.y, r = blockIdx.x;
    const float* src = part + ((long)r * n_head + head) * splits * (HD + 2);
    float mx[RB_ATTN_MAX_SPLITS];
    float bm = RB_NEG_INF;
    #pragma unroll
    for (int s = 0; s < RB_ATTN_MAX_SPLITS; s++) {
        mx[s] = s < splits ? src[s * (HD + 2)] : RB_NEG_INF;
        bm = fmaxf(bm, mx[s]);
    }
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float sl = 0.0f, sv = 0.0f;
        #pragma unroll
        for (int s = 0; s < RB_ATTN_MAX_SPLITS; s++) {
            if (s < splits) {
                const float* p = src + s * (HD + 2);
                float f = mx[s] == RB_NEG_INF ? 0.0f : expf(mx[s] - bm);
                sl += p[1] * f;
                sv += p[2 + d] * f;
            }
        }
        out[(long)r * n_head * HD + head * HD + d] = ST(sv / sl);
    }
}

// Prefill with the vendor BLAS: scores S = Q·Kᵀ of a chunk of queries come from a batched
// GEMM in f32; this turns each row into causal probabilities P (stored as store_t) for the
// second GEMM, O = P·V. Row r of batch b may see keys 0..=first_key + r.
extern "C" __global__ void rb_softmax_causal(const float* scores, store_t* probs, int n_keys, int rows, int first_key, int window) {
    RB_WAIT_PRIOR();
    __shared__ float scratch[32];
    __shared__ float red_max[32];
    const int r = blockIdx.x, b = blockIdx.y;
    const long off = ((long)b * rows + r) * n_keys;
    const int limit = min(first_key + r + 1, n_keys);
    const int lo = rb_first_key(first_key + r, window);
    float m = RB_NEG_INF;
    for (int j = lo + threadIdx.x; j < limit; j += blockDim.x) m = fmaxf(m, scores[off + j]);
    for (int o = RB_WARP / 2; o > 0; o /= 2) m = fmaxf(m, RB_SHFL_XOR(m, o));
    int warp = threadIdx.x / RB_WARP, lane = threadIdx.x % RB_WARP, warps = blockDim.x / RB_WARP;
    if (lane == 0) red_max[warp] = m;
    __syncthreads();
    m = RB_NEG_INF;
    for (int w = 0; w < warps; w++) m = fmaxf(m, red_max[w]);
    float sum = 0.0f;
    for (int j = lo + threadIdx.x; j < limit; j += blockDim.x) sum += expf(scores[off + j] - m);
    float inv = 1.0f / rb_block_sum(sum, scratch);
    for (int j = threadIdx.x; j < n_keys; j += blockDim.x) probs[off + j] = ST(j < limit && j >= lo ? expf(scores[off + j] - m) * inv : 0.0f);
}

// Prefill on the tensor cores (`cuda`, f16 and bf16 storage, sm_80 and later): a block
// holds RB_FLASH_Q queries of one head, 16 per warp, and walks the keys the block can see
// in tiles of RB_FLASH_K through shared memory, with an online softmax in registers:
// S = Q·Kᵀ and O += P·V are m16n8k16 products (f32 accumulators), P rounded to the storage
// type as the GEMM path's probabilities are. Scores are never written to memory, so long
// prompts cost compute, not a score buffer's traffic. Fragment layouts: PTX ISA, "Matrix
// Fragments for mma.m16n8k16".
#define RB_FLASH_Q 64
#define RB_FLASH_K 64
#if !defined(__HIPCC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(RB_STORE_F32)
#define RB_FLASH 1
#if defined(RB_STORE_F16)
#define RB_MMA_TYPE "f16"
#else
#define RB_MMA_TYPE "bf16"
#endif
// d += a·b for one 16×16 A fragment and one 16×8 B fragment (b0, b1).
__device__ __forceinline__ void rb_mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." RB_MMA_TYPE "." RB_MMA_TYPE ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two values rounded to the storage type, packed as one fragment register (first low).
__device__ __forceinline__ unsigned rb_pack2(float lo, float hi) { return (unsigned)ST(lo) | ((unsigned)ST(hi) << 16); }

template <int HD>
__device__ void rb_flash_attention(const store_t* q, const store_t* kc, const store_t* vc, store_t* out, int rows, int n_head, int n_kv, int first_pos,
                                   int window) {
    constexpr int KP = HD + 8;          // K tile row, padded: fragment loads hit 32 banks
    constexpr int VP = RB_FLASH_K + 8;  // V tile stored transposed ([dim][key]), padded alike
    __shared__ __align__(16) store_t ks[RB_FLASH_K * KP];
    __shared__ __align__(16) store_t vt[HD * VP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
    const int head = blockIdx.y, kvh = head / (n_head / n_kv);
    const int qw = n_head * HD, kvw = n_kv * HD;
    const int r0 = blockIdx.x * RB_FLASH_Q + warp * 16;
    // A fragments of this warp's 16 query rows: register i holds row g + 8·(i & 1),
    // dims t4·2 + 8·(i >> 1) and one more, of each 16-dim step.
    unsigned qa[HD / 16][4];
    #pragma unroll
    for (int st = 0; st < HD / 16; st++)
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = r0 + g + (i & 1) * 8, dim = st * 16 + t4 * 2 + (i >> 1) * 8;
            qa[st][i] = row < rows ? *(const unsigned*)(q + (long)row * qw + head * HD + dim) : 0u;
        }
    float o[HD / 8][4];
    #pragma unroll
    for (int nb = 0; nb < HD / 8; nb++) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
    // Per thread: rows g (h = 0) and g + 8 (h = 1); running max and partial sum.
    float m[2] = {RB_NEG_INF, RB_NEG_INF}, l[2] = {0.0f, 0.0f};
    const float scale = rsqrtf((float)HD);
    const int block_first = first_pos + blockIdx.x * RB_FLASH_Q;
    const int key_last = first_pos + min(rows, (int)(blockIdx.x + 1) * RB_FLASH_Q) - 1;
    for (int k0 = rb_first_key(block_first, window) / RB_FLASH_K * RB_FLASH_K; k0 <= key_last; k0 += RB_FLASH_K) {
        __syncthreads();  // the tile before is consumed
        for (int c = threadIdx.x; c < RB_FLASH_K * HD / 8; c += blockDim.x) {
            const int key = c / (HD / 8), d = c % (HD / 8) * 8;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (k0 + key <= key_last) {
                kv = *(const uint4*)(kc + (long)(k0 + key) * kvw + kvh * HD + d);
                vv = *(const uint4*)(vc + (long)(k0 + key) * kvw + kvh * HD + d);
            }
            *(uint4*)(ks + key * KP + d) = kv;
            const store_t* vh = (const store_t*)&vv;
            #pragma unroll
            for (int i = 0; i < 8; i++) vt[(d + i) * VP + key] = vh[i];
        }
        __syncthreads();
        // Scores: C fragment nb holds keys k0 + 8·nb + t4·2 (+1) of rows g (regs 0, 1) and
        // g + 8 (regs 2, 3).
        float s[RB_FLASH_K / 8][4];
        #pragma unroll
        for (int nb = 0; nb < RB_FLASH_K / 8; nb++) {
            s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
            #pragma unroll
            for (int st = 0; st < HD / 16; st++) {
                const store_t* kr = ks + (nb * 8 + g) * KP + st * 16 + t4 * 2;
                rb_mma(s[nb], qa[st], *(const unsigned*)kr, *(const unsigned*)(kr + 8));
            }
        }
        float tile_max[2] = {RB_NEG_INF, RB_NEG_INF};
        #pragma unroll
        for (int nb = 0; nb < RB_FLASH_K / 8; nb++)
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                const int qpos = first_pos + r0 + g + (i >> 1) * 8, key = k0 + nb * 8 + t4 * 2 + (i & 1);
                const bool seen = key <= qpos && key >= rb_first_key(qpos, window);
                s[nb][i] = seen ? s[nb][i] * scale : RB_NEG_INF;
                tile_max[i >> 1] = fmaxf(tile_max[i >> 1], s[nb][i]);
            }
        #pragma unroll
        for (int h = 0; h < 2; h++) {
            // The four lanes of a quad hold one row.
            tile_max[h] = fmaxf(tile_max[h], RB_SHFL_XOR(tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], RB_SHFL_XOR(tile_max[h], 2));
            const float m_new = fmaxf(m[h], tile_max[h]);
            const float corr = m_new == RB_NEG_INF ? 1.0f : expf(m[h] - m_new);
            m[h] = m_new;
            l[h] *= corr;
            #pragma unroll
            for (int nb = 0; nb < HD / 8; nb++) o[nb][2 * h] *= corr, o[nb][2 * h + 1] *= corr;
        }
        #pragma unroll
        for (int nb = 0; nb < RB_FLASH_K / 8; nb++)
            #pragma unroll
            for (int i = 0; i < 4; i++) {
                const float p = s[nb][i] == RB_NEG_INF ? 0.0f : expf(s[nb][i] - m[i >> 1]);
                s[nb][i] = p;
                l[i >> 1] += p;
            }
        // O += P·V: the scores' C fragments of keys 16·kk.. are P's A fragment.
        #pragma unroll
        for (int kk = 0; kk < RB_FLASH_K / 16; kk++) {
            const unsigned pa[4] = {rb_pack2(s[2 * kk][0], s[2 * kk][1]), rb_pack2(s[2 * kk][2], s[2 * kk][3]),
                                    rb_pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]), rb_pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            #pragma unroll
            for (int nb = 0; nb < HD / 8; nb++) {
                const store_t* vr = vt + (nb * 8 + g) * VP + kk * 16 + t4 * 2;
                rb_mma(o[nb], pa, *(const unsigned*)vr, *(const unsigned*)(vr + 8));
            }
        }
    }
    #pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += RB_SHFL_XOR(l[h], 1);
        l[h] += RB_SHFL_XOR(l[h], 2);
    }
    #pragma unroll
    for (int nb = 0; nb < HD / 8; nb++)
        #pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = r0 + g + (i >> 1) * 8;
            if (row < rows) out[(long)row * qw + head * HD + nb * 8 + t4 * 2 + (i & 1)] = ST(o[nb][i] / l[i >> 1]);
        }
}
#endif

// `dyn_first`, when set, replaces first_pos with the value on the device (decode step record).
#define RB_ATTENTION(HD)                                                                                                  \
    extern "C" __global__ void rb_attention_tiled_##HD(const store_t* q, const store_t* kc, const store_t* vc, store_t* out, \
                                                       int rows, int n_head, int n_kv, int first_pos, const int* dyn_first, int window) { \
        RB_WAIT_PRIOR();                                                                                                                  \
        rb_attention_tiled<HD>(q, kc, vc, out, rows, n_head, n_kv, first_pos, dyn_first, window);                         \
    }                                                                                                                     \
    extern "C" __global__ void rb_attention_part_##HD(const store_t* q, const store_t* kc, const store_t* vc, float* part,   \
                                                      int rows, int n_head, int n_kv, int first_pos, const int* dyn_first, int window) { \
        rb_attention_part<HD>(q, kc, vc, part, rows, n_head, n_kv, first_pos, dyn_first, window);                         \
    }                                                                                                                     \
    extern "C" __global__ void rb_attention_merge_##HD(const float* part, store_t* out, int n_head, int splits) {          \
        RB_WAIT_PRIOR();                                                                                                   \
        rb_attention_merge<HD>(part, out, n_head, splits);                                                                \
    }
RB_ATTENTION(64)
RB_ATTENTION(128)
RB_ATTENTION(256)

// Defined in every build so that every driver loads the same list; launched only by the
// `cuda` driver with f16 or bf16 storage on sm_80 and later.
#define RB_FLASH_ATTENTION(HD)                                                                                              \
    extern "C" __global__ void RB_LAUNCH_BOUNDS(128, 2) rb_flash_attention_##HD(const store_t* q, const store_t* kc, const store_t* vc, \
                                                         store_t* out, int rows, int n_head, int n_kv, int first_pos, int window) { \
        RB_WAIT_PRIOR();                                                                                                    \
        RB_FLASH_BODY(HD)                                                                                                   \
    }
#ifdef RB_FLASH
#define RB_FLASH_BODY(HD) rb_flash_attention<HD>(q, kc, vc, out, rows, n_head, n_kv, first_pos, window);
#else
#define RB_FLASH_BODY(HD) (void)q, (void)kc, (void)vc, (void)out, (void)rows, (void)n_head, (void)n_kv, (void)first_pos, (void)window;
#endif
RB_FLASH_ATTENTION(64)
RB_FLASH_ATTENTION(128)

// ---------------------------------------------------------------- weights
// GGUF blocks dequantized on the device (the backend's own decoders; the reference uses
// candle's). One thread per block of the quant type.

__device__ __forceinline__ float rb_f16(const unsigned char* p) { return rb_half_to_float((unsigned short)(p[0] | (p[1] << 8))); }

extern "C" __global__ void rb_dequant_f32(const float* src, store_t* out, long n) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ST(src[i]);
}

extern "C" __global__ void rb_dequant_f16(const unsigned short* src, store_t* out, long n) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ST(rb_half_to_float(src[i]));
}

extern "C" __global__ void rb_dequant_bf16(const unsigned short* src, store_t* out, long n) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ST(rb_bf16_to_float(src[i]));
}

extern "C" __global__ void rb_dequant_q8_0(const unsigned char* src, store_t* out, long blocks) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 34;
    float d = rb_f16(p);
    for (int j = 0; j < 32; j++) out[b * 32 + j] = ST(d * (float)(signed char)p[2 + j]);
}

extern "C" __global__ void rb_dequant_q4_0(const unsigned char* src, store_t* out, long blocks) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 18;
    float d = rb_f16(p);
    for (int j = 0; j < 16; j++) {
        out[b * 32 + j] = ST(((int)(p[2 + j] & 15) - 8) * d);
        out[b * 32 + j + 16] = ST(((int)(p[2 + j] >> 4) - 8) * d);
    }
}

extern "C" __global__ void rb_dequant_q4_1(const unsigned char* src, store_t* out, long blocks) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 20;
    float d = rb_f16(p), m = rb_f16(p + 2);
    for (int j = 0; j < 16; j++) {
        out[b * 32 + j] = ST((p[4 + j] & 15) * d + m);
        out[b * 32 + j + 16] = ST((p[4 + j] >> 4) * d + m);
    }
}

// Q4_K: 256 values; 8 sub-blocks of 32 with 6-bit scales and mins packed in 12 bytes.
__device__ void rb_q4k_scale_min(int j, const unsigned char* s, int* sc, int* mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

extern "C" __global__ void rb_dequant_q4_k(const unsigned char* src, store_t* out, long blocks) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 144;
    float d = rb_f16(p), dmin = rb_f16(p + 2);
    const unsigned char* scales = p + 4;
    const unsigned char* qs = p + 16;
    store_t* y = out + b * 256;
    for (int j = 0; j < 4; j++) {
        int sc1, m1, sc2, m2;
        rb_q4k_scale_min(2 * j, scales, &sc1, &m1);
        rb_q4k_scale_min(2 * j + 1, scales, &sc2, &m2);
        for (int l = 0; l < 32; l++) {
            y[64 * j + l] = ST(d * sc1 * (qs[32 * j + l] & 15) - dmin * m1);
            y[64 * j + 32 + l] = ST(d * sc2 * (qs[32 * j + l] >> 4) - dmin * m2);
        }
    }
}

// Q6_K: 256 values; low 4 bits in ql, high 2 bits in qh, 16 int8 scales, then d.
extern "C" __global__ void rb_dequant_q6_k(const unsigned char* src, store_t* out, long blocks) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 210;
    const unsigned char* ql = p;
    const unsigned char* qh = p + 128;
    const signed char* sc = (const signed char*)(p + 192);
    float d = rb_f16(p + 208);
    store_t* y = out + b * 256;
    for (int n = 0; n < 2; n++) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = (int)((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = (int)((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = ST(d * sc[is] * q1);
            y[l + 32] = ST(d * sc[is + 2] * q2);
            y[l + 64] = ST(d * sc[is + 4] * q3);
            y[l + 96] = ST(d * sc[is + 6] * q4);
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

// Q5_K: Q4_K's layout with a fifth bit per value in 32 qh bytes (bit j for sub-block j).
extern "C" __global__ void rb_dequant_q5_k(const unsigned char* src, store_t* out, long blocks) {
    RB_WAIT_PRIOR_NEXT_AT_END();
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 176;
    float d = rb_f16(p), dmin = rb_f16(p + 2);
    const unsigned char* qh = p + 16;
    store_t* y = out + b * 256;
    for (int j = 0; j < 8; j++) {
        int sc, mn;
        rb_q4k_scale_min(j, p + 4, &sc, &mn);
        const float d1 = d * sc, m1 = dmin * mn;
        const unsigned char* qs = p + 48 + 32 * (j / 2);
        const int shift = (j % 2) * 4;
        for (int l = 0; l < 32; l++) y[32 * j + l] = ST(d1 * (((qs[l] >> shift) & 15) + ((qh[l] >> j) & 1) * 16) - m1);
    }
}

// ---------------------------------------------------------------- quantized matrices
// Weights kept as GGUF blocks (--weights native). A [n, k] matrix is n rows of k/32
// sub-blocks of 32 values: a Q4_0/Q4_1/Q8_0 block, or an eighth of a K-quant super-block
// (rows are whole blocks, so sub-block s of the matrix is also sub-block s of its blocks).
// rb_sub_<type>(w, s, v) decodes sub-block s into v as ggml's dequantize_row_* does.

__device__ __forceinline__ void rb_sub_q4_0(const unsigned char* w, long s, float* v) {
    const unsigned char* p = w + s * 18;
    const float d = rb_f16(p);
    #pragma unroll
    for (int i = 0; i < 16; i++) {
        v[i] = ((int)(p[2 + i] & 15) - 8) * d;
        v[i + 16] = ((int)(p[2 + i] >> 4) - 8) * d;
    }
}

__device__ __forceinline__ void rb_sub_q4_1(const unsigned char* w, long s, float* v) {
    const unsigned char* p = w + s * 20;
    const float d = rb_f16(p), m = rb_f16(p + 2);
    #pragma unroll
    for (int i = 0; i < 16; i++) {
        v[i] = (p[4 + i] & 15) * d + m;
        v[i + 16] = (p[4 + i] >> 4) * d + m;
    }
}

__device__ __forceinline__ void rb_sub_q8_0(const unsigned char* w, long s, float* v) {
    const unsigned char* p = w + s * 34;
    const float d = rb_f16(p);
    #pragma unroll
    for (int i = 0; i < 32; i++) v[i] = (float)(signed char)p[2 + i] * d;
}

__device__ __forceinline__ void rb_sub_q4_k(const unsigned char* w, long s, float* v) {
    const unsigned char* p = w + (s >> 3) * 144;
    const int j = (int)(s & 7), shift = (j & 1) * 4;
    int sc, mn;
    rb_q4k_scale_min(j, p + 4, &sc, &mn);
    const float d1 = rb_f16(p) * sc, m1 = rb_f16(p + 2) * mn;
    const unsigned char* qs = p + 16 + 32 * (j >> 1);
    #pragma unroll
    for (int i = 0; i < 32; i++) v[i] = d1 * ((qs[i] >> shift) & 15) - m1;
}

__device__ __forceinline__ void rb_sub_q5_k(const unsigned char* w, long s, float* v) {
    const unsigned char* p = w + (s >> 3) * 176;
    const int j = (int)(s & 7), shift = (j & 1) * 4;
    int sc, mn;
    rb_q4k_scale_min(j, p + 4, &sc, &mn);
    const float d1 = rb_f16(p) * sc, m1 = rb_f16(p + 2) * mn;
    const unsigned char* qh = p + 16;
    const unsigned char* qs = p + 48 + 32 * (j >> 1);
    #pragma unroll
    for (int i = 0; i < 32; i++) v[i] = d1 * (((qs[i] >> shift) & 15) + ((qh[i] >> j) & 1) * 16) - m1;
}

// Bytes between native Q6_K blocks on the device: the 210-byte GGUF block and 14 of
// padding (see rb_q6_k).
#define RB_Q6_K_BYTES 224

// Q6_K sub-block j: half j/4 of the block, quarter j%4 of it (value l + 32·quarter).
__device__ __forceinline__ void rb_sub_q6_k(const unsigned char* w, long s, float* v) {
    const unsigned char* p = w + (s >> 3) * RB_Q6_K_BYTES;
    const int j = (int)(s & 7), half = j >> 2, quarter = j & 3;
    const unsigned char* ql = p + 64 * half + (quarter & 1) * 32;
    const unsigned char* qh = p + 128 + 32 * half;
    const signed char* sc = (const signed char*)(p + 192 + 8 * half);
    const int shift = (quarter >> 1) * 4, hshift = 2 * quarter;
    const float d = rb_f16(p + 208);
    #pragma unroll
    for (int l = 0; l < 32; l++) {
        const int q = (int)(((ql[l] >> shift) & 15) | (((qh[l] >> hshift) & 3) << 4)) - 32;
        v[l] = d * sc[l / 16 + 2 * quarter] * q;
    }
}

// Decode matvecs on blocks (one row of x). A thread block of RB_QWARPS warps computes
// RB_QCOLS adjacent output columns. A block is cut into pieces that one lane reads with a
// few wide loads (consecutive lanes on consecutive pieces, so a warp's loads coalesce);
// the x values of a piece are loaded, converted and summed once for all the block's
// columns. Quants stay integers, scaled once per sub-block (Σq·x times the scale, minus the
// min times Σx); f32 accumulation, summed over the warp, then over the block's warps.
// Measured on an H200 (TinyLlama shape, Q4_K, ncu): one column per warp was latency-bound
// (gate + up 21.7 µs for 13 MB), x's loads and conversions repeated per column.
//
// Each type gives VALUES and BYTES per block and PIECES per block; Raw, one piece as
// loaded, and load(block, t); XN, the x values piece t multiplies, and xs(t, xb, x) to read
// them (xb: x at the block's first value); XG, the groups of XN / XG values whose Σx the
// piece needs (0: none); dot(raw, t, x, sx), the piece's Σ w·x. Blocks start at multiples
// of BYTES from the matrix start, which the device allocation aligns to 256 bytes.
#define RB_QCOLS 4
// Six warps, four blocks per SM: measured against four and six on an H100 in one run
// (TinyLlama-shaped Q4_K), decode +1.3% at 1 position and +1.2% at depth 512, prefill
// unchanged: a 5632-wide Q4_K row (176 pieces) is read in one round of lanes, not two.
#define RB_QWARPS 6
// Blocks per SM the registers must allow: the kernel is latency-bound, so occupancy pays.
#define RB_QBLOCKS 4

// Byte i of w as a float less `offset`, exactly (byte ≤ 255, offset < 2^8): a byte permute
// into the mantissa of 2^23 and one subtraction, instead of a conversion instruction.
__device__ __forceinline__ float rb_byte_f(unsigned int w, int i, float offset) {
    return __int_as_float(__byte_perm(w, 0x4B000000u, 0x7540u | i)) - (8388608.0f + offset);
}

__device__ __forceinline__ unsigned int rb_byte(unsigned int w, int i) { return (w >> (8 * i)) & 255u; }

// A 32-bit word at a 2-byte aligned address (blocks of 18 and 34 bytes).
__device__ __forceinline__ unsigned int rb_u32_2(const unsigned char* p) {
    const unsigned short* h = (const unsigned short*)p;
    return h[0] | ((unsigned int)h[1] << 16);
}

// N consecutive stored values as f32, read 16 (or 8) bytes at a time; p is aligned to that.
template <int N>
__device__ __forceinline__ void rb_load_x(const store_t* p, float* v) {
    const int BYTES = N * (int)sizeof(store_t);
    if (BYTES % 16 == 0) {
        const int PER = 16 / (int)sizeof(store_t);
        #pragma unroll
        for (int c = 0; c < N / PER; c++) {
            store_t s[PER];
            *(uint4*)s = ((const uint4*)p)[c];
            #pragma unroll
            for (int i = 0; i < PER; i++) v[c * PER + i] = LD(s[i]);
        }
    } else {
        const int PER = 8 / (int)sizeof(store_t);
        #pragma unroll
        for (int c = 0; c < N / PER; c++) {
            store_t s[PER];
            *(uint2*)s = ((const uint2*)p)[c];
            #pragma unroll
            for (int i = 0; i < PER; i++) v[c * PER + i] = LD(s[i]);
        }
    }
}

// Σ (q[i] − offset)·x[i] over 4·W quants held as bytes in W words.
template <int W>
__device__ __forceinline__ float rb_dot_bytes(const unsigned int* q, const float* x, float offset) {
    float a = 0.0f;
    #pragma unroll
    for (int c = 0; c < W; c++) {
        #pragma unroll
        for (int i = 0; i < 4; i++) a = fmaf(rb_byte_f(q[c], i, offset), x[4 * c + i], a);
    }
    return a;
}

// Q4_0 (18 bytes: d, 16 bytes of nibbles; value i low nibble of byte i, 16+i high): a
// piece is 4 bytes, values 4t..4t+3 and 16+4t..16+4t+3; v = d·(q − 8).
struct rb_q4_0 {
    static const int VALUES = 32, BYTES = 18, PIECES = 4, XN = 8, XG = 0;
    struct Raw { unsigned int q; unsigned short d; };
    static __device__ __forceinline__ Raw load(const unsigned char* b, int t) { return Raw{rb_u32_2(b + 2 + 4 * t), *(const unsigned short*)b}; }
    static __device__ __forceinline__ void xs(int t, const store_t* xb, float* x) {
        rb_load_x<4>(xb + 4 * t, x);
        rb_load_x<4>(xb + 16 + 4 * t, x + 4);
    }
    static __device__ __forceinline__ float dot(const Raw& w, int t, const float* x, const float* sx) {
        const unsigned int q[2] = {w.q & 0x0F0F0F0Fu, (w.q >> 4) & 0x0F0F0F0Fu};
        return rb_half_to_float(w.d) * rb_dot_bytes<2>(q, x, 8.0f);
    }
};

// Q4_1 (20 bytes: d, m, 16 bytes of nibbles as Q4_0): v = d·q + m.
struct rb_q4_1 {
    static const int VALUES = 32, BYTES = 20, PIECES = 4, XN = 8, XG = 1;
    struct Raw { unsigned int q, dm; };
    static __device__ __forceinline__ Raw load(const unsigned char* b, int t) {
        const unsigned int* p = (const unsigned int*)b;
        return Raw{p[1 + t], p[0]};
    }
    static __device__ __forceinline__ void xs(int t, const store_t* xb, float* x) { rb_q4_0::xs(t, xb, x); }
    static __device__ __forceinline__ float dot(const Raw& w, int t, const float* x, const float* sx) {
        const unsigned int q[2] = {w.q & 0x0F0F0F0Fu, (w.q >> 4) & 0x0F0F0F0Fu};
        return rb_half_to_float(w.dm & 0xFFFF) * rb_dot_bytes<2>(q, x, 0.0f) + rb_half_to_float(w.dm >> 16) * sx[0];
    }
};

// Q8_0 (34 bytes: d, 32 signed bytes): a piece is values 4t..4t+3; v = d·q.
struct rb_q8_0 {
    static const int VALUES = 32, BYTES = 34, PIECES = 8, XN = 4, XG = 0;
    struct Raw { unsigned int q; unsigned short d; };
    static __device__ __forceinline__ Raw load(const unsigned char* b, int t) { return Raw{rb_u32_2(b + 2 + 4 * t), *(const unsigned short*)b}; }
    static __device__ __forceinline__ void xs(int t, const store_t* xb, float* x) { rb_load_x<4>(xb + 4 * t, x); }
    static __device__ __forceinline__ float dot(const Raw& w, int t, const float* x, const float* sx) {
        const unsigned int q = w.q ^ 0x80808080u;  // each two's complement byte + 128
        return rb_half_to_float(w.d) * rb_dot_bytes<1>(&q, x, 128.0f);
    }
};

// Q4_K and Q5_K pieces: 16 bytes of nibbles, t = 2g + half: low nibbles are values
// 16·half.. of sub-block 2g, high ones the same values of sub-block 2g + 1 (Q5_K adds bit
// 2g or 2g + 1 of the qh bytes of those values as the fifth bit); v = d·sc·q − dmin·mn.
// `head` holds d, dmin and the 12 scale bytes s; x holds the 16 low, then the 16 high
// values. The 6-bit scales (mins) of sub-blocks 0..3 are the low bits of s[0..3] (s[4..7]);
// of sub-blocks 4..7, the low (high) nibbles of s[8..11] with the top 2 bits of s[0..3]
// (s[4..7]) above them: decoded four at a time, without branches, as one lane's piece
// mixes them with arithmetic.
struct rb_k_nibbles {
    static const int VALUES = 256, PIECES = 8, XN = 32, XG = 2;
    static __device__ __forceinline__ void xs(int t, const store_t* xb, float* x) {
        const store_t* p = xb + 64 * (t >> 1) + 16 * (t & 1);
        rb_load_x<16>(p, x);
        rb_load_x<16>(p + 32, x + 16);
    }
    static __device__ __forceinline__ float dot(uint4 head, uint4 qs, const uint4* high, int t, const float* x, const float* sx) {
        const int g = t >> 1;
        const unsigned int sc = g < 2 ? head.y & 0x3F3F3F3Fu : (head.w & 0x0F0F0F0Fu) | ((head.y >> 2) & 0x30303030u);
        const unsigned int mn = g < 2 ? head.z & 0x3F3F3F3Fu : ((head.w >> 4) & 0x0F0F0F0Fu) | ((head.z >> 2) & 0x30303030u);
        const int b0 = 2 * (g & 1);
        const float d = rb_half_to_float(head.x & 0xFFFF), dmin = rb_half_to_float(head.x >> 16);
        const unsigned int words[4] = {qs.x, qs.y, qs.z, qs.w};
        unsigned int lo[4], hi[4];
        #pragma unroll
        for (int c = 0; c < 4; c++) {
            lo[c] = words[c] & 0x0F0F0F0Fu;
            hi[c] = (words[c] >> 4) & 0x0F0F0F0Fu;
            if (high) {
                const unsigned int h = c == 0 ? high->x : c == 1 ? high->y : c == 2 ? high->z : high->w;
                lo[c] |= ((h >> (2 * g)) & 0x01010101u) << 4;
                hi[c] |= ((h >> (2 * g + 1)) & 0x01010101u) << 4;
            }
        }
        const float a = rb_dot_bytes<4>(lo, x, 0.0f), b = rb_dot_bytes<4>(hi, x + 16, 0.0f);
        return d * (rb_byte_f(sc, b0, 0.0f) * a + rb_byte_f(sc, b0 + 1, 0.0f) * b) -
               dmin * (rb_byte_f(mn, b0, 0.0f) * sx[0] + rb_byte_f(mn, b0 + 1, 0.0f) * sx[1]);
    }
};

// Q4_K (144 bytes: d, dmin, 12 scale bytes, 128 bytes of nibbles).
struct rb_q4_k : rb_k_nibbles {
    static const int BYTES = 144;
    struct Raw { uint4 head, qs; };
    static __device__ __forceinline__ Raw load(const unsigned char* b, int t) {
        const uint4* p = (const uint4*)b;
        return Raw{p[0], p[1 + t]};
    }
    static __device__ __forceinline__ float dot(const Raw& w, int t, const float* x, const float* sx) {
        return rb_k_nibbles::dot(w.head, w.qs, nullptr, t, x, sx);
    }
};

// Q5_K (176 bytes: Q4_K's head, 32 qh bytes, 128 bytes of nibbles).
struct rb_q5_k : rb_k_nibbles {
    static const int BYTES = 176;
    struct Raw { uint4 head, qh, qs; };
    static __device__ __forceinline__ Raw load(const unsigned char* b, int t) {
        const uint4* p = (const uint4*)b;
        return Raw{p[0], p[1 + (t & 1)], p[3 + t]};
    }
    static __device__ __forceinline__ float dot(const Raw& w, int t, const float* x, const float* sx) {
        return rb_k_nibbles::dot(w.head, w.qs, &w.qh, t, x, sx);
    }
};

// Q6_K: the 210-byte GGUF block (ql[128], qh[64], 16 signed scales, d) padded on upload
// to RB_Q6_K_BYTES, so that every part of every block is 16-byte aligned (at 210 bytes
// apart, every other block sits 2 bytes off a word and each load was 2 bytes). Half h of
// the block holds values 128h..: byte m < 64 of ql[64h..] has value 128h + m in its low
// nibble and 128h + 64 + m in its high one; their top two bits are bits 2·(m / 32) and
// 4 + 2·(m / 32) of qh[32h + m % 32]; value 128h + i is scaled by sc[8h + i / 16];
// v = d·sc·(q − 32). Piece t = 4h + u is the 16 ql bytes m = 16u.. of half h: values
// 128h + 16u.. (low nibbles, scale 8h + u) and 128h + 64 + 16u.. (high, scale 8h + 4 + u).
struct rb_q6_k {
    static const int VALUES = 256, BYTES = RB_Q6_K_BYTES, PIECES = 8, XN = 32, XG = 0;
    struct Raw { uint4 ql, qh; uint2 sc; unsigned short d; };
    static __device__ __forceinline__ Raw load(const unsigned char* b, int t) {
        const int h = t >> 2;
        return Raw{((const uint4*)b)[t], ((const uint4*)b)[8 + 2 * h + (t & 1)], ((const uint2*)b)[24 + h], *(const unsigned short*)(b + 208)};
    }
    static __device__ __forceinline__ void xs(int t, const store_t* xb, float* x) {
        const store_t* p = xb + 128 * (t >> 2) + 16 * (t & 3);
        rb_load_x<16>(p, x);
        rb_load_x<16>(p + 64, x + 16);
    }
    static __device__ __forceinline__ float dot(const Raw& w, int t, const float* x, const float* sx) {
        const int u = t & 3, low_shift = 2 * (u >> 1);
        const unsigned int ql[4] = {w.ql.x, w.ql.y, w.ql.z, w.ql.w}, qh[4] = {w.qh.x, w.qh.y, w.qh.z, w.qh.w};
        unsigned int lo[4], hi[4];
        #pragma unroll
        for (int c = 0; c < 4; c++) {
            lo[c] = (ql[c] & 0x0F0F0F0Fu) | (((qh[c] >> low_shift) & 0x03030303u) << 4);
            hi[c] = ((ql[c] >> 4) & 0x0F0F0F0Fu) | (((qh[c] >> (low_shift + 4)) & 0x03030303u) << 4);
        }
        const float a = rb_dot_bytes<4>(lo, x, 32.0f), b = rb_dot_bytes<4>(hi, x + 16, 32.0f);
        const float sc_lo = (float)(signed char)rb_byte(w.sc.x, u), sc_hi = (float)(signed char)rb_byte(w.sc.y, u);
        return rb_half_to_float(w.d) * (sc_lo * a + sc_hi * b);
    }
};

// Up to three quantized projections of one row x in one launch (q, k and v; gate and up
// with n2 = 0; one matrix with n1 = n2 = 0): blocks 0.. take RB_QCOLS columns of w0 each,
// then of w1, then of w2; the warps of a block (at most RB_QWARPS, no more than a row has
// pieces for, so that no lane idles) split the pieces of a row. One row only: registers
// for more rows of x would cost occupancy (a few rows take the prefill path instead).
// No norm on the way in: a block covers only RB_QCOLS columns, so every block computing
// the row's norm costs more than the norm's own launch (Q4_K decode 5% slower on an H200).
template <class Q>
__device__ __forceinline__ void rb_qgemv3(const unsigned char* w0, const unsigned char* w1, const unsigned char* w2, const store_t* x, store_t* o0,
                                          store_t* o1, store_t* o2, int k, int n0, int n1, int n2) {
    __shared__ float partial[RB_QWARPS][RB_QCOLS];
    int j = blockIdx.x;
    const int part = rb_part(&j, (n0 + RB_QCOLS - 1) / RB_QCOLS, (n1 + RB_QCOLS - 1) / RB_QCOLS);
    const unsigned char* w = part == 0 ? w0 : part == 1 ? w1 : w2;
    store_t* out = part == 0 ? o0 : part == 1 ? o1 : o2;
    const int n = part == 0 ? n0 : part == 1 ? n1 : n2;
    j *= RB_QCOLS;
    if (j >= n) return;  // whole blocks leave together
    const int cols = min(RB_QCOLS, n - j), warp = threadIdx.x / RB_WARP, lane = threadIdx.x % RB_WARP, warps = blockDim.x / RB_WARP;
    const int pieces = k / Q::VALUES * Q::PIECES;
    const long row_bytes = (long)(k / Q::VALUES) * Q::BYTES;
    w += j * row_bytes;
    float acc[RB_QCOLS];
    #pragma unroll
    for (int c = 0; c < RB_QCOLS; c++) acc[c] = 0.0f;
    typename Q::Raw raw[RB_QCOLS];
    auto load = [&](int p) {
        #pragma unroll
        for (int c = 0; c < RB_QCOLS; c++)
            if (c < cols) raw[c] = Q::load(w + c * row_bytes + (long)(p / Q::PIECES) * Q::BYTES, p % Q::PIECES);
    };
    // The first blocks are in flight before the input, which the launch ahead writes, is read.
    int p = threadIdx.x;
    if (p < pieces) load(p);
    x = rb_matvec_input(x, RbAddNorm{}, k);
    while (p < pieces) {
        const int t = p % Q::PIECES;
        float xv[Q::XN], sx[Q::XG + 1];
        Q::xs(t, x + (long)(p / Q::PIECES) * Q::VALUES, xv);
        const int size = Q::XN / (Q::XG > 0 ? Q::XG : 1);
        #pragma unroll
        for (int gi = 0; gi < Q::XG; gi++) {
            sx[gi] = 0.0f;
            #pragma unroll
            for (int i = 0; i < size; i++) sx[gi] += xv[gi * size + i];
        }
        #pragma unroll
        for (int c = 0; c < RB_QCOLS; c++)
            if (c < cols) acc[c] += Q::dot(raw[c], t, xv, sx);
        p += blockDim.x;
        if (p < pieces) load(p);
    }
    #pragma unroll
    for (int c = 0; c < RB_QCOLS; c++) {
        for (int o = RB_WARP / 2; o > 0; o /= 2) acc[c] += RB_SHFL_XOR(acc[c], o);
        if (lane == 0) partial[warp][c] = acc[c];
    }
    __syncthreads();
    if (threadIdx.x < cols) {
        float sum = 0.0f;
        for (int v = 0; v < warps; v++) sum += partial[v][threadIdx.x];
        out[j + threadIdx.x] = ST(sum);
    }
}

// Prefill dequantizes a matrix with rb_qdequant_<type> into a transient workspace of the
// storage type and runs the dense GEMM on it. A thread decodes one sub-block of 32 values;
// the block's values pass through shared memory so that consecutive threads store
// consecutive values (a thread storing its own 32 would make every store 32 transactions).
#define RB_DEQUANT_THREADS 256
#define RB_QUANT_OPS(T)                                                                                              \
    extern "C" __global__ void RB_LAUNCH_BOUNDS(RB_QWARPS * RB_WARP, RB_QBLOCKS) rb_qgemv3_##T(const unsigned char* w0, const unsigned char* w1, const unsigned char* w2, \
                                             const store_t* x, store_t* o0, store_t* o1, store_t* o2, int k, int n0,     \
                                             int n1, int n2) {                                                        \
        rb_qgemv3<rb_##T>(w0, w1, w2, x, o0, o1, o2, k, n0, n1, n2);                                                 \
    }                                                                                                                \
    extern "C" __global__ void RB_LAUNCH_BOUNDS(RB_DEQUANT_THREADS, 1) rb_qdequant_##T(const unsigned char* w, store_t* out, long subs) { \
        RB_WAIT_PRIOR_NEXT_AT_END();                                                                                \
        __shared__ float tile[RB_DEQUANT_THREADS][33];                                                               \
        const long first = (long)blockIdx.x * RB_DEQUANT_THREADS;                                                    \
        if (first + threadIdx.x < subs) {                                                                            \
            float v[32];                                                                                             \
            rb_sub_##T(w, first + threadIdx.x, v);                                                                   \
            _Pragma("unroll") for (int i = 0; i < 32; i++) tile[threadIdx.x][i] = v[i];                              \
        }                                                                                                            \
        __syncthreads();                                                                                             \
        const long values = min((long)RB_DEQUANT_THREADS, subs - first) * 32;                                        \
        for (long i = threadIdx.x; i < values; i += RB_DEQUANT_THREADS) out[first * 32 + i] = ST(tile[i / 32][i % 32]); \
    }

RB_QUANT_OPS(q4_0)
RB_QUANT_OPS(q4_1)
RB_QUANT_OPS(q8_0)
RB_QUANT_OPS(q4_k)
RB_QUANT_OPS(q5_k)
RB_QUANT_OPS(q6_k)
