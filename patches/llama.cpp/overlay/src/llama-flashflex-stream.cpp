// flashflex dense weight streaming: a planned set of weight tensors is not loaded with the model but read
// from the GGUF, layer by layer, into a ring of `window` slots, by prefetch threads working ahead of compute.
//
// Design (see include/llama-flashflex.h for the public API):
// - Placement: every streamed tensor of streamed layer #i (i counts only layers that stream something) gets a
//   fixed home in slot i % window, so tensor->data never changes and the graph needs no rewriting. Tensors the
//   loader put in the plain CPU buffer type are read straight into their home (O_DIRECT: the read covers the
//   4096-aligned superset of the tensor, and tensor->data points at the tensor inside it). Tensors the loader
//   put in another CPU buffer type (the repacked layout) get their home in a buffer of that type and are read
//   into a staging buffer, then written with ggml_backend_tensor_set, which repacks them exactly as the stock
//   load does — so the same kernels run and the logits stay bitwise identical.
// - Synchronisation: an in-place no-op graph node at every layer boundary (after the input embeddings and
//   after each layer) releases the layer just computed and waits until the next layer's bytes are in place.
//   Acquiring layer L also queues the reads of the next window-1 streamed layers into their slots.
// - Failure: a read error marks the model failed; the boundary stops waiting, and the abort callback
//   (llama_flashflex_abort_callback) makes llama_decode return an error instead of computing on bad data.

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-flashflex-io.h"
#include "llama-flashflex-json.h"
#include "llama-flashflex-runtime.h"
#include "llama-flashflex.h"
#include "llama-impl.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

using namespace flashflex;

namespace {

constexpr size_t k_chunk = 4u << 20;  // one read job moves at most this many bytes

// ---------------------------------------------------------------------------------------------------------
// Per-model runtime.

struct stream_tensor {
    ggml_tensor * t;
    int           file;
    uint64_t      read_off;  // file offset of the aligned superset
    size_t        read_len;  // its length (multiple of 4096)
    size_t        head;      // the tensor starts this many bytes into the superset
    size_t        nbytes;
    bool          staged;    // read into staging, then ggml_backend_tensor_set (repacked layout)
    uint8_t *     home;      // direct tensors: where the superset is read to
};

struct stream_layer {
    int                        layer;
    std::vector<stream_tensor> tensors;
    size_t                     bytes = 0;
};

struct slot {
    int      layer   = -1;  // streamed-layer index whose bytes are (being) placed here
    uint64_t gen     = 0;   // bumped on every new load, so stale jobs are dropped
    int      pending = 0;   // jobs not finished for this gen
    bool     ready   = false;
    bool     in_use  = false;
};

struct boundary {
    struct stream_state * st;
    int                   il_done;
};

struct stream_state {
    config                    cfg;
    int                       n_layer = 0;
    std::vector<stream_layer> layers;  // streamed layers in order
    std::vector<int>          li_of;   // model layer -> streamed-layer index, -1 if it streams nothing
    std::vector<open_file>    files;
    bool                      direct = false;

    // ring memory
    void *                             ring_plain = nullptr;
    ggml_backend_buffer_t              buf_plain  = nullptr;
    std::vector<ggml_backend_buffer_t> bufs_staged;
    size_t                             ring_bytes    = 0;
    size_t                             staging_bytes = 0;

    // slots (guarded by pool.mutex()) and the prefetch threads that fill them
    io_pool           pool;
    std::vector<slot> slots;
    void *            sync_staging = nullptr;  // staging for synchronous reads (-tp 0)

    // graph boundaries
    std::deque<boundary> boundaries;  // stable addresses for graph userdata
    std::vector<bool>    seen_after;  // boundary after layer il seen in the graph being built
    bool                 seen_input = false;

    failure failed;

