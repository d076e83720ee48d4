// Measures the GPU's approximate reciprocal and reciprocal square root (rcp.approx.ftz.f32,
// rsqrt.approx.ftz.f32: what ggml-cuda's `-use_fast_math` code runs) for every f32 input
// of [1, 2) and [1, 4), against the correctly rounded results, and writes the offsets in
// ulps packed 2 bits per input (code = offset + 1, code 3 = -2), the tables the
// `llamacpp-cuda` profile reads (crates/reference/src/mufu.rs). It also checks that the
// offsets shift with the exponent alone and that div.approx.ftz(a, b) = a × rcp.approx(b).
// Build and run on a GPU machine: scripts/mufu-tables.sh.
#include <cstdint>
#include <cstdio>
#include <vector>

__device__ float rcp_approx(float x) { float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
__device__ float rsqrt_approx(float x) { float r; asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r; }
__device__ float div_approx(float a, float b) { float r; asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b)); return r; }

// bad[0]: offsets outside -2..1; bad[1]: results not scaling with the exponent; bad[2]: div.approx ≠ a·rcp(b).
__global__ void measure(int8_t* rcp_off, int8_t* rsqrt_off, unsigned long long* bad) {
    const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (1u << 24)) return;
    const float x = __uint_as_float(0x3f800000u + i);  // [1, 4)
    const int rs = (int)__float_as_uint(rsqrt_approx(x)) - (int)__float_as_uint(__frsqrt_rn(x));
    rsqrt_off[i] = (int8_t)rs;
    if (rs < -2 || rs > 1) atomicAdd(&bad[0], 1ull);
    for (int k = -15; k <= 15; k += 2)
        if (__float_as_uint(rsqrt_approx(ldexpf(x, 2 * k))) != __float_as_uint(ldexpf(rsqrt_approx(x), -k))) atomicAdd(&bad[1], 1ull);
    if (i >= (1u << 23)) return;  // rcp: [1, 2) only
    const float r = rcp_approx(x);
    const int rc = (int)__float_as_uint(r) - (int)__float_as_uint(__frcp_rn(x));
    rcp_off[i] = (int8_t)rc;
    if (rc < -2 || rc > 1) atomicAdd(&bad[0], 1ull);
    for (int k = -30; k <= 30; k += 3) {
        const float s = ldexpf(x, k);
        if (__float_as_uint(rcp_approx(s)) != __float_as_uint(ldexpf(r, -k))) atomicAdd(&bad[1], 1ull);
        const float a = __uint_as_float(0x3e000000u ^ (i * 2654435761u >> 9)) * (k & 1 ? -1.0f : 1.0f);
        if (__float_as_uint(div_approx(a, s)) != __float_as_uint(__fmul_rn(a, rcp_approx(s)))) atomicAdd(&bad[2], 1ull);
    }
}

static void write_packed(const char* path, const std::vector<int8_t>& off) {
    std::vector<uint8_t> packed(off.size() / 4, 0);
    long counts[4] = {0, 0, 0, 0};
    for (size_t i = 0; i < off.size(); i++) {
        const int code = (off[i] + 1) & 3;
        counts[(off[i] + 2) & 3]++;
        packed[i / 4] |= (uint8_t)(code << (2 * (i % 4)));
    }
    FILE* f = fopen(path, "wb");
    fwrite(packed.data(), 1, packed.size(), f);
    fclose(f);
    printf("%s: offsets -2, -1, 0, +1: %ld %ld %ld %ld\n", path, counts[0], counts[1], counts[2], counts[3]);
}

int main(int argc, char** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s RCP_OUT RSQRT_OUT\n", argv[0]); return 2; }
    const uint32_t n = 1u << 24;
    int8_t *rcp_d, *rsqrt_d;
    unsigned long long* bad_d;
    cudaMalloc(&rcp_d, n / 2); cudaMalloc(&rsqrt_d, n); cudaMalloc(&bad_d, 24); cudaMemset(bad_d, 0, 24);
    measure<<<n / 256, 256>>>(rcp_d, rsqrt_d, bad_d);
    std::vector<int8_t> rcp(n / 2), rsqrt(n);
    unsigned long long bad[3];
    cudaMemcpy(rcp.data(), rcp_d, n / 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(rsqrt.data(), rsqrt_d, n, cudaMemcpyDeviceToHost);
    cudaMemcpy(bad, bad_d, 24, cudaMemcpyDeviceToHost);
    printf("cuda: %s; out of range %llu, exponent-dependent %llu, div.approx != a*rcp(b) %llu\n",
           cudaGetErrorString(cudaGetLastError()), bad[0], bad[1], bad[2]);
    write_packed(argv[1], rcp);
    write_packed(argv[2], rsqrt);
    return bad[0] || bad[1] || bad[2] ? 1 : 0;
}
