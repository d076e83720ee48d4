// resbisect-llamacpp: llama.cpp (libllama) as a resbisect external engine. It runs a
// prompt through llama_decode, captures the requested graph nodes as canonical taps
// (capture.cpp) and writes dump format v1 through include/resbisect_dump.h, recording
// llama.cpp's version and the knobs it ran with. Protocol: docs/engines.md;
// usage: docs/llamacpp.md. Exit 0 done, 2 bad input, 1 llama.cpp failed (the dump says why).
#define RESBISECT_DUMP_IMPLEMENTATION
#include "resbisect_dump.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "args.h"
#include "capture.h"
#include "llama.h"

namespace {

ggml_type cache_type(const std::string &option, const std::string &name) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char *n = ggml_type_name((ggml_type)t);
        if (n && name == n) return (ggml_type)t;
    }
    bad_input(option + ": unknown ggml type \"" + name + "\" (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)");
}

llama_context_params context_params(const Options &o, size_t n_tokens, int threads, Capture *capture) {
    llama_context_params p = llama_context_default_params();
    p.n_ctx = (uint32_t)n_tokens;
    p.n_batch = o.n_batch ? o.n_batch : (uint32_t)n_tokens;
    p.n_ubatch = std::min(o.n_ubatch, p.n_batch);
    p.n_seq_max = 1;
    p.n_threads = p.n_threads_batch = threads;
    p.rope_freq_base = o.rope_freq_base;
    p.rope_freq_scale = o.rope_freq_scale;
    if (o.rope_scaling == "none") p.rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_NONE;
    if (o.rope_scaling == "linear") p.rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_LINEAR;
    if (o.rope_scaling == "yarn") p.rope_scaling_type = LLAMA_ROPE_SCALING_TYPE_YARN;
    p.yarn_orig_ctx = o.yarn_orig_ctx;
    p.type_k = cache_type("--cache-type-k", o.cache_type_k);
    p.type_v = cache_type("--cache-type-v", o.cache_type_v);
    p.flash_attn_type = o.flash_attn == "on"    ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                        : o.flash_attn == "off" ? LLAMA_FLASH_ATTN_TYPE_DISABLED
                                                : LLAMA_FLASH_ATTN_TYPE_AUTO;
    p.cb_eval = Capture::callback;
    p.cb_eval_user_data = capture;
    p.no_perf = true;
    return p;
}

// The knobs as the context runs them: a value left to the model (0) replaced by the
// model's, the batch sizes as llama.cpp settled them, so that the manifest records what
// ran, not "0".
Options in_effect(const Options &o, const llama_model *model, const llama_context *ctx) {
    Options e = o;
    if (e.rope_freq_base <= 0.0f) {
        char arch[64] = "", base[64] = "";
        llama_model_meta_val_str(model, "general.architecture", arch, sizeof arch);
        std::string key = std::string(arch) + ".rope.freq_base";
        // llama.cpp's own default when the model names no base.
        e.rope_freq_base = llama_model_meta_val_str(model, key.c_str(), base, sizeof base) > 0 ? std::strtof(base, nullptr) : 10000.0f;
    }
    if (e.rope_freq_scale <= 0.0f) e.rope_freq_scale = llama_model_rope_freq_scale_train(model);
    e.n_batch = llama_n_batch(ctx);
    e.n_ubatch = llama_n_ubatch(ctx);
    return e;
}

// Which positions llama.cpp must output: the logits and final_norm rows asked for, and,
// when the last layer is asked for, its rows after attention (llama.cpp computes only
// output rows there).
std::vector<bool> output_positions(const Wanted &w, size_t n_tokens, int n_layer) {
    std::vector<bool> out(n_tokens, false);
    bool last_layer = std::find(w.layers.begin(), w.layers.end(), n_layer - 1) != w.layers.end();
    bool needs = w.taps.count("logits") || w.taps.count("final_norm");
    for (const char *t : {"resid_mid", "ffn_norm", "ffn_gate", "ffn_up", "ffn_act", "ffn_out", "resid_post"})
        needs = needs || (last_layer && w.taps.count(t));
    if (needs)
        for (int64_t p : w.positions)
            if (p >= 0 && (size_t)p < n_tokens) out[p] = true;
    return out;
}

// Run the prompt in llama_decode calls of n_batch tokens at explicit positions.
std::string decode(llama_context *ctx, const std::vector<uint32_t> &tokens, const std::vector<bool> &outputs) {
    uint32_t n_batch = llama_n_batch(ctx);
    llama_batch batch = llama_batch_init((int32_t)n_batch, 0, 1);
    std::string error;
    for (size_t start = 0; start < tokens.size() && error.empty(); start += n_batch) {
        size_t n = std::min<size_t>(n_batch, tokens.size() - start);
        batch.n_tokens = (int32_t)n;
        for (size_t i = 0; i < n; i++) {
            batch.token[i] = (llama_token)tokens[start + i];
            batch.pos[i] = (llama_pos)(start + i);
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = outputs[start + i];
        }
        int rc = llama_decode(ctx, batch);
        if (rc != 0) error = "llama_decode returned " + std::to_string(rc) + " at position " + std::to_string(start);
    }
    llama_batch_free(batch);
    return error;
}

// The positions written, as a position spec of runs ("0..16,820..840", end exclusive):
// the rows follow the selection file, so the manifest records it, not --positions.
std::string positions_spec(const std::vector<int64_t> &positions) {
    std::string spec;
    for (size_t i = 0; i < positions.size();) {
        size_t j = i + 1;
        while (j < positions.size() && positions[j] == positions[j - 1] + 1) j++;
        spec += (spec.empty() ? "" : ",") + std::to_string(positions[i]);
        if (j - i > 1) spec += ".." + std::to_string(positions[j - 1] + 1);
        i = j;
    }
    return spec;
}

