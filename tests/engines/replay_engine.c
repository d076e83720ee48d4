/* A small external engine in C for the integration tests, written with
 * include/resbisect_dump.h: it "computes" by reading a source engine's tensors (raw f32
 * files <src>/<tap id>.f32, [positions, width], prepared by the test) and adds a bug:
 * from layer --bug-layer on (from its tap --bug-tap on, default attn_norm), every tap at
 * positions >= --bug-pos is offset by --bug-value, as an error that propagates downstream
 * would be. --bug-lookahead 1 makes the bug need the next token, as a causal mask off by
 * one does: the last position of the prompt it is given stays clean; --bug-last-row 1 makes
 * it act on that last position only, as an engine that computes a prompt's last row apart
 * (a decode kernel, pruned output rows) does. --crash-before STEM
 * aborts before writing that file group, leaving a partial dump as a crashing engine does;
 * --hang-before STEM stops there for good instead, as a deadlocked engine does.
 * --bug-runs FILE makes the engine nondeterministic: it counts its runs in FILE, and the
 * bug acts on odd-numbered runs only (--bug-runs-mode odd) or on the first only (first).
 * --label-shift S --label-from L labels its taps off by S layers from layer L on: it
 * writes layer L - S's tensors under blk.L (where the source has that layer), as an
 * engine that names its graph's nodes one layer off does.
 *
 * replay_engine --src DIR --model-info F --tokens F --prompt-id ID --layers L --taps T
 *               --positions SPEC --out DIR [--bug-layer L --bug-pos P --bug-value V
 *               --bug-tap T --bug-lookahead 1 | --bug-last-row 1 --bug-runs FILE
 *               --bug-runs-mode odd|first] [--label-shift S --label-from L]
 *               [--crash-before STEM | --hang-before STEM]
 */
#define RESBISECT_DUMP_IMPLEMENTATION
#include "../../include/resbisect_dump.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *LAYER_TAPS[] = {"attn_norm", "q", "k", "v", "attn", "attn_out", "resid_mid",
                                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_act", "ffn_out", "resid_post"};
enum { N_LAYER_TAPS = 13 };

static const char *arg(int argc, char **argv, const char *name, const char *fallback) {
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    if (!fallback) {
        fprintf(stderr, "replay_engine: missing %s\n", name);
        exit(2);
    }
    return fallback;
}

static int listed(const char *list, const char *item) {
    size_t n = strlen(item);
    for (const char *p = list; p && *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && !strncmp(p, item, n)) return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

/* Rows [from, n) of a tap from the source, with the bug applied. */
static float *load_rows(const char *src, const char *id, size_t from, size_t n, size_t *width, int buggy,
                        long bug_pos, float bug_value, int lookahead) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.f32", src, id);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    char wpath[4096];
    snprintf(wpath, sizeof wpath, "%s/%s.width", src, id);
    FILE *wf = fopen(wpath, "r");
    if (!wf || fscanf(wf, "%zu", width) != 1) exit(2);
    fclose(wf);
    size_t total = (size_t)bytes / 4 / *width;
    if (n > total) exit(2);
    float *all = malloc((size_t)bytes);
    if (fread(all, 1, (size_t)bytes, f) != (size_t)bytes) exit(2);
    fclose(f);
    float *rows = malloc((n - from) * *width * 4);
    for (size_t r = from; r < n; r++)
        for (size_t c = 0; c < *width; c++)
            rows[(r - from) * *width + c] =
                all[r * *width + c] +
                ((buggy && (long)r >= bug_pos && (lookahead != 1 || r + 1 < n) && (lookahead != 2 || r + 1 == n))
                     ? bug_value
                     : 0.0f);
    free(all);
    return rows;
}

