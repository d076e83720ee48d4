/* resbisect_dump.h — single-header writer of resbisect dump format v1 for C, C++ and
 * HIP/CUDA host code (docs/dump-format.md, docs/engines.md).
 *
 * A complete program (tests/integration/c_header.rs compiles and runs it as written,
 * with gcc and clang under -std=c99 -Wall -Wextra -Werror). In the one translation unit
 * that defines RESBISECT_DUMP_IMPLEMENTATION, include this header before any system
 * header: it asks for the POSIX functions it uses (_POSIX_C_SOURCE) unless you did.
 *
 * EXAMPLE BEGIN
 *   #define RESBISECT_DUMP_IMPLEMENTATION
 *   #include "resbisect_dump.h"
 *   #include <stdio.h>
 *   #include <stdlib.h>
 *
 *   // usage: example OUT_DIR MODEL_INFO_JSON N_EMBD
 *   // (MODEL_INFO_JSON: the manifest "model" object resbisect passes as {model_info})
 *   int main(int argc, char **argv) {
 *       if (argc != 4) return 2;
 *       size_t width = (size_t)strtoul(argv[3], NULL, 10);
 *       uint32_t tokens[4] = {1, 17, 99, 5};
 *       int64_t positions[4] = {0, 1, 2, 3};
 *       float *rows = calloc(4 * width, sizeof *rows);  // your engine's layer-0 output
 *       if (!rows) return 1;
 *       for (size_t i = 0; i < 4 * width; i++) rows[i] = (float)i / (float)width;
 *       const char *ids[1] = {"blk.0.resid_post"};
 *       const float *data[1] = {rows};
 *       size_t widths[1] = {width};
 *       rbd_dump d;
 *       int rc = rbd_begin(&d, argv[1], "my-engine", "hip", "f32", "MI250X", argv[2],
 *                          "p0", tokens, 4, "[0]", "[\"resid_post\"]", "all");
 *       // one call per file: embed, blk.L (all of layer L's taps), output
 *       rc = rc || rbd_write_file(&d, "p0", "blk.0", positions, 4, 1, ids, data, widths);
 *       rc = rc || rbd_finish(&d, NULL, NULL);  // or rbd_finish(&d, "what failed", "blk.3.q")
 *       if (rc) fprintf(stderr, "%s\n", rbd_error(&d));
 *       free(rows);
 *       return rc ? 1 : 0;
 *   }
 * EXAMPLE END
 *
 * Every file is written under a temporary name and renamed when whole, and the manifest
 * says "running" until rbd_finish, so a crash leaves a readable partial dump. Functions
 * return 0 on success and -1 on failure (errno set by the failing call); rbd_error()
 * describes the last failure.
 *
 * An engine that knows more about itself than a name uses rbd_begin_engine: its version
 * and its options (a JSON object: cache types, batch sizes, flags) go into the manifest's
 * "engine", so reports tell two builds or configurations of one engine apart. Taps may be
 * written in f16 or bf16 (rbd_write_file_typed), as an engine holds them.
 */
#ifndef RESBISECT_DUMP_H
#define RESBISECT_DUMP_H

#if defined(RESBISECT_DUMP_IMPLEMENTATION) && !defined(__cplusplus) && !defined(_POSIX_C_SOURCE) && \
    !defined(_XOPEN_SOURCE) && !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE)
/* fileno, fsync, getpid and mkdir are POSIX, not C99; the request must come before the
 * first system header, hence here. */
#define _POSIX_C_SOURCE 200809L
#endif

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Who wrote the dump. version, backend, dtype, device: free text; options_json: a JSON
 * object as text, or NULL. */
typedef struct rbd_engine {
    const char *name;
    const char *version;
    const char *backend;
    const char *dtype;
    const char *device;
    const char *options_json;
} rbd_engine;

/* Storage type of a tap's values: IEEE f32, IEEE f16 (binary16), bf16 (f32's upper half). */
typedef enum rbd_dtype { RBD_F32 = 0, RBD_F16 = 1, RBD_BF16 = 2 } rbd_dtype;

typedef struct rbd_dump {
    char dir[4096];
    char *manifest_head; /* manifest text up to "status" (engine, model, prompts, selection) */
    char error[512];
} rbd_dump;

