// Command-line options of the llama.cpp engine adapter: the external-engine protocol's
// inputs (docs/engines.md) and the llama.cpp knobs that reproduce real numerics bugs.
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <vector>

struct Options {
    // The external protocol's placeholders.
    std::string model, model_info, tokens_path, prompt_id, layers, taps, selection, out;
    std::string positions = "all";  // the position spec, recorded in the manifest
    // llama.cpp knobs (0 / -1 / empty: the model's own value or llama.cpp's default).
    float rope_freq_base = 0.0f, rope_freq_scale = 0.0f;
    std::string rope_scaling;     // none | linear | yarn
    uint32_t yarn_orig_ctx = 0;   // YaRN original context size
    std::string cache_type_k = "f16", cache_type_v = "f16";
    uint32_t n_batch = 0;         // 0: the whole prompt in one llama_decode call
    uint32_t n_ubatch = 512;      // llama.cpp's default micro-batch
    std::string flash_attn = "off";  // on | off | auto
    int threads = 0;              // 0: every hardware thread
};

// The parsed selection: layers, short tap names, absolute positions to write.
struct Wanted {
    std::vector<int> layers;
    std::set<std::string> taps;
    std::vector<int64_t> positions;
};

// Parse argv; on bad input print one line naming the option and exit 2.
Options parse_args(int argc, char **argv);
// Read the token file (comma-separated ids) and the selection file's resolved_positions.
std::vector<uint32_t> read_tokens(const std::string &path);
Wanted read_wanted(const Options &o);
// The knobs as a JSON object, recorded in the manifest as the engine's options.
std::string options_json(const Options &o, int threads);
// Exit 2 with "resbisect-llamacpp: <message>".
[[noreturn]] void bad_input(const std::string &message);
