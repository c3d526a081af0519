// flashflex configurations: the C API that builds a per-model configuration before a load (options checked
// here, each refusal with its reason in llama_flashflex_last_error). The load finds the configuration through
// the "flashflex.config" key override (llama-flashflex-hooks.cpp).

#include "llama-flashflex-config.h"

#include "llama-flashflex-io.h"
#include "llama-flashflex-runtime.h"
#include "llama-flashflex.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>

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

std::mutex                g_configs_mutex;
std::map<int32_t, config> g_configs;
int32_t                   g_next_config = 1;

// Runs fn on the configuration `id` under the registry lock; a refusal when there is none.
template <typename F> int32_t with_config(int32_t id, F && fn) {
    std::lock_guard<std::mutex> lk(g_configs_mutex);
    auto                        it = g_configs.find(id);
    return it == g_configs.end() ? refuse("no flashflex configuration has id " + std::to_string(id)) : fn(it->second);
}

}  // namespace

// Every refusal of the configuration API says why (llama_flashflex_last_error), so the caller can print it.
int32_t flashflex::refuse(const std::string & why) {
    g_last_error = why;
    return -1;
}

bool flashflex::find_config(int32_t id, config & out) {
    return with_config(id, [&](config & c) {
               out = c;
               return 0;
           }) == 0;
}

// -------------------------------------------------------------------------------------------------------------
// Public C API: configurations

int32_t llama_flashflex_config_new(void) {
    std::lock_guard<std::mutex> lk(g_configs_mutex);
    const int32_t               id = g_next_config++;
    g_configs[id]                  = config{};
    return id;
}

int32_t llama_flashflex_config_set(int32_t id, const char * key, int64_t value) {
    if (key == nullptr) {
        return refuse("config_set: the key is NULL");
    }
    const std::string k = key;
    return with_config(id, [&](config & c) -> int32_t {
        if (k == "prefetch_threads" && value >= 0 && value <= 256) {
            c.prefetch_threads = (int) value;
        } else if (k == "window" && value >= 1 && value <= 4096) {
            c.window = (int) value;
        } else if (k == "ring_bytes" && value >= 0 && value <= ((int64_t) 1 << 50)) {
            c.ring_bytes = value;
        } else if (k == "direct_io" && value >= 0 && value <= 2) {
            c.direct_io = (int) value;
        } else if (k == "moe_slots" && value >= 0 && value <= 65536) {
            c.moe_slots = (int) value;
        } else if (k == "moe_io_threads" && value >= 1 && value <= 256) {
            c.moe_io_threads = (int) value;
        } else if (k == "moe_shared_only" && (value == 0 || value == 1)) {
            c.moe_shared_only = (int) value;
        } else if (k == "moe_prefetch_ranks" && value >= 0 && value <= 1024) {
            c.moe_prefetch_ranks = (int) value;
        } else if (k == "moe_preload" && (value == 0 || value == 1)) {
            c.moe_preload = (int) value;
        } else if (k == "moe_verify" && (value == 0 || value == 1)) {
            c.moe_verify = (int) value;
        } else {
            static const char * const known[] = {
                "prefetch_threads", "window",          "ring_bytes",         "direct_io",   "moe_slots",
                "moe_io_threads",   "moe_shared_only", "moe_prefetch_ranks", "moe_preload", "moe_verify"
            };
            for (const char * name : known) {
                if (k == name) {
                    return refuse("config_set: " + k + " = " + std::to_string(value) + " is out of range");
                }
            }
            return refuse("config_set: unknown key " + k);
        }
        return 0;
    });
}

int32_t llama_flashflex_config_add_file(int32_t id, const char * path) {
    if (path == nullptr) {
        return refuse("config_add_file: the path is NULL");
    }
    return with_config(id, [&](config & c) -> int32_t {
        c.files.emplace_back(path);
        return (int32_t) c.files.size() - 1;
    });
}

