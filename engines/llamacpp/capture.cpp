// Graph node -> canonical tap mapping and row capture for the llama.cpp adapter. The
// naming traps of llama.cpp's llama graph (src/models/llama.cpp, src/llama-graph.cpp):
//  - `Qcur-L`/`Kcur-L` name up to three nodes (MUL_MAT, the reshape, the ROPE): the ROPE
//    output is `q`/`k`, the last other node before it is `q_pre_rope`/`k_pre_rope`;
//  - the token embedding is `embd` (a GET_ROWS); `inp_embd` is an input that stays unset;
//    models that scale it (Gemma 3) name the scaled one `inp_scaled`, which comes after
//    `embd` and so replaces its rows;
//  - with Q/K norms (Qwen3, Gemma 3) the input to RoPE is `Qcur_normed-L`/`Kcur_normed-L`,
//    after the plain `Qcur-L` reshape, whose rows it replaces;
//  - Gemma 3's residual after attention is `sa_out-L` and its gated GELU `ffn_geglu-L`;
//  - `ffn_out-L` names the down projection and then the residual add, which `l_out-L`
//    renames unless a control vector is applied: the first `ffn_out-L` is `ffn_out`;
//  - in the last layer, after `attn_out`, and at the output, only the output rows exist
//    (llama.cpp drops the other rows with inp_out_ids);
//  - `kqv_out-L` is the attention output only when the V cache is not quantized: with a
//    quantized V cache llama.cpp rotates V by a Hadamard matrix and rotates the attention
//    output back after `kqv_out-L`, in unnamed nodes (llama-graph.cpp build_attn,
//    llama_mul_mat_hadamard). So `attn` is taken as what it is by definition, the input
//    of the attention output projection: src[1] of the MUL_MAT by `blk.L.attn_output.weight`.
#include "capture.h"

#include <cstdio>
#include <cstring>

#include "ggml-backend.h"
#include "ggml.h"

namespace {
// llama.cpp node base name -> canonical short tap name (crates/taps alias table).
const std::map<std::string, std::string> LAYER_NODES = {
    {"attn_norm", "attn_norm"}, {"Vcur", "v"},           {"attn_out", "attn_out"},
    {"ffn_inp", "resid_mid"},   {"ffn_norm", "ffn_norm"}, {"ffn_gate", "ffn_gate"}, {"ffn_up", "ffn_up"},
    {"ffn_swiglu", "ffn_act"},  {"ffn_out", "ffn_out"},  {"l_out", "resid_post"},
    {"sa_out", "resid_mid"},    {"ffn_geglu", "ffn_act"}, {"attn_post_norm", "attn_post_norm"},
    {"ffn_post_norm", "ffn_post_norm"}, {"Qcur_normed", "q_pre_rope"}, {"Kcur_normed", "k_pre_rope"},
};

float value_at(const ggml_tensor *t, const std::vector<uint8_t> &bytes, int64_t i0, int64_t i1, int64_t i2,
               int64_t i3) {
    const uint8_t *p = bytes.data() + i0 * t->nb[0] + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
    switch (t->type) {
    case GGML_TYPE_F16: return ggml_fp16_to_fp32(*(const ggml_fp16_t *)p);
    case GGML_TYPE_BF16: return ggml_bf16_to_fp32(*(const ggml_bf16_t *)p);
    default: {
        float f;
        std::memcpy(&f, p, sizeof f);
        return f;
    }
    }
}

// The layer whose attention output projection `t` is (a MUL_MAT by
// `blk.L.attn_output.weight`), or -1.
int attn_projection_layer(const ggml_tensor *t) {
    if (t->op != GGML_OP_MUL_MAT || !t->src[0] || !t->src[1]) return -1;
    const char *w = t->src[0]->name;
    int layer = -1, end = 0;
    if (std::sscanf(w, "blk.%d.attn_output.weight%n", &layer, &end) == 1 && end > 0 && w[end] == '\0') return layer;
    return -1;
}
}  // namespace

Capture::Capture(std::set<std::string> taps, std::vector<int> layers, const std::vector<int64_t> &positions,
                 std::vector<bool> outputs)
    : short_taps_(std::move(taps)), layers_(layers.begin(), layers.end()), keep_(outputs.size(), false),
      outputs_(std::move(outputs)) {
    for (int64_t p : positions)
        if (p >= 0 && (size_t)p < keep_.size()) keep_[p] = true;
}

bool Capture::captures(const std::string &tap) {
    static const std::set<std::string> named = {"embed", "final_norm", "logits", "q", "k", "q_pre_rope", "k_pre_rope"};
    if (named.count(tap)) return true;
    for (const auto &node : LAYER_NODES)
        if (node.second == tap) return true;
    return tap == "attn";
}