    // stats
    std::atomic<uint64_t> bytes_read{ 0 };
    std::atomic<int64_t>  read_ns{ 0 };
    std::atomic<int64_t>  wait_ns{ 0 };
    std::atomic<uint64_t> layer_loads{ 0 };
    std::atomic<uint64_t> layer_waits{ 0 };
    std::atomic<uint64_t> acquires{ 0 };

    ~stream_state() { stop(); }

    void stop() {
        pool.stop();
        close_files(files);
        if (buf_plain) {
            ggml_backend_buffer_free(buf_plain);
            buf_plain = nullptr;
        }
        for (auto * b : bufs_staged) {
            ggml_backend_buffer_free(b);
        }
        bufs_staged.clear();
        free(ring_plain);
        ring_plain = nullptr;
        free(sync_staging);
        sync_staging = nullptr;
    }

    int window() const { return (int) slots.size(); }

    int slot_of(int li) const { return li % window(); }

    // Never called with pool.mutex() held: it takes the lock, so a compute thread that is about to wait for a
    // slot cannot miss the wake-up.
    void fail(const std::string & msg) {
        {
            std::lock_guard<std::mutex> lk(pool.mutex());
            failed.set(msg);
        }
        pool.done_cv().notify_all();
    }

    // Read [begin, end) of tensor ti's superset of streamed layer li (direct), or the whole tensor (staged).
    void read_range(int li, int ti, size_t begin, size_t end, void * staging) {
        const stream_tensor & st  = layers[li].tensors[ti];
        uint8_t *             dst = st.staged ? (uint8_t *) staging : st.home;
        const int64_t         t0  = now_ns();
        const long long       n   = pread_full(files[st.file].fd, dst + begin, end - begin, st.read_off + begin);
        if (n < 0) {
            fail(format("reading %s from %s failed: %s", ggml_get_name(st.t), files[st.file].path.c_str(),
                        strerror(errno)));
            return;
        }
        const size_t done = begin + (size_t) n;  // short only at the end of the file
        // The superset may run past the end of the file; the tensor bytes may not.
        if (done < std::min(end, st.head + st.nbytes)) {
            fail(format("%s ended early while reading %s (the file shrank or changed since the plan was made)",
                        files[st.file].path.c_str(), ggml_get_name(st.t)));
            return;
        }
        bytes_read.fetch_add(done - begin);
        if (st.staged) {
            ggml_backend_tensor_set(st.t, dst + st.head, 0, st.nbytes);
        }
        read_ns.fetch_add(now_ns() - t0);
    }

    // Queue (or, without threads, perform) the reads of streamed layer li into its slot. pool.mutex() is held.
    void start_load(int li, std::unique_lock<std::mutex> & lk) {
        slot & s = slots[slot_of(li)];
        s.layer  = li;
        s.gen++;
        s.ready   = false;
        s.pending = 0;
        layer_loads.fetch_add(1);
        const stream_layer & L = layers[li];
        if (pool.threads() == 0) {
            lk.unlock();
            for (size_t ti = 0; ti < L.tensors.size() && !failed.is_set(); ++ti) {
                read_range(li, (int) ti, 0, L.tensors[ti].read_len, sync_staging);
            }
            lk.lock();
            s.ready = true;
            return;
        }
        for (size_t ti = 0; ti < L.tensors.size(); ++ti) {
            const stream_tensor & st   = L.tensors[ti];
            // a staged tensor is one job (its staging buffer holds it whole); a direct one, chunks of k_chunk
            const size_t          step = st.staged ? st.read_len : k_chunk;
            for (size_t b = 0; b < st.read_len; b += step) {
                queue_read(slot_of(li), s.gen, li, (int) ti, b, std::min(st.read_len, b + step));
                s.pending++;
            }
        }
        if (s.pending == 0) {
            s.ready = true;
        }
        pool.wake();
    }