int main(int argc, char **argv) {
    const char *src = arg(argc, argv, "--src", NULL), *out = arg(argc, argv, "--out", NULL);
    const char *layers = arg(argc, argv, "--layers", NULL), *taps = arg(argc, argv, "--taps", NULL);
    const char *spec = arg(argc, argv, "--positions", NULL), *id = arg(argc, argv, "--prompt-id", NULL);
    long bug_layer = atol(arg(argc, argv, "--bug-layer", "1000000"));
    long bug_pos = atol(arg(argc, argv, "--bug-pos", "0"));
    float bug_value = (float)atof(arg(argc, argv, "--bug-value", "0"));
    const char *crash_before = arg(argc, argv, "--crash-before", "");
    const char *hang_before = arg(argc, argv, "--hang-before", "");
    const char *bug_tap = arg(argc, argv, "--bug-tap", "attn_norm");
    long label_shift = atol(arg(argc, argv, "--label-shift", "0"));
    long label_from = atol(arg(argc, argv, "--label-from", "0"));
    /* 1: the bug spares the prompt's last row; 2: it acts there only. */
    int lookahead = atoi(arg(argc, argv, "--bug-lookahead", "0")) ? 1 : atoi(arg(argc, argv, "--bug-last-row", "0")) ? 2 : 0;
    const char *runs = arg(argc, argv, "--bug-runs", "");
    if (*runs) {
        long run = 0;
        FILE *rf = fopen(runs, "r");
        if (rf) {
            if (fscanf(rf, "%ld", &run) != 1) run = 0;
            fclose(rf);
        }
        run++;
        rf = fopen(runs, "w");
        if (!rf) return 2;
        fprintf(rf, "%ld\n", run);
        fclose(rf);
        int first_only = !strcmp(arg(argc, argv, "--bug-runs-mode", "odd"), "first");
        if (first_only ? run != 1 : run % 2 == 0) bug_layer = 1000000;
    }
    int bug_tap_index = 0;
    while (bug_tap_index < N_LAYER_TAPS && strcmp(LAYER_TAPS[bug_tap_index], bug_tap)) bug_tap_index++;

    FILE *tf = fopen(arg(argc, argv, "--tokens", NULL), "r");
    if (!tf) return 2;
    uint32_t tokens[65536];
    size_t n = 0;
    while (n < 65536 && fscanf(tf, "%u", &tokens[n]) == 1) {
        n++;
        if (fgetc(tf) != ',') break;
    }
    fclose(tf);
    size_t from = 0;
    if (strcmp(spec, "all")) {
        if (!strstr(spec, "..") || sscanf(spec, "%zu..", &from) != 1 || from >= n) {
            fprintf(stderr, "replay_engine: positions %s not supported\n", spec);
            return 2;
        }
    }
    char layers_json[4096] = "[", taps_json[4096] = "[";
    if (strcmp(layers, "none")) {
        strcat(layers_json, layers);
    }
    strcat(layers_json, "]");
    for (const char *p = taps; *p; p++) {
        if (p == taps || p[-1] == ',') strcat(taps_json, "\"");
        strncat(taps_json, p, 1);
        if (p[1] == ',' || !p[1]) strcat(taps_json, "\"");
    }
    strcat(taps_json, "]");

    rbd_dump d;
    if (rbd_begin(&d, out, "replay-engine", "c", "f32", "cpu", arg(argc, argv, "--model-info", NULL), id, tokens, n,
                  layers_json, taps_json, spec)) {
        fprintf(stderr, "replay_engine: %s\n", rbd_error(&d));
        return 2;
    }
    int64_t *positions = malloc((n - from) * 8);
    for (size_t i = from; i < n; i++) positions[i - from] = (int64_t)i;

    /* File groups in topological order: embed, blk.L, output. */
    char stem[64], tap_id[96];
    const char *ids[N_LAYER_TAPS];
    char id_store[N_LAYER_TAPS][96];
    float *data[N_LAYER_TAPS];
    size_t widths[N_LAYER_TAPS];
    int tap_index[N_LAYER_TAPS] = {0};
    for (long group = -1; group <= 100000; group++) {
        size_t k = 0;
        int last = 0;
        if (group == -1) {
            snprintf(stem, sizeof stem, "embed");
            if (listed(taps, "embed")) snprintf(id_store[k], 96, "embed"), k++;
        } else {
            snprintf(stem, sizeof stem, "blk.%ld", group);
            char path[4096];
            snprintf(path, sizeof path, "%s/blk.%ld.resid_post.f32", src, group);
            FILE *probe = fopen(path, "rb");
            if (!probe) {
                snprintf(stem, sizeof stem, "output");
                last = 1;
                for (int t = 0; t < 2; t++) {
                    const char *name = t ? "logits" : "final_norm";
                    if (listed(taps, name)) snprintf(id_store[k], 96, "%s", name), k++;
                }
            } else {
                fclose(probe);
                char lname[32];
                snprintf(lname, sizeof lname, "%ld", group);
                if (listed(layers, lname))
                    for (int t = 0; t < N_LAYER_TAPS; t++)
                        if (listed(taps, LAYER_TAPS[t])) snprintf(id_store[k], 96, "blk.%ld.%s", group, LAYER_TAPS[t]), tap_index[k] = t, k++;
            }
        }
        if (k) {
            if (!strcmp(stem, crash_before)) {
                fprintf(stderr, "replay_engine: simulated crash before %s\n", stem);
                abort();
            }
            if (!strcmp(stem, hang_before)) {
                fprintf(stderr, "replay_engine: simulated hang before %s\n", stem);
                for (;;) pause();
            }
            for (size_t i = 0; i < k; i++) {
                ids[i] = id_store[i];
                int buggy = last || group > bug_layer || (group == bug_layer && tap_index[i] >= bug_tap_index);
                /* The source of a mislabeled tap: the same tap of layer group - label_shift. */
                char source[96];
                snprintf(source, sizeof source, "%s", ids[i]);
                if (!last && group >= label_from && label_shift) {
                    char path[4096];
                    snprintf(source, sizeof source, "blk.%ld.%s", group - label_shift, LAYER_TAPS[tap_index[i]]);
                    snprintf(path, sizeof path, "%s/%s.f32", src, source);
                    if (group - label_shift < 0 || access(path, R_OK)) snprintf(source, sizeof source, "%s", ids[i]);
                }
                data[i] = load_rows(src, source, from, n, &widths[i], buggy, bug_pos, bug_value, lookahead);
                if (!data[i]) {
                    snprintf(tap_id, sizeof tap_id, "%s", ids[i]);
                    fprintf(stderr, "replay_engine: no source for %s\n", tap_id);
                    return 2;
                }
            }
            if (rbd_write_file(&d, id, stem, positions, n - from, k, ids, (const float *const *)data, widths)) {
                fprintf(stderr, "replay_engine: %s\n", rbd_error(&d));
                return 2;
            }
            for (size_t i = 0; i < k; i++) free(data[i]);
        }
        if (last) break;
    }
    free(positions);
    return rbd_finish(&d, NULL, NULL) ? 2 : 0;
}
