// ops.hip — every op of the runtime's Backend trait as GPU kernels, written once in HIP
// dialect. NVRTC compiles it for the `cuda` backend, hipcc for the `hip` backend; the
// differences live in compat.h. Values are stored as store_t (f32, f16 or bf16, one per
// build) and every op computes in f32, rounding once when it stores.
#include "compat.h"

#define RB_NEG_INF (-__int_as_float(0x7f800000))

// ---------------------------------------------------------------- elementwise and rows

extern "C" __global__ void rb_embed(const store_t* table, const unsigned int* ids, store_t* out, int width, int rows) {
    int r = blockIdx.x;
    if (r >= rows) return;
    const store_t* src = table + (long)ids[r] * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[(long)r * width + c] = src[c];
}

extern "C" __global__ void rb_add(const store_t* a, const store_t* b, store_t* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ST(LD(a[i]) + LD(b[i]));
}

extern "C" __global__ void rb_silu_mul(const store_t* gate, const store_t* up, store_t* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = LD(gate[i]);
        out[i] = ST(g / (1.0f + expf(-g)) * LD(up[i]));
    }
}

// GELU (tanh approximation) of the gate times up: 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))).
extern "C" __global__ void rb_gelu_tanh_mul(const store_t* gate, const store_t* up, store_t* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = LD(gate[i]);
        out[i] = ST(0.5f * g * (1.0f + tanhf(0.7978846f * (g + 0.044715f * g * g * g))) * LD(up[i]));
    }
}

// x[r, c] += bias[c] over n values of rows of `width`.
extern "C" __global__ void rb_add_bias(store_t* x, const store_t* bias, long n, long width) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = ST(LD(x[i]) + LD(bias[i % width]));
}

// With `dyn_row`, dst moves by that many rows of `width`, read on the device (the decode
// step record), so a recorded step writes where the step it replays says.
extern "C" __global__ void rb_copy(const store_t* src, store_t* dst, long n, const int* dyn_row, long width) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (dyn_row) dst += (long)(*dyn_row) * width;
    if (i < n) dst[i] = src[i];
}

