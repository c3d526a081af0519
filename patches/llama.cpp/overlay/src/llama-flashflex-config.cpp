// flashflex configurations and call sites: the C API that builds a per-model configuration before a load,
// and the functions upstream files call (llama-flashflex-internal.h), which hand each model to the execution
// paths its configuration asks for (dense streaming, MoE slot banks). A model loaded without a configuration
// never reaches either path: every call site is then a no-op, so the stock path stays stock.

#include "llama-flashflex.h"
#include "llama-flashflex-internal.h"
#include "llama-flashflex-runtime.h"

#include "llama-impl.h"
#include "llama-model-loader.h"

#include "ggml.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>

#include <fcntl.h>
#include <unistd.h>

namespace flashflex {

std::vector<open_file> open_files(const std::vector<std::string> & paths, int direct_io, bool & direct) {
    direct = direct_io > 0;
    std::vector<open_file> files;
    void * probe = nullptr;
    if (posix_memalign(&probe, k_page, k_page) != 0) {
        throw std::runtime_error("flashflex: out of memory");
    }
    auto fail = [&](const std::string & msg) {
        free(probe);
        close_files(files);
        throw std::runtime_error(msg);
    };
    for (const auto & path : paths) {
        open_file fh;
        fh.path = path;
#ifdef O_DIRECT
        if (direct) {
            fh.fd = open(path.c_str(), O_RDONLY | O_DIRECT);
            if (fh.fd >= 0 && pread(fh.fd, probe, k_page, 0) < 0) {
                close(fh.fd);
                fh.fd = -1;
            }
            if (fh.fd < 0 && errno != ENOENT) {
                if (direct_io >= 2) {
                    fail(format("flashflex: direct I/O is not available for %s (%s) and strict direct I/O was "
                                "requested", path.c_str(), strerror(errno)));
                }
                LLAMA_LOG_WARN("flashflex: direct I/O unavailable for %s (%s); using buffered reads\n",
                               path.c_str(), strerror(errno));
                direct = false;
            }
        }
#else
        if (direct && direct_io >= 2) {
            fail("flashflex: direct I/O is not supported on this platform");
        }
        direct = false;
#endif
        if (fh.fd < 0) {
            fh.fd = open(path.c_str(), O_RDONLY);
            if (fh.fd < 0) {
                fail(format("flashflex: cannot open %s: %s", path.c_str(), strerror(errno)));
            }
        }
        files.push_back(fh);
    }
    free(probe);
    if (!direct) {
        // a file opened with O_DIRECT before a later one fell back: reopen everything buffered
        for (auto & fh : files) {
            close(fh.fd);
            fh.fd = open(fh.path.c_str(), O_RDONLY);
            if (fh.fd < 0) {
                const std::string msg = format("flashflex: cannot open %s: %s", fh.path.c_str(), strerror(errno));
                close_files(files);
                throw std::runtime_error(msg);
            }
        }
    }
    return files;
}

void close_files(std::vector<open_file> & files) {
    for (auto & f : files) {
        if (f.fd >= 0) {
            close(f.fd);
            f.fd = -1;
        }
    }
}

long long pread_full(int fd, void * dst, size_t len, uint64_t offset) {
    size_t done = 0;
    while (done < len) {
        const ssize_t n = pread(fd, (uint8_t *) dst + done, len - done, (off_t) (offset + done));
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (n == 0) {
            break;
        }
        done += (size_t) n;
    }
    return (long long) done;
}

uint64_t expert_checksum(const void * data, size_t n) {
    const uint8_t * p = (const uint8_t *) data;
    const size_t full = n / 8;
    uint64_t sum = 0;
    for (size_t i = 0; i < full; ++i) {
        uint64_t w;
        memcpy(&w, p + 8 * i, 8);
        sum += w * (2 * (uint64_t) i + 1);
    }
    if (n % 8) {
        uint64_t w = 0;
        memcpy(&w, p + 8 * full, n % 8);
        sum += w * (2 * (uint64_t) full + 1);
    }
    return sum;
}

int layer_of(const std::string & name) {
    int il = -1;
    if (sscanf(name.c_str(), "blk.%d.", &il) != 1) {
        return -1;
    }
    return il;
}

std::string json_escape(const std::string & s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
        }
        out += (unsigned char) c < 0x20 ? ' ' : c;
    }
    return out + "\"";
}

int32_t write_c_string(const std::string & s, char * buf, size_t size) {
    if (buf && size > 0) {
        const size_t n = std::min(s.size(), size - 1);
        memcpy(buf, s.data(), n);
        buf[n] = '\0';
    }
    return (int32_t) s.size();
}

} // namespace flashflex

using namespace flashflex;

namespace {

thread_local std::string g_last_error;
thread_local std::string g_model_error;

std::mutex                g_configs_mutex;
std::map<int32_t, config> g_configs;
int32_t                   g_next_config = 1;

// Every refusal of the configuration API says why (llama_flashflex_last_error), so the caller can print it.
int32_t refuse(const std::string & why) {
    g_last_error = why;
    return -1;
}

// Runs fn on the configuration `id` under the registry lock; a refusal when there is none.
template <typename F>
int32_t with_config(int32_t id, F && fn) {
    std::lock_guard<std::mutex> lk(g_configs_mutex);
    auto it = g_configs.find(id);
    return it == g_configs.end() ? refuse("no flashflex configuration has id " + std::to_string(id)) : fn(it->second);
}

} // namespace

