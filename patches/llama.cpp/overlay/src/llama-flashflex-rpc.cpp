// flashflex and other devices: the backend devices this process sees (for placement and reports), a context's
// memory per device, and ggml's RPC backend (see include/llama-flashflex.h):
// - a worker serves this host's devices through ggml_backend_rpc_start_server, optionally announcing a memory size
//   of its own choosing to clients (a device wrapper whose get_memory reports it; everything else is the device's);
// - a client registers a worker's devices (ggml_backend_rpc_add_server + ggml_backend_register), so llama.cpp's
//   device list holds them and a model can place layers there;
// - ggml's RPC client aborts the process when a worker goes away (RPC_STATUS_ASSERT): flashflex's abort callback
//   turns that into one line naming the worker that stopped answering, and exits with status 1 instead of a crash.

#include "ggml-backend.h"
#include "llama-ext.h"
#include "llama-flashflex-config.h"
#include "llama-flashflex-json.h"
#include "llama-flashflex-runtime.h"
#include "llama-flashflex.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#ifdef GGML_USE_RPC
#    include "../ggml/src/ggml-backend-impl.h"
#    include "ggml-rpc.h"
#endif

#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <vector>

using namespace flashflex;

namespace {

const char * device_type_name(enum ggml_backend_dev_type type) {
    switch (type) {
        case GGML_BACKEND_DEVICE_TYPE_CPU:
            return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU:
            return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU:
            return "igpu";
        case GGML_BACKEND_DEVICE_TYPE_ACCEL:
            return "accel";
        default:
            return "other";
    }
}

std::string device_json(size_t index, ggml_backend_dev_t dev) {
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    return json_object()
        .add("index", index)
        .add("name", ggml_backend_dev_name(dev))
        .add("description", ggml_backend_dev_description(dev))
        .add("type", device_type_name(ggml_backend_dev_type(dev)))
        .add("backend", reg ? ggml_backend_reg_name(reg) : "")
        .add("free", free)
        .add("total", total)
        .str();
}

#ifdef GGML_USE_RPC

// ---------------------------------------------------------------------------------------------------------
// Client side: registered workers, and the abort callback that names the one that went away.

// g_register_mutex serialises registrations (held across ggml's handshake, which may abort); g_names_mutex guards
// the endpoints the abort callback reads and is never held across a call into ggml, so the callback cannot wait on
// its own thread.
std::mutex                     g_register_mutex;
std::map<std::string, int32_t> g_workers;  // endpoint -> its device count, once registered
std::mutex                     g_names_mutex;
std::vector<std::string>       g_names;    // registered endpoints, and the one being registered
ggml_abort_callback_t          g_previous_abort = nullptr;
// The real stderr, saved when the callback is installed (before any model loads): llama-cpp-python points fd 2 at
// /dev/null while it loads a model, and a worker that goes away then must still get its one line.
int                            g_stderr_fd      = 2;

// ggml's RPC client says a worker supports every op, custom ops too, which hold pointers into this process (the
// worker refuses them). A worker's devices say they do not: flashflex's custom ops are then placed as with a local GPU
// that lacks them (place_on_cpu leaves them to the scheduler, which puts them on the CPU without stopping its
// expansion of GPU assignments), so a host layer's ops that stock llama.cpp offloads to a local GPU beside the workers
// stay there. Every other op is the RPC client's answer.
bool (*g_rpc_supports_op)(ggml_backend_dev_t, const ggml_tensor *) = nullptr;

bool rpc_supports_op(ggml_backend_dev_t dev, const ggml_tensor * op) {
    if (op->op >= GGML_OP_MAP_CUSTOM1 && op->op <= GGML_OP_CUSTOM) {
        return false;
    }
    return g_rpc_supports_op(dev, op);
}

// Writes one line to the saved stderr.
void print_saved_stderr(const std::string & line) {
    size_t done = 0;
    while (done < line.size()) {
        const ssize_t n = write(g_stderr_fd, line.data() + done, line.size() - done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return;
        }
        done += (size_t) n;
    }
}

// True when a TCP connection to endpoint ("host:port") is refused or not answered within timeout_ms.
bool endpoint_down(const std::string & endpoint, int timeout_ms) {
    const size_t colon = endpoint.rfind(':');
    if (colon == std::string::npos) {
        return true;
    }
    const std::string host = endpoint.substr(0, colon);
    const std::string port = endpoint.substr(colon + 1);
    addrinfo          hints{};
    hints.ai_family   = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * res    = nullptr;
    if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0 || res == nullptr) {
        return true;
    }
    bool down = true;
    int  fd   = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
    if (fd >= 0) {
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL, 0) | O_NONBLOCK);
        int rc = connect(fd, res->ai_addr, res->ai_addrlen);
        if (rc == 0) {
            down = false;
        } else if (errno == EINPROGRESS) {
            pollfd p{ fd, POLLOUT, 0 };
            if (poll(&p, 1, timeout_ms) == 1) {
                int       err = 0;
                socklen_t len = sizeof(err);
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                down = err != 0;
            }
        }
        close(fd);
    }
    freeaddrinfo(res);
    return down;
}