std::string Capture::tap_of(const ggml_tensor *t) const {
    std::string name = t->name;
    if (name == "embd" || name == "inp_scaled") return short_taps_.count("embed") ? "embed" : "";
    if (name == "result_norm") return short_taps_.count("final_norm") ? "final_norm" : "";
    if (name == "result_output") return short_taps_.count("logits") ? "logits" : "";
    size_t dash = name.rfind('-');
    if (dash == std::string::npos || dash + 1 == name.size()) return "";
    std::string base = name.substr(0, dash), digits = name.substr(dash + 1);
    if (digits.find_first_not_of("0123456789") != std::string::npos) return "";
    int layer = std::atoi(digits.c_str());
    if (!layers_.count(layer)) return "";
    std::string tap;
    if (base == "Qcur" || base == "Kcur") {
        tap = std::string(base == "Qcur" ? "q" : "k") + (t->op == GGML_OP_ROPE ? "" : "_pre_rope");
    } else {
        auto it = LAYER_NODES.find(base);
        if (it == LAYER_NODES.end()) return "";
        tap = it->second;
        if (tap == "ffn_out" && ffn_out_seen_.count(layer)) return "";
    }
    return short_taps_.count(tap) ? "blk." + std::to_string(layer) + "." + tap : "";
}

std::string Capture::attn_of(const ggml_tensor *t) const {
    int layer = attn_projection_layer(t);
    return layer >= 0 && short_taps_.count("attn") && layers_.count(layer) ? "blk." + std::to_string(layer) + ".attn" : "";
}

bool Capture::callback(ggml_tensor *t, bool ask, void *self_ptr) {
    Capture &self = *static_cast<Capture *>(self_ptr);
    bool embd = std::strcmp(t->name, "embd") == 0;
    if (ask) return embd || !self.tap_of(t).empty() || !self.attn_of(t).empty();
    if (embd) {
        // A new micro-batch: its rows follow the previous one's.
        self.ubatch_start_ = self.next_start_;
        self.ubatch_tokens_ = ggml_nelements(t) / t->ne[0];
        self.next_start_ += self.ubatch_tokens_;
        self.ffn_out_seen_.clear();
    }
    // The projection's input is still in place (nothing after the projection has run),
    // one row per row of the projection's output.
    std::string attn = self.attn_of(t), id = self.tap_of(t);
    if (!attn.empty()) self.take(t->src[1], attn, t->ne[1]);
    if (!id.empty()) self.take(t, id, 0);
    if (std::strncmp(t->name, "ffn_out-", 8) == 0) self.ffn_out_seen_.insert(std::atoi(t->name + 8));
    return true;
}

void Capture::take(const ggml_tensor *t, const std::string &id, int64_t rows) {
    // A row is one token, the node's elements in logical order: [width, tokens] nodes and
    // [head_dim, heads, tokens] nodes alike. Without a known row count, the q/k/v
    // families' ROPE and reshape outputs are per head even when a micro-batch holds one
    // token.
    std::string family = id.substr(id.rfind('.') + 1);
    bool head_family = family == "q" || family == "k" || family == "v" || family == "q_pre_rope" || family == "k_pre_rope";
    bool per_head =
        t->ne[2] > 1 || (head_family && (t->op == GGML_OP_ROPE || t->op == GGML_OP_RESHAPE || t->op == GGML_OP_VIEW));
    int64_t width = rows > 0 ? ggml_nelements(t) / rows : per_head ? t->ne[0] * t->ne[1] : t->ne[0];
    int64_t n_rows = ggml_nelements(t) / width;
    // Which absolute positions the rows stand for: every token of the micro-batch, or
    // only its output rows.
    std::vector<int64_t> at;
    for (int64_t p = ubatch_start_; p < ubatch_start_ + ubatch_tokens_; p++) at.push_back(p);
    if (n_rows != (int64_t)at.size()) {
        std::vector<int64_t> outs;
        for (int64_t p : at)
            if (outputs_[p]) outs.push_back(p);
        at.swap(outs);
    }
    if (n_rows != (int64_t)at.size()) {
        if (error_.empty())
            error_ = std::string("node ") + t->name + " has " + std::to_string(n_rows) +
                     " rows, neither the micro-batch's tokens nor its outputs";
        return;
    }
    std::vector<uint8_t> bytes(ggml_nbytes(t));
    ggml_backend_tensor_get(t, bytes.data(), 0, bytes.size());
    TapRows &tap = taps_[id];
    tap.width = (size_t)width;
    for (int64_t r = 0; r < n_rows; r++) {
        if (!keep_[at[r]]) continue;
        std::vector<float> row((size_t)width);
        for (int64_t c = 0; c < width; c++) {
            int64_t f = r * width + c;
            int64_t i0 = f % t->ne[0], i1 = f / t->ne[0] % t->ne[1], i2 = f / (t->ne[0] * t->ne[1]) % t->ne[2],
                    i3 = f / (t->ne[0] * t->ne[1] * t->ne[2]);
            row[c] = value_at(t, bytes, i0, i1, i2, i3);
        }
        tap.rows[at[r]] = std::move(row);
    }
}
