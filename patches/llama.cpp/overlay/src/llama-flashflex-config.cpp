// flashflex runtime specs: the one versioned JSON file a plan is handed to the runtime as (flashflex writes it; the
// load finds it through the "flashflex.spec" key override, llama-flashflex-hooks.cpp). Every value is checked here,
// each refusal with its reason, before any tensor is read: a spec from another API version or patch series, one
// edited by hand (its digest no longer matches), and out-of-range options are refused by name.

#include "llama-flashflex-config.h"

#include "llama-flashflex-io.h"
#include "llama-flashflex-runtime.h"
#include "llama-flashflex.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>

#ifndef FLASHFLEX_SERIES_HASH
#    define FLASHFLEX_SERIES_HASH "unknown"
#endif

using json = nlohmann::json;

namespace flashflex {

int32_t write_c_string(const std::string & s, char * buf, size_t size) {
    if (buf && size > 0) {
        const size_t n = std::min(s.size(), size - 1);
        memcpy(buf, s.data(), n);
        buf[n] = '\0';
    }
    return (int32_t) s.size();
}

}  // namespace flashflex

using namespace flashflex;

namespace {

thread_local std::string g_last_error;

[[noreturn]] void bad(const std::string & why) {
    throw std::runtime_error(why);
}

// FNV-1a, 64 bits, over the spec's canonical text (sorted keys, no spaces): the digest that tells a spec flashflex
// wrote from one edited afterwards. Not a security measure: whoever can write the file can recompute it.
std::string fnv1a64_hex(const std::string & text) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (unsigned char c : text) {
        h ^= c;
        h *= 0x100000001b3ULL;
    }
    char out[17];
    snprintf(out, sizeof(out), "%016llx", (unsigned long long) h);
    return out;
}

int64_t integer(const json & v, const std::string & what) {
    if (!v.is_number_integer()) {
        bad(what + " must be an integer");
    }
    return v.is_number_unsigned() ? (int64_t) std::min<uint64_t>(v.get<uint64_t>(), INT64_MAX) : v.get<int64_t>();
}

uint64_t unsigned_integer(const json & v, const std::string & what) {
    if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<int64_t>() < 0)) {
        bad(what + " must be an integer >= 0");
    }
    return v.get<uint64_t>();
}

std::string text(const json & v, const std::string & what) {
    if (!v.is_string()) {
        bad(what + " must be a string");
    }
    return v.get<std::string>();
}

const json & member(const json & obj, const char * key, const std::string & where) {
    auto it = obj.find(key);
    if (it == obj.end()) {
        bad(where + " has no \"" + key + "\"");
    }
    return *it;
}

// Each integer option, its range and its field (a 64-bit field for sizes in bytes).
void set_option(config & c, const std::string & k, int64_t value) {
    struct option {
        const char * name;
        int64_t      lo, hi;
        int config::* field;
        int64_t config::* field64;
    };

    static const option options[] = {
        { "prefetch_threads",   0, 256,               &config::prefetch_threads,   nullptr             },
        { "window",             1, 4096,              &config::window,             nullptr             },
        { "ring_bytes",         0, (int64_t) 1 << 50, nullptr,                     &config::ring_bytes },
        { "lent_bytes",         0, (int64_t) 1 << 50, nullptr,                     &config::lent_bytes },
        { "direct_io",          0, 2,                 &config::direct_io,          nullptr             },
        { "ring_mirror",        0, 1,                 &config::ring_mirror,        nullptr             },
        { "draft_adaptive",     0, 1,                 &config::draft_adaptive,     nullptr             },
        { "prompt_lookup",      0, 1,                 &config::prompt_lookup,      nullptr             },
        { "gather_ms",          0, 1000,              &config::gather_ms,          nullptr             },
        { "moe_slots",          0, 65536,             &config::moe_slots,          nullptr             },
        { "moe_io_threads",     1, 256,               &config::moe_io_threads,     nullptr             },
        { "moe_shared_only",    0, 1,                 &config::moe_shared_only,    nullptr             },
        { "moe_preload",        0, 1,                 &config::moe_preload,        nullptr             },
        { "moe_verify",         0, 1,                 &config::moe_verify,         nullptr             },
        { "moe_prefetch_ranks", 0, 1024,              &config::moe_prefetch_ranks, nullptr             },
    };
    for (const auto & o : options) {
        if (k != o.name) {
            continue;
        }
        if (value < o.lo || value > o.hi) {
            bad("option " + k + " = " + std::to_string(value) + " is out of range [" + std::to_string(o.lo) + ", " +
                std::to_string(o.hi) + "]");
        }
        if (o.field != nullptr) {
            c.*o.field = (int) value;
        } else {
            c.*o.field64 = value;
        }
        return;
    }
    bad("unknown option \"" + k + "\"");
}