// Fault injection: kind 0 scale, 1 offset, 2 NaN, 3 zero, on rows from_row.. of x.
extern "C" __global__ void rb_perturb(store_t* x, long start, long n, int kind, float value) {
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

// Dot products of weight row `wr` with rows 0..rows of x, summed over the warp: every lane
// gets acc[r].
__device__ __forceinline__ void rb_warp_dots(const store_t* x, const store_t* wr, int rows, int k, float* acc) {
    const int lane = threadIdx.x % RB_WARP;
    #pragma unroll
    for (int r = 0; r < RB_GEMV_ROWS; r++) acc[r] = 0.0f;
    const int V = 16 / sizeof(store_t);
    const int step = RB_WARP * V;
    if (k % V == 0) {
        for (int c0 = lane * V; c0 < k; c0 += step * RB_GEMV_CHUNK) {
            uint4 wv[RB_GEMV_CHUNK];
            #pragma unroll
            for (int u = 0; u < RB_GEMV_CHUNK; u++)
                if (c0 + u * step < k) wv[u] = *(const uint4*)(wr + c0 + u * step);
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
    if (j >= n) return;  // whole warps leave together
    float acc[RB_GEMV_ROWS];
    rb_warp_dots(x, w + (long)j * k, rows, k, acc);
    if (threadIdx.x % RB_WARP == 0)
        for (int r = 0; r < rows; r++) out[(long)r * n + j] = ST(acc[r]);
}

// Three projections of the same input in one launch (q, k and v): columns 0..n0 of w0,
// then n1 of w1, then n2 of w2.
extern "C" __global__ void rb_gemv3(const store_t* x, const store_t* w0, const store_t* w1, const store_t* w2, store_t* o0, store_t* o1, store_t* o2,
                                    int rows, int k, int n0, int n1, int n2) {
    int j = rb_warp_column(), part = 0;
    if (j >= n0) {
        j -= n0, part = 1;
        if (j >= n1) j -= n1, part = 2;
    }
    const store_t* w = part == 0 ? w0 : part == 1 ? w1 : w2;
    store_t* out = part == 0 ? o0 : part == 1 ? o1 : o2;
    const int n = part == 0 ? n0 : part == 1 ? n1 : n2;
    if (j >= n) return;
    float acc[RB_GEMV_ROWS];
    rb_warp_dots(x, w + (long)j * k, rows, k, acc);
    if (threadIdx.x % RB_WARP == 0)
        for (int r = 0; r < rows; r++) out[(long)r * n + j] = ST(acc[r]);
}

// out[rows, n] = x[rows, k] · w[n, k]ᵀ with f32 accumulation, in 16×16 shared tiles. The
// `hip` backend's matmul (the `cuda` backend uses cuBLAS on the matrix units instead).
#define RB_MM_TILE 16
extern "C" __global__ void rb_matmul(const store_t* x, const store_t* w, store_t* out, int rows, int k, int n) {
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

extern "C" __global__ void rb_rms_norm(const store_t* x, const store_t* w, store_t* out, int width, float eps) {
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

// Index of the largest value of one row (the first on ties).
extern "C" __global__ void rb_argmax(const store_t* x, int width, unsigned int* out) {
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    float bv = RB_NEG_INF;
    int bi = 0x7fffffff;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float v = LD(x[c]);
        if (v > bv) bv = v, bi = c;
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s /= 2) {
        if (threadIdx.x < s) {
            float v = best_v[threadIdx.x + s];
            int i = best_i[threadIdx.x + s];
            if (v > best_v[threadIdx.x] || (v == best_v[threadIdx.x] && i < best_i[threadIdx.x])) best_v[threadIdx.x] = v, best_i[threadIdx.x] = i;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = best_i[0] == 0x7fffffff ? 0u : (unsigned int)best_i[0];
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
// spreads over the whole GPU. Within a block each warp takes every `warps`-th group of keys;
// its lanes own HD / RB_WARP dimensions, so a key row is one coalesced load, the score one
// warp reduction, and the value accumulation needs no reduction at all. The warps' online
// softmax states merge in the block; the blocks' states (max, sum, unnormalized values)
// go to `part` for rb_attention_merge.
#define RB_SPLIT_MAX_WARPS 16
#define RB_ATTN_KPW 4
template <int HD>
__device__ void rb_attention_part(const store_t* q, const store_t* kc, const store_t* vc, float* part, int rows, int n_head, int n_kv, int first_pos, const int* dyn_first,
                                  int window) {
    if (dyn_first) first_pos = *dyn_first;
    constexpr int DPL = HD / RB_WARP;  // dimensions per lane
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
    const float scale = rsqrtf((float)HD);
    const int d0 = lane * DPL;
    float qv[DPL], acc[DPL];
    #pragma unroll
    for (int i = 0; i < DPL; i++) qv[i] = LD(q[(long)r * qw + head * HD + d0 + i]) * scale, acc[i] = 0.0f;
    float m = RB_NEG_INF, l = 0.0f;
    // RB_ATTN_KPW consecutive keys per step, so their loads and reductions overlap.
    for (int k0 = key_begin + warp * RB_ATTN_KPW; k0 < key_end; k0 += warps * RB_ATTN_KPW) {
        float s[RB_ATTN_KPW];
        #pragma unroll
        for (int u = 0; u < RB_ATTN_KPW; u++) {
            s[u] = 0.0f;
            if (k0 + u < key_end) {
                const store_t* kr = kc + (long)(k0 + u) * kvw + kvh * HD + d0;
                #pragma unroll
                for (int i = 0; i < DPL; i++) s[u] += qv[i] * LD(kr[i]);
            }
        }
        float step_max = RB_NEG_INF;
        #pragma unroll
        for (int u = 0; u < RB_ATTN_KPW; u++) {
            for (int o = RB_WARP / 2; o > 0; o /= 2) s[u] += RB_SHFL_XOR(s[u], o);
            if (k0 + u < key_end) step_max = fmaxf(step_max, s[u]);
        }
        float new_m = fmaxf(m, step_max);
        float corr = expf(m - new_m);
        l *= corr;
        #pragma unroll
        for (int i = 0; i < DPL; i++) acc[i] *= corr;
        #pragma unroll
        for (int u = 0; u < RB_ATTN_KPW; u++) {
            if (k0 + u < key_end) {
                const store_t* vr = vc + (long)(k0 + u) * kvw + kvh * HD + d0;
                float p = expf(s[u] - new_m);
                l += p;
                #pragma unroll
                for (int i = 0; i < DPL; i++) acc[i] += p * LD(vr[i]);
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
template <int HD>
__device__ void rb_attention_merge(const float* part, store_t* out, int n_head, int splits) {
    const int head = blockIdx.y, r = blockIdx.x;
    const float* src = part + ((long)r * n_head + head) * splits * (HD + 2);
    float bm = RB_NEG_INF;
    for (int s = 0; s < splits; s++) bm = fmaxf(bm, src[s * (HD + 2)]);
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float sl = 0.0f, sv = 0.0f;
        for (int s = 0; s < splits; s++) {
            const float* p = src + s * (HD + 2);
            float f = p[0] == RB_NEG_INF ? 0.0f : expf(p[0] - bm);
            sl += p[1] * f;
            sv += p[2 + d] * f;
        }
        out[(long)r * n_head * HD + head * HD + d] = ST(sv / sl);
    }
}

// Prefill with the vendor BLAS: scores S = Q·Kᵀ of a chunk of queries come from a batched
// GEMM in f32; this turns each row into causal probabilities P (stored as store_t) for the
// second GEMM, O = P·V. Row r of batch b may see keys 0..=first_key + r.
extern "C" __global__ void rb_softmax_causal(const float* scores, store_t* probs, int n_keys, int rows, int first_key, int window) {
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

// `dyn_first`, when set, replaces first_pos with the value on the device (decode step record).
#define RB_ATTENTION(HD)                                                                                                  \
    extern "C" __global__ void rb_attention_tiled_##HD(const store_t* q, const store_t* kc, const store_t* vc, store_t* out, \
                                                       int rows, int n_head, int n_kv, int first_pos, const int* dyn_first, int window) { \
        rb_attention_tiled<HD>(q, kc, vc, out, rows, n_head, n_kv, first_pos, dyn_first, window);                         \
    }                                                                                                                     \
    extern "C" __global__ void rb_attention_part_##HD(const store_t* q, const store_t* kc, const store_t* vc, float* part,   \
                                                      int rows, int n_head, int n_kv, int first_pos, const int* dyn_first, int window) { \
        rb_attention_part<HD>(q, kc, vc, part, rows, n_head, n_kv, first_pos, dyn_first, window);                         \
    }                                                                                                                     \
    extern "C" __global__ void rb_attention_merge_##HD(const float* part, store_t* out, int n_head, int splits) {          \
        rb_attention_merge<HD>(part, out, n_head, splits);                                                                \
    }
RB_ATTENTION(64)
RB_ATTENTION(128)
RB_ATTENTION(256)

// ---------------------------------------------------------------- weights
// GGUF blocks dequantized on the device (the backend's own decoders; the reference uses
// candle's). One thread per block of the quant type.

__device__ __forceinline__ float rb_f16(const unsigned char* p) { return rb_half_to_float((unsigned short)(p[0] | (p[1] << 8))); }

extern "C" __global__ void rb_dequant_f32(const float* src, store_t* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ST(src[i]);
}

extern "C" __global__ void rb_dequant_f16(const unsigned short* src, store_t* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ST(rb_half_to_float(src[i]));
}

extern "C" __global__ void rb_dequant_bf16(const unsigned short* src, store_t* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = ST(rb_bf16_to_float(src[i]));
}

extern "C" __global__ void rb_dequant_q8_0(const unsigned char* src, store_t* out, long blocks) {
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    const unsigned char* p = src + b * 34;
    float d = rb_f16(p);
    for (int j = 0; j < 32; j++) out[b * 32 + j] = ST(d * (float)(signed char)p[2 + j]);
}

extern "C" __global__ void rb_dequant_q4_0(const unsigned char* src, store_t* out, long blocks) {
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

// Q6_K sub-block j: half j/4 of the block, quarter j%4 of it (value l + 32·quarter).
__device__ __forceinline__ void rb_sub_q6_k(const unsigned char* w, long s, float* v) {
    const unsigned char* p = w + (s >> 3) * 210;
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

// Decode matvecs on blocks (rows ≤ RB_GEMV_ROWS): one warp per output column, each lane
// decoding every RB_WARP-th sub-block of the column's weight row once for all rows of x
// (fused dequantization, f32 accumulation, summed over the warp).
// Prefill dequantizes a matrix with rb_qdequant_<type> into a transient workspace of the
// storage type and runs the dense GEMM on it (one thread per sub-block).
#define RB_QUANT_OPS(T, BV, BB)                                                                                      \
    extern "C" __global__ void rb_qgemv_##T(const unsigned char* w, const store_t* x, store_t* out, int rows, int k,  \
                                            int n) {                                                                 \
        const int j = rb_warp_column();                                                                              \
        if (j >= n) return;                                                                                          \
        const int lane = threadIdx.x % RB_WARP, subs = k / 32;                                                       \
        const unsigned char* row = w + (long)j * (k / BV) * BB;                                                     \
        float acc[RB_GEMV_ROWS];                                                                                     \
        _Pragma("unroll") for (int r = 0; r < RB_GEMV_ROWS; r++) acc[r] = 0.0f;                                     \
        for (int s = lane; s < subs; s += RB_WARP) {                                                                 \
            float v[32];                                                                                             \
            rb_sub_##T(row, s, v);                                                                                   \
            _Pragma("unroll") for (int r = 0; r < RB_GEMV_ROWS; r++) {                                              \
                if (r < rows) {                                                                                      \
                    const store_t* xs = x + (long)r * k + s * 32;                                                    \
                    float a = 0.0f;                                                                                  \
                    _Pragma("unroll") for (int i = 0; i < 32; i++) a += v[i] * LD(xs[i]);                           \
                    acc[r] += a;                                                                                     \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        _Pragma("unroll") for (int r = 0; r < RB_GEMV_ROWS; r++) for (int o = RB_WARP / 2; o > 0; o /= 2)           \
            acc[r] += RB_SHFL_XOR(acc[r], o);                                                                        \
        if (lane == 0)                                                                                               \
            for (int r = 0; r < rows; r++) out[(long)r * n + j] = ST(acc[r]);                                        \
    }                                                                                                                \
    extern "C" __global__ void rb_qdequant_##T(const unsigned char* w, store_t* out, long subs) {                   \
        const long s = (long)blockIdx.x * blockDim.x + threadIdx.x;                                                  \
        if (s >= subs) return;                                                                                       \
        float v[32];                                                                                                 \
        rb_sub_##T(w, s, v);                                                                                         \
        _Pragma("unroll") for (int i = 0; i < 32; i++) out[s * 32 + i] = ST(v[i]);                                   \
    }

RB_QUANT_OPS(q4_0, 32, 18)
RB_QUANT_OPS(q4_1, 32, 20)
RB_QUANT_OPS(q8_0, 32, 34)
RB_QUANT_OPS(q4_k, 256, 144)
RB_QUANT_OPS(q5_k, 256, 176)
RB_QUANT_OPS(q6_k, 256, 210)