// ggml's abort callback: ggml's RPC client aborts when a worker stops answering (its connection closed or reset).
// For those, say which worker in one line and exit 1; anything else goes to the previous callback (or is printed)
// and aborts as before.
void rpc_abort_callback(const char * message) {
    const bool rpc =
        message != nullptr && (strstr(message, "ggml-rpc") != nullptr || strstr(message, "RPC") != nullptr);
    if (!rpc) {
        if (g_previous_abort) {
            g_previous_abort(message);
        } else {
            fprintf(stderr, "%s\n", message ? message : "");
        }
        return;
    }
    std::vector<std::string> endpoints;
    if (g_names_mutex.try_lock()) {
        endpoints = g_names;
        g_names_mutex.unlock();
    }
    std::string down, all;
    for (const auto & e : endpoints) {
        all += (all.empty() ? "" : ", ") + e;
        if (endpoint_down(e, 1000)) {
            down += (down.empty() ? "" : ", ") + e;
        }
    }
    const char * why  = strstr(message, ": ");  // "file:line: what": keep "what"
    std::string  what = why ? why + 2 : message;
    while (!what.empty() && (what.back() == '\n' || what.back() == ' ')) {
        what.pop_back();
    }
    if (!down.empty()) {
        print_saved_stderr("error: the RPC worker " + down + " stopped answering during the run (" + what +
                           ") — check that flashflex rpc-server still runs there and is reachable, then rerun\n");
    } else {
        print_saved_stderr("error: an RPC worker (" + (all.empty() ? std::string("unknown") : all) +
                           ") stopped answering during the run (" + what +
                           ") — check the workers (flashflex rpc-server) and the network, then rerun\n");
    }
    _exit(1);
}

// ---------------------------------------------------------------------------------------------------------
// Worker side: a device that announces a memory size chosen by the worker.

struct announced_device {
    ggml_backend_device dev;  // first: the handle ggml sees is &dev
    ggml_backend_dev_t  real;
    size_t              bytes;
};

std::deque<announced_device> g_announced;  // stable addresses for the life of the process

announced_device * announced(ggml_backend_dev_t dev) {
    return reinterpret_cast<announced_device *>(dev);
}

void announced_get_memory(ggml_backend_dev_t dev, size_t * free, size_t * total) {
    announced_device * a         = announced(dev);
    size_t             real_free = 0, real_total = 0;
    a->real->iface.get_memory(a->real, &real_free, &real_total);
    *total = a->bytes;
    *free  = std::min(a->bytes, real_free);
}

void announced_get_props(ggml_backend_dev_t dev, struct ggml_backend_dev_props * props) {
    announced_device * a = announced(dev);
    a->real->iface.get_props(a->real, props);
    announced_get_memory(dev, &props->memory_free, &props->memory_total);
}

ggml_backend_t announced_init_backend(ggml_backend_dev_t dev, const char * params) {
    announced_device * a       = announced(dev);
    ggml_backend_t     backend = a->real->iface.init_backend(a->real, params);
    if (backend) {
        backend->device = dev;  // the RPC server asks the backend's device for its memory
    }
    return backend;
}

ggml_backend_dev_t announce(ggml_backend_dev_t real, size_t bytes) {
    g_announced.push_back({ *real, real, bytes });
    announced_device & a     = g_announced.back();
    a.dev.iface.get_memory   = announced_get_memory;
    a.dev.iface.get_props    = announced_get_props;
    a.dev.iface.init_backend = announced_init_backend;
    return &a.dev;
}

#endif  // GGML_USE_RPC