/* Create `dir` (must be absent or empty: a directory holding anything is refused, and left
 * as it is, as are later calls on `d`) and write the manifest with status "running".
 * model_info_path: the JSON file resbisect passes as {model_info} (the manifest's "model").
 * layers_json / taps_json: JSON arrays as text; positions_spec: e.g. "all" or "0..16". */
int rbd_begin(rbd_dump *d, const char *dir, const char *engine, const char *backend, const char *dtype,
              const char *device, const char *model_info_path, const char *prompt_id, const uint32_t *tokens,
              size_t n_tokens, const char *layers_json, const char *taps_json, const char *positions_spec);

/* rbd_begin with the engine's full identity (version "c-writer" in rbd_begin). */
int rbd_begin_engine(rbd_dump *d, const char *dir, const rbd_engine *engine, const char *model_info_path,
                     const char *prompt_id, const uint32_t *tokens, size_t n_tokens, const char *layers_json,
                     const char *taps_json, const char *positions_spec);

/* Write data/<prompt_id>/<stem>.safetensors: `positions` (n, strictly increasing) and
 * n_taps f32 tensors, tap i named ids[i] with n rows of widths[i] values in data[i]. */
int rbd_write_file(rbd_dump *d, const char *prompt_id, const char *stem, const int64_t *positions, size_t n,
                   size_t n_taps, const char *const *ids, const float *const *data, const size_t *widths);

/* rbd_write_file with each tap in its own storage type: data[i] holds n * widths[i]
 * values of dtypes[i] (f16/bf16 as uint16_t bit patterns). */
int rbd_write_file_typed(rbd_dump *d, const char *prompt_id, const char *stem, const int64_t *positions, size_t n,
                         size_t n_taps, const char *const *ids, const void *const *data, const rbd_dtype *dtypes,
                         const size_t *widths);

/* Mark the dump complete (error == NULL) or failed with the error and the last tap written. */
int rbd_finish(rbd_dump *d, const char *error, const char *last_tap);

const char *rbd_error(const rbd_dump *d);

#ifdef __cplusplus
}
#endif

#ifdef RESBISECT_DUMP_IMPLEMENTATION

#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* A growable text buffer. */
typedef struct {
    char *p;
    size_t len, cap;
} rbd__buf;

static int rbd__put(rbd__buf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? room : 0, fmt, ap);
        va_end(ap);
        if (n < 0) return -1;
        if (b->p && (size_t)n < room) {
            b->len += (size_t)n;
            return 0;
        }
        size_t cap = (b->cap + (size_t)n + 1) * 2;
        char *p = (char *)realloc(b->p, cap);
        if (!p) return -1;
        b->p = p;
        b->cap = cap;
    }
}

/* A JSON string literal (quotes included), escaping what JSON requires. */
static int rbd__put_json_string(rbd__buf *b, const char *s) {
    if (rbd__put(b, "\"")) return -1;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            if (rbd__put(b, "\\%c", c)) return -1;
        } else if (c < 0x20) {
            if (rbd__put(b, "\\u%04x", c)) return -1;
        } else if (rbd__put(b, "%c", c)) {
            return -1;
        }
    }
    return rbd__put(b, "\"");
}

/* snprintf through a va_list: -1 when the text did not fit (it is cut short then). Also
 * keeps gcc's -Wformat-truncation quiet, as every caller handles or accepts the cut. */
static int rbd__format(char *dst, size_t size, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(dst, size, fmt, ap);
    va_end(ap);
    return (n < 0 || (size_t)n >= size) ? -1 : 0;
}

static int rbd__fail(rbd_dump *d, const char *what, const char *path) {
    /* A message cut at sizeof d->error is still a message. */
    (void)rbd__format(d->error, sizeof d->error, "%s %s: %s", what, path ? path : "", strerror(errno));
    return -1;
}

/* A path from a format, or a failure naming the part that made it too long. */
static int rbd__path(rbd_dump *d, char *dst, size_t size, const char *fmt, const char *a, const char *b,
                     const char *c) {
    if (!rbd__format(dst, size, fmt, a, b, c)) return 0;
    errno = ENAMETOOLONG;
    return rbd__fail(d, "path too long:", dst);
}