    // One read job into slot sl for its load `gen`: dropped when the slot has moved on to another load.
    void queue_read(int sl, uint64_t gen, int li, int ti, size_t begin, size_t end) {
        pool.push({
            [this, sl, gen] { return slots[sl].gen == gen; },
            [this, li, ti, begin, end](void * staging) { read_range(li, ti, begin, end, staging); },
            [this, sl, gen] {
                slot & s = slots[sl];
                if (s.gen == gen && --s.pending == 0) {
                    s.ready = true;
                }
            },
        });
    }

    // Compute thread: make streamed layer li's bytes available, then queue the next layers' reads.
    void acquire(int li) {
        acquires.fetch_add(1);
        std::unique_lock<std::mutex> lk(pool.mutex());
        auto &                       cv = pool.done_cv();
        slot &                       s  = slots[slot_of(li)];
        if (!(s.layer == li && s.in_use)) {
            if (s.layer != li) {
                // the slot still holds (or loads) another layer: let its in-flight jobs drain, then load ours
                cv.wait(lk, [&] { return s.pending == 0 || failed.is_set() || pool.stopping(); });
                start_load(li, lk);
            }
            if (!s.ready && !failed.is_set()) {
                layer_waits.fetch_add(1);
                const int64_t t0 = now_ns();
                cv.wait(lk, [&] { return (s.layer == li && s.ready) || failed.is_set() || pool.stopping(); });
                wait_ns.fetch_add(now_ns() - t0);
            }
            s.in_use = true;
        }
        // prefetch: the next window-1 streamed layers, cyclically (the next token starts at layer 0 again)
        const int n = (int) layers.size();
        for (int k = 1; k < std::min(window(), n); ++k) {
            const int next = (li + k) % n;
            slot &    ns   = slots[slot_of(next)];
            if (ns.in_use || ns.layer == next || ns.pending > 0 || pool.threads() == 0) {
                continue;
            }
            start_load(next, lk);
        }
    }

    void release(int li) {
        std::lock_guard<std::mutex> lk(pool.mutex());
        slot &                      s = slots[slot_of(li)];
        if (s.layer == li) {
            s.in_use = false;
        }
    }

    void on_boundary(int il_done) {
        if (failed.is_set()) {
            return;  // the abort callback ends the graph; never block on a failed model
        }
        if (il_done >= 0 && il_done < n_layer && li_of[il_done] >= 0) {
            release(li_of[il_done]);
        }
        const int next = il_done + 1;
        if (next < n_layer && li_of[next] >= 0) {
            acquire(li_of[next]);
        }
    }
};

model_registry<stream_state> g_models;

stream_state * find_state(const llama_model * model) {
    return g_models.find(model);
}

thread_local stream_state * g_building = nullptr;

void boundary_op(ggml_tensor * dst, const ggml_tensor * a, int ith, int nth, void * userdata) {
    (void) dst;
    (void) a;
    (void) nth;
    if (ith != 0) {
        return;
    }
    auto * b = (boundary *) userdata;
    b->st->on_boundary(b->il_done);
}

}  // namespace

// -------------------------------------------------------------------------------------------------------------
// Public C API

int32_t llama_flashflex_model_stats(const llama_model * model, char * buf, size_t buf_size) {
    stream_state * st = find_state(model);
    if (!st) {
        return -1;
    }
    size_t n_tensors = 0;
    for (const auto & L : st->layers) {
        n_tensors += L.tensors.size();
    }
    json_object out;
    out.add("streamed_layers", st->layers.size())
        .add("streamed_tensors", n_tensors)
        .add("window", st->window())
        .add("prefetch_threads", st->pool.threads())
        .add("direct_io", st->direct)
        .add("ring_bytes", st->ring_bytes)
        .add("staging_bytes", st->staging_bytes * std::max<size_t>(1, st->pool.threads()))
        .add("bytes_read", st->bytes_read.load())
        .add("read_seconds", st->read_ns.load() / 1e9)
        .add("wait_seconds", st->wait_ns.load() / 1e9)
        .add("layer_loads", st->layer_loads.load())
        .add("layer_waits", st->layer_waits.load())
        .add("acquires", st->acquires.load())
        .add_or_null("error", st->failed.message());
    return write_c_string(out.str(), buf, buf_size);
}