// The bytes of each model layer's KV cache in `cache` added to `out` (indexed by layer): K as allocated, V from its
// row size (the K tensor gives the cells and streams), the widest V row where layers differ (the cache pads to it
// without flash attention; the larger figure is the safe one to plan with). A layer sharing another's cache adds
// nothing.
void add_kv_layers(const llama_kv_cache & cache, const llama_hparams & hp, std::vector<size_t> & out) {
    std::vector<const ggml_tensor *> seen;
    for (uint32_t il : cache.get_layer_ids()) {
        const ggml_tensor * k = cache.get_k_storage((int32_t) il);
        if (k == nullptr || il >= out.size() || std::find(seen.begin(), seen.end(), k) != seen.end()) {
            continue;
        }
        seen.push_back(k);
        const uint32_t n_embd_v = hp.is_n_embd_v_gqa_variable() ? hp.n_embd_v_gqa_max() : hp.n_embd_v_gqa(il);
        const size_t   v_bytes  = hp.is_mla() ? 0 : ggml_row_size(cache.type_v(), n_embd_v) * k->ne[1] * k->ne[2];
        out[il] += ggml_nbytes(k) + v_bytes;
    }
}

// Each layer's KV cache bytes for a context whose memory is a KV cache (with or without sliding-window layers);
// empty for other memories (recurrent, hybrid), whose callers keep their own estimate.
std::vector<size_t> kv_layer_bytes(const struct llama_context * ctx) {
    const llama_model * model = llama_get_model(ctx);
    llama_memory_t      mem   = llama_get_memory(ctx);
    std::vector<size_t> out(model->hparams.n_layer(), 0);
    if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa *>(mem)) {
        add_kv_layers(*iswa->get_base(), model->hparams, out);
        add_kv_layers(*iswa->get_swa(), model->hparams, out);
    } else if (const auto * kv = dynamic_cast<const llama_kv_cache *>(mem)) {
        add_kv_layers(*kv, model->hparams, out);
    } else {
        out.clear();
    }
    return out;
}

// One JSON object per buffer type of a memory breakdown: where it lives and the bytes of each use (with `compute`,
// the scheduler's compute buffers too).
std::vector<std::string> buffers_json(const llama_memory_breakdown & sizes, bool compute) {
    std::vector<std::string> items;
    for (const auto & [buft, mb] : sizes) {
        ggml_backend_dev_t dev  = ggml_backend_buft_get_device(buft);
        json_object        item = json_object()
                               .add("buffer_type", ggml_backend_buft_name(buft))
                               .add("device", dev ? ggml_backend_dev_name(dev) : "")
                               .add("description", dev ? ggml_backend_dev_description(dev) : "")
                               .add("host", ggml_backend_buft_is_host(buft))
                               .add("model", mb.model)
                               .add("context", mb.context);
        if (compute) {
            item.add("compute", mb.compute);
        }
        items.push_back(item.str());
    }
    return items;
}

}  // namespace

ggml_tensor * flashflex::place_on_cpu(ggml_tensor * t) {
    if (t == nullptr) {
        return t;
    }
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU && ggml_backend_dev_supports_op(dev, t)) {
            return pin_to_cpu(t);
        }
    }
    return t;
}

// -------------------------------------------------------------------------------------------------------------
// Public C API

int32_t llama_flashflex_devices(char * buf, size_t buf_size) {
    std::vector<std::string> items;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        items.push_back(device_json(i, ggml_backend_dev_get(i)));
    }
    return write_c_string(json_object().add_array("devices", items).str(), buf, buf_size);
}

ggml_backend_dev_t llama_flashflex_device(int32_t index) {
    if (index < 0 || (size_t) index >= ggml_backend_dev_count()) {
        refuse("no backend device has index " + std::to_string(index));
        return nullptr;
    }
    return ggml_backend_dev_get((size_t) index);
}

int32_t llama_flashflex_memory_breakdown(const struct llama_context * ctx, char * buf, size_t buf_size) {
    if (ctx == nullptr) {
        return -1;
    }
    std::vector<std::string> kv_layers;
    for (size_t bytes : kv_layer_bytes(ctx)) {
        kv_layers.push_back(std::to_string(bytes));
    }
    return write_c_string(json_object()
                              .add_array("buffers", buffers_json(llama_get_memory_breakdown(ctx), true))
                              .add_array("kv_layers", kv_layers)
                              .str(),
                          buf, buf_size);
}