int32_t llama_flashflex_config_stream_tensor(int32_t      id,
                                             const char * name,
                                             int32_t      file,
                                             uint64_t     offset,
                                             uint64_t     nbytes) {
    return with_config(id, [&](config & c) -> int32_t {
        if (name == nullptr || file < 0 || file >= (int32_t) c.files.size()) {
            return refuse("config_stream_tensor: " + std::string(name ? name : "(NULL name)") + " names file " +
                          std::to_string(file) + " of " + std::to_string(c.files.size()) + " registered");
        }
        c.tensors.push_back({ name, file, offset, nbytes });
        return 0;
    });
}

int32_t llama_flashflex_config_bank_tensor(int32_t      id,
                                           const char * name,
                                           int32_t      file,
                                           uint64_t     offset,
                                           uint64_t     expert_stride,
                                           uint64_t     bytes_per_expert) {
    return with_config(id, [&](config & c) -> int32_t {
        const std::string what = "config_bank_tensor: " + std::string(name ? name : "(NULL name)") + ": ";
        if (name == nullptr || file < 0 || file >= (int32_t) c.files.size()) {
            return refuse(what + "file " + std::to_string(file) + " is not registered");
        }
        if (offset % k_page != 0 || expert_stride % k_page != 0) {
            return refuse(what + "offset " + std::to_string(offset) + " and stride " + std::to_string(expert_stride) +
                          " must be multiples of " + std::to_string(k_page));
        }
        if (bytes_per_expert == 0 || expert_stride < bytes_per_expert) {
            return refuse(what + std::to_string(bytes_per_expert) + " bytes per expert do not fit a stride of " +
                          std::to_string(expert_stride));
        }
        c.banks.push_back({ name, file, offset, expert_stride, bytes_per_expert, {} });
        return 0;
    });
}

int32_t llama_flashflex_config_bank_checksums(int32_t          id,
                                              const char *     name,
                                              const uint64_t * checksums,
                                              size_t           n_experts) {
    if (name == nullptr || (checksums == nullptr && n_experts > 0)) {
        return refuse("config_bank_checksums: the name or the checksums are NULL");
    }
    return with_config(id, [&](config & c) -> int32_t {
        for (auto & b : c.banks) {
            if (b.name == name) {
                b.checksums.assign(checksums, checksums + n_experts);
                return 0;
            }
        }
        return refuse("config_bank_checksums: " + std::string(name) + " is not banked (call config_bank_tensor first)");
    });
}

int32_t llama_flashflex_config_set_string(int32_t id, const char * key, const char * value) {
    if (key == nullptr || value == nullptr) {
        return refuse("config_set_string: the key or value is NULL");
    }
    const std::string k = key, v = value;
    return with_config(id, [&](config & c) -> int32_t {
        if (k == "moe_trace") {
            c.moe_trace = v;
        } else if (k == "moe_prefetch" && (v == "none" || v == "router-lookahead" || v == "oracle")) {
            c.moe_prefetch = v;
        } else if (k == "moe_prefetch") {
            return refuse("config_set_string: moe_prefetch " + v + " is not none, router-lookahead or oracle");
        } else {
            return refuse("config_set_string: unknown key " + k);
        }
        return 0;
    });
}

int32_t llama_flashflex_config_moe_schedule(int32_t id, const int32_t * values, size_t n_values) {
    if (values == nullptr && n_values > 0) {
        return refuse("config_moe_schedule: the values are NULL");
    }
    // well-formed: every record is layer, n > 0, n ids
    for (size_t i = 0; i < n_values;) {
        if (i + 1 >= n_values || values[i] < 0 || values[i + 1] <= 0 || i + 2 + (size_t) values[i + 1] > n_values) {
            return refuse("config_moe_schedule: malformed record at value " + std::to_string(i));
        }
        i += 2 + (size_t) values[i + 1];
    }
    return with_config(id, [&](config & c) -> int32_t {
        c.moe_schedule.assign(values, values + n_values);
        return 0;
    });
}

void llama_flashflex_config_free(int32_t id) {
    std::lock_guard<std::mutex> lk(g_configs_mutex);
    g_configs.erase(id);
}

const char * llama_flashflex_last_error(void) {
    return g_last_error.c_str();
}