void llama_flashflex_model_stats_reset(const llama_model * model) {
    stream_state * st = find_state(model);
    if (!st) {
        return;
    }
    st->bytes_read  = 0;
    st->read_ns     = 0;
    st->wait_ns     = 0;
    st->layer_loads = 0;
    st->layer_waits = 0;
    st->acquires    = 0;
}

// -------------------------------------------------------------------------------------------------------------
// Entry points for the call sites (llama-flashflex-config.cpp)

void flashflex::stream_setup(const llama_model & model, llama_model_loader & ml, const config & cfg) {
    {
        auto st     = std::make_unique<stream_state>();
        st->cfg     = cfg;
        st->n_layer = (int) model.hparams.n_layer();
        st->li_of.assign(st->n_layer, -1);
        st->seen_after.assign(st->n_layer, false);

        // which context (buffer type) the loader put each tensor in
        std::unordered_map<std::string, std::pair<ggml_tensor *, ggml_backend_buffer_type_t>> model_tensors;
        std::unordered_map<std::string, ggml_context *>                                       ctx_of;
        for (auto & [key, ctx_ptr] : ml.ctx_map) {
            for (ggml_tensor * t = ggml_get_first_tensor(ctx_ptr.get()); t;
                 t               = ggml_get_next_tensor(ctx_ptr.get(), t)) {
                model_tensors[ggml_get_name(t)] = { t, key.buft };
                ctx_of[ggml_get_name(t)]        = ctx_ptr.get();
            }
        }

        // validate the plan against the file and group tensors by layer
        std::map<int, std::vector<stream_tensor>> by_layer;
        std::set<std::string>                     streamed_names;
        std::set<ggml_backend_buffer_type_t>      staged_bufts;
        for (const auto & ct : st->cfg.tensors) {
            auto w  = ml.weights_map.find(ct.name);
            auto mt = model_tensors.find(ct.name);
            if (w == ml.weights_map.end() || mt == model_tensors.end()) {
                throw std::runtime_error(
                    format("flashflex: the plan streams %s, which this model does not have "
                           "(a plan made for another model?)",
                           ct.name.c_str()));
            }
            ggml_tensor * t = mt->second.first;
            if (w->second.idx != ct.file || w->second.offs != ct.offset || ggml_nbytes(t) != ct.nbytes) {
                throw std::runtime_error(
                    format("flashflex: the plan places %s at file %d offset %llu (%llu bytes) but "
                           "the model has it at file %d offset %zu (%zu bytes): re-plan this file",
                           ct.name.c_str(), ct.file, (unsigned long long) ct.offset, (unsigned long long) ct.nbytes,
                           (int) w->second.idx, w->second.offs, ggml_nbytes(t)));
            }
            const int il = layer_of(ct.name);
            if (il < 0 || il >= st->n_layer) {
                throw std::runtime_error(
                    format("flashflex: only per-layer tensors can stream, not %s", ct.name.c_str()));
            }
            if (!streamed_names.insert(ct.name).second) {
                throw std::runtime_error(format("flashflex: the plan streams %s twice", ct.name.c_str()));
            }
            ggml_backend_buffer_type_t buft = mt->second.second;
            ggml_backend_dev_t         dev  = ggml_backend_buft_get_device(buft);
            if (dev && ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
                throw std::runtime_error(
                    format("flashflex: %s is placed on %s; dense streaming supports CPU weights only", ct.name.c_str(),
                           ggml_backend_buft_name(buft)));
            }
            stream_tensor s{};
            s.t        = t;
            s.file     = ct.file;
            s.nbytes   = ggml_nbytes(t);
            s.head     = ct.offset % k_page;
            s.read_off = ct.offset - s.head;
            s.read_len = align_up(s.head + s.nbytes, k_page);
            s.staged   = buft != ggml_backend_cpu_buffer_type();
            if (s.staged) {
                staged_bufts.insert(buft);
            }
            by_layer[il].push_back(s);
        }
        for (auto & [il, tensors] : by_layer) {
            stream_layer L;
            L.layer   = il;
            L.tensors = std::move(tensors);
            for (const auto & s : L.tensors) {
                L.bytes += s.nbytes;
            }
            st->li_of[il] = (int) st->layers.size();
            st->layers.push_back(std::move(L));
        }

        const int W = std::max(1, std::min(st->cfg.window, (int) st->layers.size()));
        st->slots.assign(W, slot{});

        // slot layout: per layer, direct tensors at page-aligned offsets of the plain ring; staged tensors at
        // offsets of a ring of their own buffer type. A slot is as large as its largest layer needs.
        size_t                                       slot_plain = 0;
        std::map<ggml_backend_buffer_type_t, size_t> slot_staged;
        std::vector<std::vector<size_t>>             offs(st->layers.size());
        for (size_t li = 0; li < st->layers.size(); ++li) {
            size_t                                       cur_plain = 0;
            std::map<ggml_backend_buffer_type_t, size_t> cur_staged;
            for (auto & s : st->layers[li].tensors) {
                if (!s.staged) {
                    offs[li].push_back(cur_plain);
                    cur_plain += s.read_len;
                } else {
                    ggml_backend_buffer_type_t buft = model_tensors[ggml_get_name(s.t)].second;
                    const size_t               a    = ggml_backend_buft_get_alignment(buft);
                    size_t &                   c    = cur_staged[buft];
                    c                               = align_up(c, std::max<size_t>(a, 64));
                    offs[li].push_back(c);
                    c += ggml_backend_buft_get_alloc_size(buft, s.t);
                    st->staging_bytes = std::max(st->staging_bytes, s.read_len);
                }
            }
            slot_plain = std::max(slot_plain, cur_plain);
            for (auto & [b, c] : cur_staged) {
                slot_staged[b] = std::max(slot_staged[b], align_up(c, k_page));
            }
        }
        if (slot_plain > 0) {
            if (posix_memalign(&st->ring_plain, k_page, slot_plain * W) != 0) {
                throw std::runtime_error(
                    format("flashflex: cannot allocate the %zu-byte streaming ring", slot_plain * W));
            }
            st->buf_plain = ggml_backend_cpu_buffer_from_ptr(st->ring_plain, slot_plain * W);
            ggml_backend_buffer_set_usage(st->buf_plain, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
            st->ring_bytes += slot_plain * W;
        }
        std::map<ggml_backend_buffer_type_t, ggml_backend_buffer_t> staged_buf;
        for (auto & [b, size] : slot_staged) {
            ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(b, size * W);
            if (!buf) {
                throw std::runtime_error(format("flashflex: cannot allocate the %zu-byte %s streaming ring", size * W,
                                                ggml_backend_buft_name(b)));
            }
            ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
            staged_buf[b] = buf;
            st->bufs_staged.push_back(buf);
            st->ring_bytes += size * W;
        }
        for (size_t li = 0; li < st->layers.size(); ++li) {
            const int sl = (int) li % W;
            for (size_t ti = 0; ti < st->layers[li].tensors.size(); ++ti) {
                stream_tensor &       s = st->layers[li].tensors[ti];
                void *                addr;
                ggml_backend_buffer_t buf;
                if (!s.staged) {
                    s.home = (uint8_t *) st->ring_plain + (size_t) sl * slot_plain + offs[li][ti];
                    addr   = s.home + s.head;
                    buf    = st->buf_plain;
                } else {
                    ggml_backend_buffer_type_t b = model_tensors[ggml_get_name(s.t)].second;
                    buf                          = staged_buf[b];
                    addr = (uint8_t *) ggml_backend_buffer_get_base(buf) + (size_t) sl * slot_staged[b] + offs[li][ti];
                }
                if (ggml_backend_tensor_alloc(buf, s.t, addr) != GGML_STATUS_SUCCESS) {
                    throw std::runtime_error(
                        format("flashflex: cannot place %s in the streaming ring", ggml_get_name(s.t)));
                }
            }
        }

        // the loader must neither allocate nor read what streams
        for (const auto & name : streamed_names) {
            ml.weights_map.erase(name);
        }

        st->files = open_files(st->cfg.files, st->cfg.direct_io, st->direct);
        if (st->staging_bytes > 0 && posix_memalign(&st->sync_staging, k_page, st->staging_bytes) != 0) {
            throw std::runtime_error("flashflex: out of memory for the staging buffer");
        }
        st->pool.start(st->cfg.prefetch_threads, st->staging_bytes, st->failed);
        LLAMA_LOG_INFO(
            "flashflex: streaming %zu tensors of %zu layers through a %d-slot ring (%.1f MiB), "
            "%d prefetch threads, %s reads\n",
            streamed_names.size(), st->layers.size(), W, st->ring_bytes / 1048576.0, st->cfg.prefetch_threads,
            st->direct ? "direct" : "buffered");
        g_models.add(&model, std::move(st));
    }
}

bool flashflex::stream_active(const llama_model * model) {
    return find_state(model) != nullptr;
}

bool flashflex::stream_failed(const llama_model * model, std::string * error) {
    stream_state * st = find_state(model);
    if (!st || !st->failed.is_set()) {
        return false;
    }
    if (error) {
        *error = st->failed.message();
    }
    return true;
}

void flashflex::stream_free(const llama_model * model) {
    if (std::unique_ptr<stream_state> st = g_models.take(model)) {
        st->stop();
    }
}

void flashflex::stream_graph_begin(const llama_model * model) {
    g_building = find_state(model);
    if (g_building) {
        std::fill(g_building->seen_after.begin(), g_building->seen_after.end(), false);
        g_building->seen_input = false;
    }
}

void flashflex::stream_graph_end() {
    stream_state * st = g_building;
    g_building        = nullptr;
    if (!st) {
        return;
    }
    // Every streamed layer needs the boundary before it and after it, or compute could race the reads.
    for (const auto & L : st->layers) {
        const bool before = L.layer == 0 ? st->seen_input : st->seen_after[L.layer - 1];
        if (!before || !st->seen_after[L.layer]) {
            st->fail(
                format("this model's graph does not mark the boundaries of layer %d, so its weights cannot "
                       "stream (architecture not supported by dense streaming)",
                       L.layer));
            return;
        }
    }
}

ggml_tensor * flashflex::stream_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done) {
    stream_state * st = g_building;
    if (!st || cur == nullptr) {
        return cur;
    }
    if (il_done < 0) {
        st->seen_input = true;
    } else if (il_done < st->n_layer) {
        st->seen_after[il_done] = true;
    }
    // a boundary between two layers that stream nothing has nothing to do (on_boundary): no node, so layers placed
    // on another device (an RPC worker) get no round trip to the CPU
    const bool done_streams = il_done >= 0 && il_done < st->n_layer && st->li_of[il_done] >= 0;
    const bool next_streams = il_done + 1 < st->n_layer && st->li_of[il_done + 1] >= 0;
    if (!done_streams && !next_streams) {
        return cur;
    }
    boundary * b = nullptr;
    for (auto & x : st->boundaries) {
        if (x.il_done == il_done) {
            b = &x;
            break;
        }
    }
    if (!b) {
        st->boundaries.push_back({ st, il_done });
        b = &st->boundaries.back();
    }
    return pin_to_cpu(ggml_map_custom1_inplace(ctx, cur, boundary_op, 1, b));
}
