/* Writes one dump through include/resbisect_dump.h's identity and typed-tap calls, for
 * tests/integration/c_header.rs, which compiles it as C99 and as C++ with -Wall -Wextra
 * -Werror: an engine named "typed-writer", version "1.2.3", options {"cache":"q8_0",
 * "n_ubatch":32}, and blk.0 holding resid_post in f16 and attn_norm in bf16 (3 rows of
 * WIDTH values: row r, channel c holds ((r*WIDTH + c) % 64) / 4 - 2, exact in both types).
 *
 * typed_writer OUT_DIR MODEL_INFO_JSON WIDTH
 */
#define RESBISECT_DUMP_IMPLEMENTATION
#include "resbisect_dump.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* f32 -> f16 bits for the values written here (exact, normal, |x| < 65504). */
static uint16_t to_f16(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    uint16_t sign = (uint16_t)((b >> 16) & 0x8000u);
    if ((b & 0x7fffffffu) == 0) return sign;
    int exp = (int)((b >> 23) & 0xff) - 127 + 15;
    return (uint16_t)(sign | (uint16_t)(exp << 10) | (uint16_t)((b >> 13) & 0x3ffu));
}

/* f32 -> bf16 bits: the upper half (the values written here are exact in bf16). */
static uint16_t to_bf16(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return (uint16_t)(b >> 16);
}

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    size_t width = (size_t)strtoul(argv[3], NULL, 10), n = 3;
    uint16_t *half = (uint16_t *)calloc(n * width, sizeof *half);
    uint16_t *brain = (uint16_t *)calloc(n * width, sizeof *brain);
    if (!half || !brain) return 1;
    for (size_t i = 0; i < n * width; i++) {
        float v = (float)(i % 64) / 4.0f - 2.0f;
        half[i] = to_f16(v);
        brain[i] = to_bf16(v);
    }
    uint32_t tokens[3] = {1, 2, 3};
    int64_t positions[3] = {0, 1, 2};
    rbd_engine engine = {"typed-writer", "1.2.3", "cpu", "f16", "none", "{\"cache\":\"q8_0\",\"n_ubatch\":32}"};
    const char *ids[2] = {"blk.0.resid_post", "blk.0.attn_norm"};
    const void *data[2] = {half, brain};
    rbd_dtype dtypes[2] = {RBD_F16, RBD_BF16};
    size_t widths[2] = {width, width};
    rbd_dump d;
    int rc = rbd_begin_engine(&d, argv[1], &engine, argv[2], "p0", tokens, n, "[0]", "[\"resid_post\",\"attn_norm\"]",
                              "all");
    rc = rc || rbd_write_file_typed(&d, "p0", "blk.0", positions, n, 2, ids, data, dtypes, widths);
    rc = rc || rbd_finish(&d, NULL, NULL);
    if (rc) fprintf(stderr, "%s\n", rbd_error(&d));
    free(half);
    free(brain);
    return rc ? 1 : 0;
}