static int rbd__mkdirs(const char *path) {
    char tmp[4096];
    if (strlen(path) >= sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(tmp, path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0777) && errno != EEXIST) return -1;
            *p = '/';
        }
    }
    return (mkdir(tmp, 0777) && errno != EEXIST) ? -1 : 0;
}

/* 0 when `dir` holds no entry; -1 with errno ENOTEMPTY when it does (a dump written there
 * would mix with, or replace, what it holds), or with opendir's errno. */
static int rbd__check_empty(const char *dir) {
    DIR *dp = opendir(dir);
    if (!dp) return -1;
    int found = 0;
    for (struct dirent *e; !found && (e = readdir(dp));)
        found = strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(dp);
    if (!found) return 0;
    errno = ENOTEMPTY;
    return -1;
}

/* 0 when `id` is a prompt id of the format ([A-Za-z0-9_.-]{1,64}, never "." or ".."): it
 * names a directory under data/, so nothing else may leave the dump. */
static int rbd__check_prompt_id(rbd_dump *d, const char *id) {
    size_t n = strlen(id), ok = n >= 1 && n <= 64 && strcmp(id, ".") != 0 && strcmp(id, "..") != 0;
    for (size_t i = 0; ok && i < n; i++) {
        char c = id[i];
        ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
    }
    if (ok) return 0;
    errno = EINVAL;
    return rbd__fail(d, "bad prompt id (1-64 characters of A-Z a-z 0-9 _ . -):", id);
}

/* Write `len` bytes to `path` through a temporary name and a rename. */
static int rbd__write_atomic(rbd_dump *d, const char *path, const void *const *parts, const size_t *lens, size_t n_parts) {
    char tmp[4200];
    const char *slash = strrchr(path, '/');
    size_t dirlen = slash ? (size_t)(slash - path + 1) : 0;
    if (rbd__format(tmp, sizeof tmp, "%.*s.%s.tmp-%ld", (int)dirlen, path, path + dirlen, (long)getpid())) {
        errno = ENAMETOOLONG;
        return rbd__fail(d, "path too long:", path);
    }
    FILE *f = fopen(tmp, "wb");
    if (!f) return rbd__fail(d, "cannot create", tmp);
    for (size_t i = 0; i < n_parts; i++) {
        if (lens[i] && fwrite(parts[i], 1, lens[i], f) != lens[i]) {
            fclose(f);
            return rbd__fail(d, "cannot write", tmp);
        }
    }
    if (fflush(f) || fsync(fileno(f)) || fclose(f)) return rbd__fail(d, "cannot write", tmp);
    if (rename(tmp, path)) return rbd__fail(d, "cannot rename", tmp);
    return 0;
}

static int rbd__write_manifest(rbd_dump *d, const char *status, const char *error, const char *last_tap) {
    rbd__buf b = {NULL, 0, 0};
    int rc = rbd__put(&b, "%s\"status\":\"%s\",\"error\":", d->manifest_head, status);
    if (!rc && error) {
        rc = rbd__put(&b, "{\"message\":") || rbd__put_json_string(&b, error);
        if (!rc && last_tap) rc = rbd__put(&b, ",\"tap\":") || rbd__put_json_string(&b, last_tap);
        if (!rc) rc = rbd__put(&b, "}");
    } else if (!rc) {
        rc = rbd__put(&b, "null");
    }
    if (!rc) rc = rbd__put(&b, "}\n");
    if (rc) {
        free(b.p);
        errno = ENOMEM;
        return rbd__fail(d, "out of memory for", "manifest.json");
    }
    char path[4200];
    if (rbd__path(d, path, sizeof path, "%s/%s%s", d->dir, "manifest.json", "")) {
        free(b.p);
        return -1;
    }
    const void *parts[1] = {b.p};
    size_t lens[1] = {b.len};
    rc = rbd__write_atomic(d, path, parts, lens, 1);
    free(b.p);
    return rc;
}

int rbd_begin(rbd_dump *d, const char *dir, const char *engine, const char *backend, const char *dtype,
              const char *device, const char *model_info_path, const char *prompt_id, const uint32_t *tokens,
              size_t n_tokens, const char *layers_json, const char *taps_json, const char *positions_spec) {
    rbd_engine e;
    e.name = engine;
    e.version = "c-writer";
    e.backend = backend;
    e.dtype = dtype;
    e.device = device;
    e.options_json = NULL;
    return rbd_begin_engine(d, dir, &e, model_info_path, prompt_id, tokens, n_tokens, layers_json, taps_json,
                            positions_spec);
}

