// Option parsing and the protocol's side files (tokens, selection) for the adapter.
#include "args.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <sstream>

void bad_input(const std::string &message) {
    std::fprintf(stderr, "resbisect-llamacpp: %s\n", message.c_str());
    std::exit(2);
}

static const char *USAGE =
    "usage: resbisect-llamacpp --model M --model-info F --tokens F --prompt-id ID --layers L --taps T\n"
    "         --selection F --out DIR [--positions SPEC] [--rope-freq-base F] [--rope-freq-scale F]\n"
    "         [--rope-scaling none|linear|yarn] [--yarn-orig-ctx N] [--cache-type-k T] [--cache-type-v T]\n"
    "         [--batch N] [--ubatch N] [--flash-attn on|off|auto] [--threads N]\n";

static unsigned long parse_uint(const std::string &name, const std::string &v) {
    char *end = nullptr;
    unsigned long x = std::strtoul(v.c_str(), &end, 10);
    if (v.empty() || *end || v[0] == '-') bad_input(name + ": expected a non-negative integer, got \"" + v + "\"");
    return x;
}

static float parse_float(const std::string &name, const std::string &v) {
    char *end = nullptr;
    float x = std::strtof(v.c_str(), &end);
    if (v.empty() || *end || !(x > 0.0f)) bad_input(name + ": expected a positive number, got \"" + v + "\"");
    return x;
}

Options parse_args(int argc, char **argv) {
    Options o;
    struct Text {
        const char *name;
        std::string *dst;
    } texts[] = {{"--model", &o.model},           {"--model-info", &o.model_info}, {"--tokens", &o.tokens_path},
                 {"--prompt-id", &o.prompt_id},   {"--layers", &o.layers},         {"--taps", &o.taps},
                 {"--selection", &o.selection},   {"--out", &o.out},               {"--rope-scaling", &o.rope_scaling},
                 {"--cache-type-k", &o.cache_type_k}, {"--cache-type-v", &o.cache_type_v},
                 {"--flash-attn", &o.flash_attn}, {"--positions", &o.positions}};
    for (int i = 1; i < argc; i += 2) {
        std::string name = argv[i];
        if (name == "--help" || name == "-h") {
            std::fputs(USAGE, stdout);
            std::exit(0);
        }
        if (i + 1 >= argc) bad_input(name + ": missing value");
        std::string v = argv[i + 1];
        bool known = false;
        for (auto &t : texts)
            if (name == t.name) *t.dst = v, known = true;
        if (known) continue;
        if (name == "--rope-freq-base") o.rope_freq_base = parse_float(name, v);
        else if (name == "--rope-freq-scale") o.rope_freq_scale = parse_float(name, v);
        else if (name == "--yarn-orig-ctx") o.yarn_orig_ctx = (uint32_t)parse_uint(name, v);
        else if (name == "--batch") o.n_batch = (uint32_t)parse_uint(name, v);
        else if (name == "--ubatch") o.n_ubatch = (uint32_t)parse_uint(name, v);
        else if (name == "--threads") o.threads = (int)parse_uint(name, v);
        else bad_input("unknown option " + name + "\n" + USAGE);
    }
    for (auto &t : texts)
        if (t.dst->empty() && &t - texts < 8) bad_input(std::string("missing ") + t.name);
    if (!o.rope_scaling.empty() && o.rope_scaling != "none" && o.rope_scaling != "linear" && o.rope_scaling != "yarn")
        bad_input("--rope-scaling: expected none, linear or yarn, got \"" + o.rope_scaling + "\"");
    if (o.flash_attn != "on" && o.flash_attn != "off" && o.flash_attn != "auto")
        bad_input("--flash-attn: expected on, off or auto, got \"" + o.flash_attn + "\"");
    if (o.n_ubatch == 0) bad_input("--ubatch: must be at least 1");
    return o;
}

static std::string slurp(const std::string &path, const char *what) {
    std::ifstream f(path, std::ios::binary);
    if (!f) bad_input(std::string("cannot read the ") + what + " file " + path);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}

// Integers in text[from, first ']' or end), separated by anything else.
static std::vector<int64_t> integers(const std::string &text, size_t from, const char *what) {
    std::vector<int64_t> out;
    size_t end = text.find(']', from);
    if (end == std::string::npos) end = text.size();
    for (size_t i = from; i < end;) {
        if (text[i] >= '0' && text[i] <= '9') {
            size_t j = i;
            while (j < end && text[j] >= '0' && text[j] <= '9') j++;
            out.push_back(std::strtoll(text.substr(i, j - i).c_str(), nullptr, 10));
            i = j;
        } else if (text[i] == ',' || text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t') {
            i++;
        } else {
            bad_input(std::string("the ") + what + " holds \"" + text[i] + "\" where a number belongs");
        }
    }
    return out;
}

std::vector<uint32_t> read_tokens(const std::string &path) {
    std::string text = slurp(path, "token");
    std::vector<uint32_t> tokens;
    for (int64_t t : integers(text, 0, "token file")) tokens.push_back((uint32_t)t);
    if (tokens.empty()) bad_input("the token file " + path + " holds no tokens");
    return tokens;
}

Wanted read_wanted(const Options &o) {
    Wanted w;
    if (o.layers != "none") {
        std::stringstream s(o.layers);
        for (std::string item; std::getline(s, item, ',');) w.layers.push_back((int)parse_uint("--layers", item));
    }
    std::stringstream s(o.taps);
    for (std::string item; std::getline(s, item, ',');) w.taps.insert(item);
    std::string sel = slurp(o.selection, "selection");
    size_t key = sel.find("\"resolved_positions\"");
    size_t open = key == std::string::npos ? key : sel.find('[', key);
    if (open == std::string::npos) bad_input("the selection file " + o.selection + " has no resolved_positions array");
    w.positions = integers(sel, open + 1, "selection's resolved_positions");
    if (w.positions.empty()) bad_input("the selection file " + o.selection + ": resolved_positions is empty");
    for (size_t i = 1; i < w.positions.size(); i++)
        if (w.positions[i] <= w.positions[i - 1])
            bad_input("the selection file " + o.selection + ": resolved_positions must be strictly increasing (" +
                      std::to_string(w.positions[i - 1]) + " then " + std::to_string(w.positions[i]) + ")");
    return w;
}

std::string options_json(const Options &o, int threads) {
    std::ostringstream j;
    // Every float as it ran: 9 significant digits tell any two f32 values apart.
    j << std::setprecision(9);
    j << "{\"rope_freq_base\":" << o.rope_freq_base << ",\"rope_freq_scale\":" << o.rope_freq_scale
      << ",\"rope_scaling\":\"" << (o.rope_scaling.empty() ? "model" : o.rope_scaling) << "\""
      << ",\"yarn_orig_ctx\":";
    if (o.yarn_orig_ctx) j << o.yarn_orig_ctx;
    else j << "\"model\"";
    j << ",\"cache_type_k\":\"" << o.cache_type_k << "\""
      << ",\"cache_type_v\":\"" << o.cache_type_v << "\",\"n_batch\":" << o.n_batch << ",\"n_ubatch\":" << o.n_ubatch
      << ",\"flash_attn\":\"" << o.flash_attn << "\",\"threads\":" << threads << "}";
    return j.str();
}