std::string json_list(const std::vector<std::string> &items, bool quoted) {
    std::string s = "[";
    for (size_t i = 0; i < items.size(); i++) s += (i ? "," : "") + (quoted ? "\"" + items[i] + "\"" : items[i]);
    return s + "]";
}

// Write the captured taps, one file per group (embed, blk.L, output), at the wanted positions.
int write_groups(rbd_dump *d, const Options &o, const Wanted &w, const Capture &capture, std::string &last) {
    std::map<std::string, std::vector<std::string>> groups;
    for (const auto &[id, rows] : capture.taps()) {
        std::string stem = id == "embed" ? "embed" : id.rfind("blk.", 0) == 0 ? id.substr(0, id.find('.', 4)) : "output";
        groups[stem].push_back(id);
    }
    for (const auto &[stem, ids] : groups) {
        std::vector<const char *> names;
        std::vector<const float *> data;
        std::vector<size_t> widths;
        std::vector<std::vector<float>> flat(ids.size());
        for (size_t i = 0; i < ids.size(); i++) {
            const TapRows &t = capture.taps().at(ids[i]);
            for (int64_t p : w.positions) {
                auto row = t.rows.find(p);
                if (row == t.rows.end()) {
                    std::string why = ids[i] + ": llama.cpp computed no row at position " + std::to_string(p);
                    rbd_finish(d, why.c_str(), last.empty() ? nullptr : last.c_str());
                    std::fprintf(stderr, "resbisect-llamacpp: %s\n", why.c_str());
                    return 1;
                }
                flat[i].insert(flat[i].end(), row->second.begin(), row->second.end());
            }
            names.push_back(ids[i].c_str());
            data.push_back(flat[i].data());
            widths.push_back(t.width);
        }
        if (rbd_write_file(d, o.prompt_id.c_str(), stem.c_str(), w.positions.data(), w.positions.size(), ids.size(),
                           names.data(), data.data(), widths.data()))
            return 1;
        last = ids.back();
    }
    return 0;
}

void quiet_log(ggml_log_level level, const char *text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) std::fputs(text, stderr);
}

}  // namespace

int main(int argc, char **argv) {
    Options o = parse_args(argc, argv);
    std::vector<uint32_t> tokens = read_tokens(o.tokens_path);
    Wanted w = read_wanted(o);
    // An unknown name would capture nothing and still finish as a complete dump.
    for (const std::string &tap : w.taps)
        if (!Capture::captures(tap))
            bad_input("--taps: \"" + tap + "\" is not a tap the adapter captures (explicit short names, e.g. " +
                      "attn_norm,q,k,v,attn,resid_post,logits; not \"all\")");
    for (int64_t p : w.positions)
        if (p < 0 || (size_t)p >= tokens.size())
            bad_input("position " + std::to_string(p) + " lies outside the prompt's " + std::to_string(tokens.size()) +
                      " tokens");
    int threads = o.threads ? o.threads : (int)std::max(1u, std::thread::hardware_concurrency());

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model *model = llama_model_load_from_file(o.model.c_str(), mp);
    if (!model) bad_input("llama.cpp cannot load the model " + o.model);
    const llama_vocab *vocab = llama_model_get_vocab(model);
    for (uint32_t t : tokens)
        if ((int32_t)t >= llama_vocab_n_tokens(vocab))
            bad_input("token " + std::to_string(t) + " is outside the vocabulary of " + o.model);
    int n_layer = llama_model_n_layer(model);
    for (int l : w.layers)
        if (l >= n_layer) bad_input("layer " + std::to_string(l) + " does not exist (the model has " +
                                    std::to_string(n_layer) + ")");

    std::vector<bool> outputs = output_positions(w, tokens.size(), n_layer);
    Capture capture(w.taps, w.layers, w.positions, outputs);
    llama_context *ctx = llama_init_from_model(model, context_params(o, tokens.size(), threads, &capture));
    if (!ctx) bad_input("llama.cpp cannot make a context with these options (a quantized V cache needs --flash-attn on)");

    std::string opts = options_json(in_effect(o, model, ctx), threads), version = LLAMACPP_PIN;
    rbd_engine engine = {"llama.cpp", version.c_str(), LLAMACPP_BACKEND, "f32", LLAMACPP_BACKEND, opts.c_str()};
    std::vector<std::string> layer_items, tap_items(w.taps.begin(), w.taps.end());
    for (int l : w.layers) layer_items.push_back(std::to_string(l));
    rbd_dump d;
    if (rbd_begin_engine(&d, o.out.c_str(), &engine, o.model_info.c_str(), o.prompt_id.c_str(), tokens.data(),
                         tokens.size(), json_list(layer_items, false).c_str(), json_list(tap_items, true).c_str(),
                         positions_spec(w.positions).c_str())) {
        // --out or --model-info refused (an --out holding files is left as it is): exit 2,
        // the usage error of resbisect's engine contract.
        std::fprintf(stderr, "resbisect-llamacpp: %s\n", rbd_error(&d));
        return 2;
    }
    std::string error = decode(ctx, tokens, outputs);
    if (error.empty()) error = capture.error();
    int rc = 0;
    std::string last;
    if (!error.empty()) {
        std::fprintf(stderr, "resbisect-llamacpp: %s\n", error.c_str());
        rbd_finish(&d, error.c_str(), nullptr);
        rc = 1;
    } else if (write_groups(&d, o, w, capture, last) || rbd_finish(&d, nullptr, nullptr)) {
        std::fprintf(stderr, "resbisect-llamacpp: %s\n", rbd_error(&d));
        rc = 1;
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return rc;
}