int rbd_begin_engine(rbd_dump *d, const char *dir, const rbd_engine *engine, const char *model_info_path,
                     const char *prompt_id, const uint32_t *tokens, size_t n_tokens, const char *layers_json,
                     const char *taps_json, const char *positions_spec) {
    memset(d, 0, sizeof *d);
    if (rbd__check_prompt_id(d, prompt_id)) return -1;
    if (strlen(dir) >= sizeof d->dir) {
        errno = ENAMETOOLONG;
        return rbd__fail(d, "dump directory name too long", dir);
    }
    strcpy(d->dir, dir);
    FILE *mf = fopen(model_info_path, "rb");
    if (!mf) return rbd__fail(d, "cannot read the model info", model_info_path);
    rbd__buf model = {NULL, 0, 0};
    char chunk[4096];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, mf)) > 0) {
        if (rbd__put(&model, "%.*s", (int)got, chunk)) break;
    }
    fclose(mf);
    while (model.len && (model.p[model.len - 1] == '\n' || model.p[model.len - 1] == ' ')) model.p[--model.len] = 0;
    if (!model.len) {
        free(model.p);
        errno = EINVAL;
        return rbd__fail(d, "empty model info", model_info_path);
    }
    if (rbd__mkdirs(dir)) {
        free(model.p);
        return rbd__fail(d, "cannot create", dir);
    }
    if (rbd__check_empty(dir)) {
        free(model.p);
        return rbd__fail(d, "refusing to write a dump into", dir);
    }
    rbd__buf b = {NULL, 0, 0};
    int rc = rbd__put(&b, "{\"format\":\"resbisect.dump\",\"version\":1,\"engine\":{\"name\":");
    rc = rc || rbd__put_json_string(&b, engine->name) || rbd__put(&b, ",\"version\":");
    rc = rc || rbd__put_json_string(&b, engine->version) || rbd__put(&b, ",\"backend\":");
    rc = rc || rbd__put_json_string(&b, engine->backend) || rbd__put(&b, ",\"dtype\":");
    rc = rc || rbd__put_json_string(&b, engine->dtype) || rbd__put(&b, ",\"device\":");
    rc = rc || rbd__put_json_string(&b, engine->device);
    if (!rc && engine->options_json) rc = rbd__put(&b, ",\"options\":%s", engine->options_json);
    rc = rc || rbd__put(&b, "},\"model\":%s,\"prompts\":[{\"id\":", model.p) || rbd__put_json_string(&b, prompt_id);
    rc = rc || rbd__put(&b, ",\"text\":null,\"tokens\":[");
    for (size_t i = 0; !rc && i < n_tokens; i++) rc = rbd__put(&b, i ? ",%u" : "%u", tokens[i]);
    rc = rc || rbd__put(&b, "]}],\"selection\":{\"layers\":%s,\"taps\":%s,\"positions\":", layers_json, taps_json);
    char created[32] = "1970-01-01T00:00:00Z";
    time_t now = time(NULL);
    struct tm *utc = gmtime(&now);
    if (utc) strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", utc);
    rc = rc || rbd__put_json_string(&b, positions_spec) || rbd__put(&b, "},\"created\":\"%s\",", created);
    free(model.p);
    if (rc) {
        free(b.p);
        errno = ENOMEM;
        return rbd__fail(d, "out of memory for", "manifest.json");
    }
    d->manifest_head = b.p;
    return rbd__write_manifest(d, "running", NULL, NULL);
}

int rbd_write_file(rbd_dump *d, const char *prompt_id, const char *stem, const int64_t *positions, size_t n,
                   size_t n_taps, const char *const *ids, const float *const *data, const size_t *widths) {
    const void **untyped = (const void **)calloc(n_taps ? n_taps : 1, sizeof *untyped);
    rbd_dtype *dtypes = (rbd_dtype *)calloc(n_taps ? n_taps : 1, sizeof *dtypes);
    int rc = -1;
    if (untyped && dtypes) {
        for (size_t i = 0; i < n_taps; i++) untyped[i] = data[i], dtypes[i] = RBD_F32;
        rc = rbd_write_file_typed(d, prompt_id, stem, positions, n, n_taps, ids, untyped, dtypes, widths);
    } else {
        errno = ENOMEM;
        rbd__fail(d, "out of memory for", stem);
    }
    free(untyped);
    free(dtypes);
    return rc;
}