// -------------------------------------------------------------------------------------------------------------
// Public C API: configurations

int32_t llama_flashflex_config_new(void) {
    std::lock_guard<std::mutex> lk(g_configs_mutex);
    const int32_t id = g_next_config++;
    g_configs[id] = config{};
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
            static const char * const known[] = {"prefetch_threads", "window", "direct_io", "moe_slots",
                                                 "moe_io_threads", "moe_shared_only", "moe_prefetch_ranks",
                                                 "moe_preload", "moe_verify"};
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

int32_t llama_flashflex_config_stream_tensor(int32_t id, const char * name, int32_t file, uint64_t offset,
                                             uint64_t nbytes) {
    return with_config(id, [&](config & c) -> int32_t {
        if (name == nullptr || file < 0 || file >= (int32_t) c.files.size()) {
            return refuse("config_stream_tensor: " + std::string(name ? name : "(NULL name)") + " names file " +
                          std::to_string(file) + " of " + std::to_string(c.files.size()) + " registered");
        }
        c.tensors.push_back({name, file, offset, nbytes});
        return 0;
    });
}

int32_t llama_flashflex_config_bank_tensor(int32_t id, const char * name, int32_t file, uint64_t offset,
                                           uint64_t expert_stride, uint64_t bytes_per_expert) {
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
        c.banks.push_back({name, file, offset, expert_stride, bytes_per_expert, {}});
        return 0;
    });
}

int32_t llama_flashflex_config_bank_checksums(int32_t id, const char * name, const uint64_t * checksums,
                                              size_t n_experts) {
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

const char * llama_flashflex_model_error(const llama_model * model) {
    std::string err;
    if (!stream_failed(model, &err) && !moe_failed(model, &err)) {
        return nullptr;
    }
    g_model_error = err;
    return g_model_error.c_str();
}

// Process-wide, like the signal it stands for: set from Python when SIGINT arrives during llama_decode (a
// watcher thread runs while the decode holds no GIL), cleared before the next run.
static std::atomic<bool> g_interrupt{false};

void llama_flashflex_interrupt(bool on) {
    g_interrupt.store(on, std::memory_order_relaxed);
}

bool llama_flashflex_abort_callback(void * model) {
    if (g_interrupt.load(std::memory_order_relaxed)) {
        return true;
    }
    const auto * m = (const llama_model *) model;
    return m != nullptr && (stream_failed(m, nullptr) || moe_failed(m, nullptr));
}

// -------------------------------------------------------------------------------------------------------------
// Call sites (llama-flashflex-internal.h)

void llama_flashflex_on_tensors_created(const llama_model & model, llama_model_loader & ml) {
    auto ov = ml.kv_overrides.find("flashflex.config");
    if (ov == ml.kv_overrides.end()) {
        return; // stock path
    }
    try {
        if (ov->second.tag != LLAMA_KV_OVERRIDE_TYPE_INT) {
            throw std::runtime_error("flashflex: the flashflex.config override must be an int");
        }
        config cfg;
        if (with_config((int32_t) ov->second.val_i64, [&](config & c) { cfg = c; return 0; }) != 0) {
            throw std::runtime_error(format("flashflex: no configuration with id %lld", (long long) ov->second.val_i64));
        }
        if (cfg.tensors.empty() && cfg.banks.empty()) {
            throw std::runtime_error("flashflex: the configuration streams no tensor and banks no expert");
        }
        if (ml.use_mmap) {
            throw std::runtime_error("flashflex: a flashflex configuration needs the model loaded without mmap "
                                     "(load_mode none / use_mmap=False)");
        }
        if (!cfg.tensors.empty()) {
            stream_setup(model, ml, cfg);
        }
        if (!cfg.banks.empty()) {
            moe_setup(model, ml, cfg);
        }
    } catch (const std::exception & e) {
        stream_free(&model);
        moe_free(&model);
        g_last_error = e.what();
        throw;
    }
}

bool llama_flashflex_ctx_is_placed(const llama_model & model, ggml_context * ctx) {
    if (!stream_active(&model) && !moe_active(&model)) {
        return false;
    }
    // placed = flashflex already gave every tensor of the context its memory
    ggml_tensor * t = ggml_get_first_tensor(ctx);
    if (!t) {
        return false;
    }
    for (; t; t = ggml_get_next_tensor(ctx, t)) {
        if (t->data == nullptr) {
            return false;
        }
    }
    return true;
}

void llama_flashflex_on_model_free(const llama_model * model) {
    stream_free(model);
    moe_free(model);
}

llama_flashflex_graph_scope::llama_flashflex_graph_scope(const llama_model * model) {
    stream_graph_begin(model);
    moe_graph_begin(model);
}

llama_flashflex_graph_scope::~llama_flashflex_graph_scope() {
    stream_graph_end();
    moe_graph_end();
}

ggml_tensor * llama_flashflex_layer_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done) {
    return moe_boundary(ctx, stream_boundary(ctx, cur, il_done), il_done);
}

ggml_tensor * llama_flashflex_mul_mat_id(ggml_context * ctx, ggml_tensor * as, ggml_tensor * b, ggml_tensor * ids) {
    return moe_mul_mat_id(ctx, as, b, ids);
}

uint32_t llama_flashflex_graph_nodes(const llama_model & model, uint32_t n_tokens) {
    return moe_graph_nodes(&model, n_tokens);
}