void set_string(config & c, const std::string & k, const std::string & v) {
    if (k == "moe_trace") {
        c.moe_trace = v;
    } else if (k == "moe_prefetch") {
        if (v != "none" && v != "router-lookahead" && v != "oracle") {
            bad("moe_prefetch \"" + v + "\" is not none, router-lookahead or oracle");
        }
        c.moe_prefetch = v;
    } else {
        bad("unknown string option \"" + k + "\"");
    }
}

int file_index(const config & c, const json & v, const std::string & what) {
    const int64_t f = integer(v, what + ".file");
    if (f < 0 || f >= (int64_t) c.files.size()) {
        bad(what + " names file " + std::to_string(f) + " of " + std::to_string(c.files.size()));
    }
    return (int) f;
}

void add_stream_tensor(config & c, const json & t, size_t i) {
    const std::string where = "stream[" + std::to_string(i) + "]";
    const std::string name  = text(member(t, "name", where), where + ".name");
    c.tensors.push_back({ name, file_index(c, member(t, "file", where), where),
                          unsigned_integer(member(t, "offset", where), where + ".offset"),
                          unsigned_integer(member(t, "bytes", where), where + ".bytes") });
}

void add_bank_tensor(config & c, const json & b, size_t i) {
    const std::string where = "banks[" + std::to_string(i) + "]";
    bank_tensor_cfg   bt    = {};
    bt.name                 = text(member(b, "name", where), where + ".name");
    bt.file                 = file_index(c, member(b, "file", where), where);
    bt.offset               = unsigned_integer(member(b, "offset", where), where + ".offset");
    bt.expert_stride        = unsigned_integer(member(b, "expert_stride", where), where + ".expert_stride");
    bt.bytes_per_expert     = unsigned_integer(member(b, "bytes_per_expert", where), where + ".bytes_per_expert");
    const std::string what  = where + " (" + bt.name + ")";
    if (bt.offset % k_page != 0 || bt.expert_stride % k_page != 0) {
        bad(what + ": offset " + std::to_string(bt.offset) + " and stride " + std::to_string(bt.expert_stride) +
            " must be multiples of " + std::to_string(k_page));
    }
    if (bt.bytes_per_expert == 0 || bt.expert_stride < bt.bytes_per_expert) {
        bad(what + ": " + std::to_string(bt.bytes_per_expert) + " bytes per expert do not fit a stride of " +
            std::to_string(bt.expert_stride));
    }
    if (auto it = b.find("checksums"); it != b.end()) {
        if (!it->is_array()) {
            bad(what + ": checksums must be an array");
        }
        for (const auto & v : *it) {
            bt.checksums.push_back(unsigned_integer(v, what + ".checksums[]"));
        }
    }
    c.banks.push_back(std::move(bt));
}

// A replayed routing trace: records of layer, n > 0, n expert ids.
void set_schedule(config & c, const json & v) {
    if (!v.is_array()) {
        bad("schedule must be an array of integers");
    }
    std::vector<int32_t> values;
    for (const auto & x : v) {
        const int64_t i = integer(x, "schedule[]");
        if (i < INT32_MIN || i > INT32_MAX) {
            bad("schedule value " + std::to_string(i) + " is out of range");
        }
        values.push_back((int32_t) i);
    }
    for (size_t i = 0; i < values.size();) {
        if (i + 1 >= values.size() || values[i] < 0 || values[i + 1] <= 0 ||
            i + 2 + (size_t) values[i + 1] > values.size()) {
            bad("schedule: malformed record at value " + std::to_string(i));
        }
        i += 2 + (size_t) values[i + 1];
    }
    c.moe_schedule = std::move(values);
}

const char * const k_top_keys[] = { "flashflex_spec", "series_hash", "digest", "model",       "files",   "options",
                                    "strings",        "stream",      "banks",  "file_layout", "schedule" };