int32_t llama_flashflex_placement(const struct llama_context * ctx, char * buf, size_t buf_size) {
    if (ctx == nullptr) {
        return -1;
    }
    // the model's buffers and the context's memory only: both are allocated once, at load and at context creation,
    // where the scheduler's compute buffers may be reallocated by the decode running on another thread
    llama_memory_breakdown sizes;
    for (const auto & [buft, bytes] : llama_get_model(ctx)->memory_breakdown()) {
        sizes[buft].model += bytes;
    }
    if (llama_memory_t mem = llama_get_memory(ctx)) {
        for (const auto & [buft, bytes] : mem->memory_breakdown()) {
            sizes[buft].context += bytes;
        }
    }
    return write_c_string(json_object().add_array("buffers", buffers_json(sizes, false)).str(), buf, buf_size);
}

int32_t llama_flashflex_rpc_add_server(const char * endpoint) {
#ifdef GGML_USE_RPC
    if (endpoint == nullptr || strchr(endpoint, ':') == nullptr) {
        return refuse("an RPC worker is HOST:PORT");
    }
    std::lock_guard<std::mutex> lk(g_register_mutex);
    auto                        it = g_workers.find(endpoint);
    if (it != g_workers.end()) {
        return it->second;
    }
    static bool callback_installed = false;
    if (!callback_installed) {
        const int saved    = fcntl(2, F_DUPFD_CLOEXEC, 3);
        g_stderr_fd        = saved >= 0 ? saved : 2;
        g_previous_abort   = ggml_set_abort_callback(rpc_abort_callback);
        callback_installed = true;
    }
    {
        std::lock_guard<std::mutex> names(g_names_mutex);
        g_names.push_back(endpoint);                                 // named if the handshake below aborts
    }
    ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint);  // connects; aborts if the worker is gone
    if (reg == nullptr || ggml_backend_reg_dev_count(reg) == 0) {
        std::lock_guard<std::mutex> names(g_names_mutex);
        g_names.pop_back();
        return refuse(std::string("the RPC worker at ") + endpoint + " serves no devices");
    }
    for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) {
        ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, i);  // the device object its backends use too
        if (dev->iface.supports_op != rpc_supports_op) {
            g_rpc_supports_op      = dev->iface.supports_op;
            dev->iface.supports_op = rpc_supports_op;
        }
    }
    ggml_backend_register(reg);
    const int32_t n     = (int32_t) ggml_backend_reg_dev_count(reg);
    g_workers[endpoint] = n;
    return n;
#else
    (void) endpoint;
    return refuse("this build has no RPC backend (rebuild with flashflex build)");
#endif
}

int32_t llama_flashflex_rpc_serve(const char *    endpoint,
                                  const char *    cache_dir,
                                  int32_t         n_threads,
                                  uint64_t        announce_bytes,
                                  const int32_t * device_indices,
                                  size_t          n_devices) {
#ifdef GGML_USE_RPC
    if (endpoint == nullptr || strchr(endpoint, ':') == nullptr) {
        return refuse("an RPC endpoint is HOST:PORT");
    }
    if (n_devices == 0 || device_indices == nullptr) {
        return refuse("no device to serve");
    }
    std::vector<ggml_backend_dev_t> devices;
    for (size_t i = 0; i < n_devices; ++i) {
        ggml_backend_dev_t dev = llama_flashflex_device(device_indices[i]);
        if (dev == nullptr) {
            return -1;
        }
        devices.push_back(announce_bytes > 0 ? announce(dev, (size_t) announce_bytes) : dev);
    }
    setvbuf(stdout, nullptr, _IOLBF, 0);  // ggml's server logs with printf: one line at a time
    ggml_backend_rpc_start_server(endpoint, cache_dir && *cache_dir ? cache_dir : nullptr,
                                  (size_t) std::max<int32_t>(1, n_threads), devices.size(), devices.data());
    // it only returns when it could not start
    return refuse(std::string("the RPC server could not listen on ") + endpoint +
                  " (the port is in use, or this host has no such address)");
#else
    (void) endpoint;
    (void) cache_dir;
    (void) n_threads;
    (void) announce_bytes;
    (void) device_indices;
    (void) n_devices;
    return refuse("this build has no RPC backend (rebuild with flashflex build)");
#endif
}
