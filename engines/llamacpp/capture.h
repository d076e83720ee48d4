// Capture of llama.cpp graph nodes as canonical taps (docs/taps.md) through
// llama_context_params.cb_eval, with each row placed at its absolute prompt position.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

struct ggml_tensor;

// One tap's captured rows: absolute position -> width f32 values.
struct TapRows {
    size_t width = 0;
    std::map<int64_t, std::vector<float>> rows;
};

class Capture {
  public:
    // taps: short canonical names wanted; layers: wanted layers; positions: rows to keep;
    // outputs: per prompt position, whether llama.cpp was asked for its output row (logits).
    Capture(std::set<std::string> taps, std::vector<int> layers, const std::vector<int64_t> &positions,
            std::vector<bool> outputs);

    // The ggml_backend_sched_eval_callback: `ask` is the scheduler asking whether we want t.
    static bool callback(ggml_tensor *t, bool ask, void *self);

    // Captured rows by canonical tap id ("embed", "blk.3.q", "logits").
    const std::map<std::string, TapRows> &taps() const { return taps_; }
    // A problem met while capturing (a node whose rows match neither the micro-batch nor
    // its outputs); empty when none.
    const std::string &error() const { return error_; }
    // Whether `tap` (a short name: attn_norm, q, resid_post, logits, ...) is one the
    // adapter can capture from llama.cpp's graph.
    static bool captures(const std::string &tap);

  private:
    // The canonical id a node stands for, or "" when it is not wanted.
    std::string tap_of(const ggml_tensor *t) const;
    // The `attn` tap id `t` carries as its input (t an attention output projection), or "".
    std::string attn_of(const ggml_tensor *t) const;
    // Capture t's rows as tap `id`: `rows` of them, or, when 0, as its shape says.
    void take(const ggml_tensor *t, const std::string &id, int64_t rows);

    std::set<std::string> short_taps_;
    std::set<int> layers_;
    std::vector<bool> keep_;     // per position: written to the dump
    std::vector<bool> outputs_;  // per position: an output row of llama.cpp
    // The micro-batch being computed: llama_decode splits a batch into micro-batches in
    // order, and each graph starts with the `embd` node (the token embedding rows).
    int64_t ubatch_start_ = 0, ubatch_tokens_ = 0, next_start_ = 0;
    std::set<int> ffn_out_seen_;  // layers whose first `ffn_out-L` (before the residual add) was taken
    std::map<std::string, TapRows> taps_;
    std::string error_;
};