// The spec's header: its version, the series it was written for and its digest.
void check_header(const json & j) {
    for (auto it = j.begin(); it != j.end(); ++it) {
        if (std::find_if(std::begin(k_top_keys), std::end(k_top_keys), [&](const char * k) { return it.key() == k; }) ==
            std::end(k_top_keys)) {
            bad("unknown key \"" + it.key() + "\"");
        }
    }
    const int64_t version = integer(member(j, "flashflex_spec", "the spec"), "flashflex_spec");
    if (version != LLAMA_FLASHFLEX_SPEC_VERSION) {
        bad("it is spec version " + std::to_string(version) + "; this library reads version " +
            std::to_string(LLAMA_FLASHFLEX_SPEC_VERSION));
    }
    const std::string series = text(member(j, "series_hash", "the spec"), "series_hash");
    if (series != FLASHFLEX_SERIES_HASH) {
        bad("it was written for patch series " + series.substr(0, 12) + ", and this library is built from " +
            std::string(FLASHFLEX_SERIES_HASH).substr(0, 12));
    }
    json body = j;
    body.erase("digest");
    const std::string digest = text(member(j, "digest", "the spec"), "digest");
    if (digest != "fnv1a64:" + fnv1a64_hex(body.dump())) {
        bad("its digest does not match its content (edited after flashflex wrote it)");
    }
}

config parse(const json & j) {
    if (!j.is_object()) {
        bad("it is not a JSON object");
    }
    check_header(j);
    config       c;
    const json & model = member(j, "model", "the spec");
    c.model_bytes      = unsigned_integer(member(model, "bytes", "model"), "model.bytes");
    c.model_path       = text(member(model, "path", "model"), "model.path");
    for (const auto & f : member(j, "files", "the spec")) {
        c.files.push_back(text(f, "files[]"));
    }
    const auto listed = [&](const char * key) {
        auto it = j.find(key);
        return it != j.end() && !it->empty();
    };
    if (c.files.empty() && (listed("stream") || listed("banks"))) {
        bad("it names no file");
    }
    if (auto it = j.find("options"); it != j.end()) {
        for (auto o = it->begin(); o != it->end(); ++o) {
            set_option(c, o.key(), integer(o.value(), "option " + o.key()));
        }
    }
    if (auto it = j.find("strings"); it != j.end()) {
        for (auto o = it->begin(); o != it->end(); ++o) {
            set_string(c, o.key(), text(o.value(), "option " + o.key()));
        }
    }
    if (auto it = j.find("stream"); it != j.end()) {
        for (size_t i = 0; i < it->size(); ++i) {
            add_stream_tensor(c, (*it)[i], i);
        }
    }
    if (auto it = j.find("banks"); it != j.end()) {
        for (size_t i = 0; i < it->size(); ++i) {
            add_bank_tensor(c, (*it)[i], i);
        }
    }
    if (auto it = j.find("file_layout"); it != j.end()) {
        if (!it->is_array()) {
            bad("file_layout is not a list of tensor names");
        }
        for (const auto & name : *it) {
            c.file_layout.push_back(text(name, "file_layout[]"));
        }
    }
    if (auto it = j.find("schedule"); it != j.end()) {
        set_schedule(c, *it);
    }
    if (c.tensors.empty() && c.banks.empty() && c.file_layout.empty()) {
        bad("it streams no tensor, banks no expert and keeps no tensor in the file's layout");
    }
    return c;
}

}  // namespace

// Every refusal of the C API says why (llama_flashflex_last_error), so the caller can print it.
int32_t flashflex::refuse(const std::string & why) {
    g_last_error = why;
    return -1;
}

config flashflex::read_spec(const std::string & path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        throw std::runtime_error("flashflex: cannot read the spec " + path + ": " + strerror(errno));
    }
    std::stringstream buf;
    buf << in.rdbuf();
    try {
        return parse(json::parse(buf.str()));
    } catch (const json::exception & e) {
        throw std::runtime_error("flashflex: the spec " + path + " is not valid JSON (" + e.what() + ")");
    } catch (const std::runtime_error & e) {
        throw std::runtime_error("flashflex: the spec " + path + " is refused: " + e.what());
    }
}

// -------------------------------------------------------------------------------------------------------------
// Public C API: specs

int32_t llama_flashflex_spec_check(const char * path) {
    if (path == nullptr) {
        return refuse("spec_check: the path is NULL");
    }
    try {
        read_spec(path);
        return 0;
    } catch (const std::exception & e) {
        return refuse(e.what());
    }
}

const char * llama_flashflex_last_error(void) {
    return g_last_error.c_str();
}