static size_t rbd__dtype_size(rbd_dtype t) {
    return t == RBD_F32 ? 4 : 2;
}

int rbd_write_file_typed(rbd_dump *d, const char *prompt_id, const char *stem, const int64_t *positions, size_t n,
                         size_t n_taps, const char *const *ids, const void *const *data, const rbd_dtype *dtypes,
                         const size_t *widths) {
    static const char *const names[3] = {"F32", "F16", "BF16"};
    char path[4200];
    if (!d->manifest_head) return -1; /* no dump begun: rbd_error() still says why */
    if (rbd__check_prompt_id(d, prompt_id)) return -1;
    if (rbd__path(d, path, sizeof path, "%s/data/%s%s", d->dir, prompt_id, "")) return -1;
    if (rbd__mkdirs(path)) return rbd__fail(d, "cannot create", path);
    if (rbd__path(d, path, sizeof path, "%s/data/%s/%s.safetensors", d->dir, prompt_id, stem)) return -1;
    /* Header: positions first, then the taps, back to back in that order. */
    rbd__buf h = {NULL, 0, 0};
    size_t off = n * 8;
    int rc = rbd__put(&h, "{\"positions\":{\"dtype\":\"I64\",\"shape\":[%zu],\"data_offsets\":[0,%zu]}", n, off);
    for (size_t i = 0; !rc && i < n_taps; i++) {
        if ((unsigned)dtypes[i] > RBD_BF16) {
            free(h.p);
            errno = EINVAL;
            return rbd__fail(d, "unknown tap dtype for", ids[i]);
        }
        size_t bytes = n * widths[i] * rbd__dtype_size(dtypes[i]);
        rc = rbd__put(&h, ",") || rbd__put_json_string(&h, ids[i]) ||
             rbd__put(&h, ":{\"dtype\":\"%s\",\"shape\":[%zu,%zu],\"data_offsets\":[%zu,%zu]}", names[dtypes[i]], n,
                      widths[i], off, off + bytes);
        off += bytes;
    }
    rc = rc || rbd__put(&h, "}");
    while (!rc && h.len % 8) rc = rbd__put(&h, " ");
    if (rc) {
        free(h.p);
        errno = ENOMEM;
        return rbd__fail(d, "out of memory for", path);
    }
    uint8_t len_le[8];
    for (int i = 0; i < 8; i++) len_le[i] = (uint8_t)((uint64_t)h.len >> (8 * i));
    size_t n_parts = 3 + n_taps;
    const void **parts = (const void **)calloc(n_parts, sizeof *parts);
    size_t *lens = (size_t *)calloc(n_parts, sizeof *lens);
    if (!parts || !lens) {
        free(parts);
        free(lens);
        free(h.p);
        errno = ENOMEM;
        return rbd__fail(d, "out of memory for", path);
    }
    /* Little-endian hosts only (x86-64, AArch64): values are written as they lie in memory. */
    parts[0] = len_le, lens[0] = 8;
    parts[1] = h.p, lens[1] = h.len;
    parts[2] = positions, lens[2] = n * 8;
    for (size_t i = 0; i < n_taps; i++) parts[3 + i] = data[i], lens[3 + i] = n * widths[i] * rbd__dtype_size(dtypes[i]);
    rc = rbd__write_atomic(d, path, parts, lens, n_parts);
    free(parts);
    free(lens);
    free(h.p);
    return rc;
}

int rbd_finish(rbd_dump *d, const char *error, const char *last_tap) {
    /* After a failed rbd_begin the directory is not this dump's: leave it as it is. */
    if (!d->manifest_head) return -1;
    int rc = rbd__write_manifest(d, error ? "failed" : "complete", error, last_tap);
    free(d->manifest_head);
    d->manifest_head = NULL;
    return rc;
}

const char *rbd_error(const rbd_dump *d) {
    return d->error;
}

#endif /* RESBISECT_DUMP_IMPLEMENTATION */
#endif /* RESBISECT_DUMP_H */
