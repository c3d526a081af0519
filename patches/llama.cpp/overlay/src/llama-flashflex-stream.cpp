// flashflex dense weight streaming: a planned set of weight tensors is not loaded with the model but read
// from the GGUF, tensor by tensor, into a ring of bytes, by prefetch threads working ahead of compute.
//
// Design (see include/llama-flashflex.h for the public API):
// - Placement: streamed tensors are laid out in the order compute uses them (layer by layer, and inside a layer in
//   the order the graph's matmuls use them), in a ring of `ring_bytes` per buffer type: each tensor's home follows
//   the previous one's. The ring's memory is mapped twice back to back (mirrored), so a home that reaches the end
//   runs on into the second mapping and no byte is wasted at the end; where that mapping is not available (another
//   OS, or memory a GPU driver owns) the ring is flat and a home wraps to its start, wasting the tail it skips.
//   So tensor->data does not change from one graph to the next, and a tensor shares ring bytes only with tensors
//   far enough away in the cycle. The order inside a layer is read from the first graph built (before anything
//   computes); a graph that uses the weights in another order moves the homes once more, between two computes.
//   Tensors the loader put in the plain CPU buffer type are read straight into their home (O_DIRECT: the read
//   covers the 4096-aligned superset of the tensor, and tensor->data points at the tensor inside it). Tensors the
//   loader put in another CPU buffer type (the repacked layout) get their home in a ring of that type and are read
//   into a staging buffer, then written with ggml_backend_tensor_set, which repacks them exactly as the stock load
//   does — so the same kernels run and the logits stay bitwise identical.
// - Read-ahead: the reads of one cycle (one pass over the layers, i.e. one ubatch) are issued in that order, each
//   as soon as every tensor whose home overlaps its own has been released by compute; so prefetch occupies
//   exactly the ring bytes compute is not using, with no per-layer slots. A ring holds at least its largest
//   tensor, and what a layer holds outside matmuls (checked once the graph is built: layout_error).
// - Synchronisation: an in-place no-op graph node at every layer boundary (after the input embeddings and
//   after each layer) releases the layer just computed and waits for the next layer's tensors the graph uses
//   outside build_lora_mm; and an in-place no-op node on the input of each matmul of a streamed weight (a "use",
//   llama_flashflex_weight_use) waits for that weight and releases the weight of the use before it. So a
//   layer's matmul weights are held one at a time, and the ring needs only the largest weight (plus whatever a
//   layer holds outside matmuls), not a whole layer: what it has beyond that is read-ahead. Compute is
//   sequential (one context per model, see llama-flashflex-hooks.cpp); a layer acquired out of the cycle's
//   order (a graph that aborted half-way, or skipped layers) re-synchronises the cycle at that layer.
// - Failure: a read error marks the model failed; the boundary stops waiting, and the abort callback
//   (llama_flashflex_abort_callback) makes llama_decode return an error instead of computing on bad data.
// - Lent memory: a plan with drafting reserves room for a verification batch's logits rows ("lent_bytes"); while
//   no verification runs, the context gives those pages back and some streamed tensors (the largest whose ring
//   homes share bytes) move there: read once, then kept, and out of the ring's layout, so the ring's bytes all
//   go to the tensors still read (llama_flashflex_lend_rows). Before a verification those whose homes lie where
//   its rows need the memory move back to the ring. Each move is made between two decodes as a relayout is: reads
//   in flight end, the homes are placed again, and the next layer acquired re-synchronises the cycle.
//
// Code: the ring layout (homes, their order, relayout, the layout error) is pure bookkeeping in
// llama-flashflex-ring.{h,cpp}; here are the reader (stream_reader: preads, staging and repacking), the scheduler
// (stream_scheduler: the read cursor, acquire/use/release, re-synchronisation, the layer boundaries), the per-model
// state that ties them to the model's tensors and graphs (stream_state), and setup as named stages (stream_setup).

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-flashflex-io.h"
#include "llama-flashflex-json.h"
#include "llama-flashflex-ring.h"
#include "llama-flashflex-runtime.h"
#include "llama-flashflex.h"
#include "llama-impl.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
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
// Per-model runtime: the tensors and where they are read from, the ring layout (llama-flashflex-ring.h), the
// reader, the scheduler that decides what is read when and what compute waits for, and the graph's nodes.

// A streamed tensor as the reader and the scheduler see it; its home's place is layout.homes[k] (same index).
struct stream_tensor {
    ggml_tensor * t;
    int           file;
    uint64_t      read_off;            // file offset of the aligned superset
    size_t        read_len;            // its length (multiple of 4096)
    size_t        head;                // the tensor starts this many bytes into the superset
    size_t        nbytes;
    bool          staged;              // read into staging, then ggml_backend_tensor_set (repacked layout)
    size_t        job_rows = 0;        // staged in groups of this many rows, one read job each (0: whole, one job)
    uint8_t *     home;                // direct tensors: where the superset is read to
    uint8_t *     lent     = nullptr;  // its home in the lent memory, or none (see "Lent memory" above)
    size_t        lent_end = 0;        // where that home ends, from the start of the lent memory

    // guarded by the scheduler's pool.mutex()
    int64_t cycle      = -1;     // the cycle whose bytes the home holds or is receiving (-1: none)
    int     pending    = 0;      // read jobs of that cycle not finished
    int64_t released   = -1;     // the last cycle whose use of the home is over
    bool    in_lent    = false;  // at its lent home (data points there), out of the ring's layout
    bool    lent_valid = false;  // the lent home holds the bytes (its read finished)

    bool ready(int64_t c) const { return cycle == c && pending == 0; }
};

struct ring_buffer {
    ggml_backend_buffer_type_t buft;
    ggml_backend_buffer_t      buf      = nullptr;
    void *                     mem      = nullptr;  // plain flat ring: page-aligned host memory behind buf
    uint8_t *                  origin   = nullptr;  // offset 0 of the homes: buf's base, or page-aligned inside it
    size_t                     size     = 0;
    bool                       mirrored = false;    // [origin, origin + 2 size) maps the same memory twice
    bool                       host_cpu = false;    // a buffer type of the CPU device (plain or repacked)
};

struct boundary {
    struct stream_state * st;
    int                   il_done;
};

// graph userdata of a use node: the weight it waits for
struct weight_use {
    struct stream_state * st;
    const ggml_tensor *   w;
};

// Reads streamed tensors from the model files into their homes (prefetch threads, or compute with -tp 0). It knows
// nothing of cycles or locks: a read that fails returns why (empty: done).
struct stream_reader {
    std::vector<open_file> files;
    std::atomic<uint64_t>  bytes_read{ 0 };
    std::atomic<int64_t>   read_ns{ 0 };

    // The read jobs of a tensor: [begin, end) in bytes of its superset (direct, or staged whole), or in rows
    // (staged in row groups).
    static size_t job_units(const stream_tensor & t) { return t.job_rows ? (size_t) ggml_nrows(t.t) : t.read_len; }

    static size_t job_step(const stream_tensor & t) {
        return t.job_rows ? t.job_rows : t.staged ? t.read_len : k_chunk;
    }

    std::string read_error(const stream_tensor & st) const {
        return format("reading %s from %s failed: %s", ggml_get_name(st.t), files[st.file].path.c_str(),
                      strerror(errno));
    }

    std::string short_error(const stream_tensor & st) const {
        return format("%s ended early while reading %s (the file shrank or changed since the plan was made)",
                      files[st.file].path.c_str(), ggml_get_name(st.t));
    }

    // Rows [begin, end) of a staged tensor: their aligned superset into staging, then repacked into the home
    // through a view of those rows. The repacked layouts keep each group of interleaved rows in the bytes the
    // rows have unpacked (row_bytes apiece), so the rows land where a whole-tensor set would put them.
    std::string read_rows(const stream_tensor & st, size_t begin, size_t end, void * staging) {
        const size_t    rb   = st.t->nb[1];
        const uint64_t  off  = st.read_off + st.head + begin * rb;
        const uint64_t  aoff = off - off % k_page;
        const size_t    pre  = (size_t) (off - aoff);
        const size_t    want = pre + (end - begin) * rb;
        const int64_t   t0   = now_ns();
        const long long n    = pread_full(files[st.file].fd, staging, align_up(want, k_page), aoff);
        if (n < 0) {
            return read_error(st);
        }
        if ((size_t) n < want) {
            return short_error(st);
        }
        bytes_read.fetch_add((uint64_t) n);
        ggml_tensor rows = *st.t;
        rows.ne[1]       = (int64_t) (end - begin);
        rows.nb[2]       = rows.nb[1] * rows.ne[1];
        rows.nb[3]       = rows.nb[2] * rows.ne[2];
        rows.data        = (uint8_t *) st.t->data + begin * rb;
        ggml_backend_tensor_set(&rows, (uint8_t *) staging + pre, 0, ggml_nbytes(&rows));
        read_ns.fetch_add(now_ns() - t0);
        return {};
    }

    // One read job of a tensor: [begin, end) of its superset (direct), the whole tensor (staged), or rows.
    std::string read_range(const stream_tensor & st, size_t begin, size_t end, void * staging) {
        if (st.job_rows) {
            return read_rows(st, begin, end, staging);
        }
        uint8_t *       dst = st.staged ? (uint8_t *) staging : st.home;
        const int64_t   t0  = now_ns();
        const long long n   = pread_full(files[st.file].fd, dst + begin, end - begin, st.read_off + begin);
        if (n < 0) {
            return read_error(st);
        }
        const size_t done = begin + (size_t) n;  // short only at the end of the file
        // The superset may run past the end of the file; the tensor bytes may not.
        if (done < std::min(end, st.head + st.nbytes)) {
            return short_error(st);
        }
        bytes_read.fetch_add(done - begin);
        if (st.staged) {
            ggml_backend_tensor_set(st.t, dst + st.head, 0, st.nbytes);
        }
        read_ns.fetch_add(now_ns() - t0);
        return {};
    }
};

// Decides what is read when and what compute waits for: reads are issued in cycle order (one cycle: one pass over
// the layers, i.e. one ubatch) as soon as the homes they go to are free; compute acquires a layer at its boundary,
// a weight at its use node, and releases them after. Its state is guarded by pool.mutex().
struct stream_scheduler {
    explicit stream_scheduler(stream_state & st) : st(st) {}

    stream_state & st;

    io_pool pool;
    int64_t next_cycle   = 0;        // the read cursor: the next read is tensor next_tensor of cycle next_cycle
    int     next_tensor  = 0;
    int     inflight     = 0;        // jobs queued or running
    int64_t cycle        = 0;        // the cycle compute is in
    int     expected_li  = -1;       // the layer compute should acquire next (-1: not synchronised)
    int     held         = -1;       // the layer compute acquired last and has not released
    int     held_use     = -1;       // the tensor the last use node waited for, until the next one releases it
    bool    draining     = false;    // resync or relayout is waiting for the reads in flight: issue none
    void *  sync_staging = nullptr;  // staging for synchronous reads (-tp 0)

    // stats
    std::atomic<int64_t>  wait_ns{ 0 };
    std::atomic<uint64_t> layer_loads{ 0 };  // tensor reads issued (the name predates the byte ring)
    std::atomic<uint64_t> layer_waits{ 0 };  // acquisitions that waited for a read
    std::atomic<uint64_t> acquires{ 0 };
    std::atomic<uint64_t> resyncs{ 0 };

    // After the homes moved (relayout, set_lent): nothing is held, and the next layer acquired re-synchronises the
    // cycle. pool.mutex() is held.
    void forget_position() {
        expected_li = -1;
        held        = -1;
        held_use    = -1;
    }

    bool home_free(int k, int64_t c) const;
    void pump();
    void queue_read(int k, int64_t c, size_t begin, size_t end);
    void issue(int k, int64_t c);
    void drain(std::unique_lock<std::mutex> & lk);
    void resync(int li, std::unique_lock<std::mutex> & lk);
    void acquire(int li);
    void use(int k);
    void wait_for(int first, int end, std::unique_lock<std::mutex> & lk);
    void read_now(int first, int end, bool by_use, std::unique_lock<std::mutex> & lk);
    void release(int li);
    void release_locked(int li);
    void on_boundary(int il_done);
};

struct stream_state {
    config                     cfg;
    int                        n_layer = 0;
    std::vector<stream_tensor> tensors;  // in the order compute uses them
    ring_layout                layout;   // their homes (same index) and the streamed layers
    std::vector<int>           li_of;    // model layer -> streamed-layer index, -1 if it streams nothing
    std::vector<bool>          off_cpu;  // model layer -> placed on a device other than a CPU (a GPU, an RPC worker)
    bool                       direct = false;

    std::vector<ring_buffer> rings;
    size_t                   ring_bytes    = 0;
    size_t                   staging_bytes = 0;

    stream_reader    reader;
    stream_scheduler sched{ *this };

    // graph boundaries and uses
    std::deque<boundary>                                             boundaries;  // stable addresses for graph userdata
    std::unordered_map<const ggml_tensor *, weight_use>              uses;        // one per weight, likewise
    std::unordered_map<const ggml_tensor *, int>                     index_of;    // weight -> its index in tensors
    std::vector<std::pair<const ggml_tensor *, const ggml_tensor *>> built_uses;  // (node, weight) of this build
    std::vector<bool>                                                seen_after;  // boundary after layer il seen
    bool                                                             seen_input = false;

    failure               failed;
    std::atomic<uint64_t> relayouts{ 0 };

    // the lent memory: one mapping, each lent tensor's home in it; the weights hold its first lent_keep bytes (the
    // tensors whose homes end there)
    uint8_t *                          lent_mem  = nullptr;
    size_t                             lent_size = 0;
    size_t                             lent_keep = 0;           // compute thread only
    std::atomic<uint64_t>              lent_skipped{ 0 };       // bytes not read: their lent home held them
    std::atomic<uint64_t>              lends{ 0 };
    std::atomic<ggml_backend_buffer_t> compute_buf{ nullptr };  // the CPU compute buffer the last graph ran in

    ~stream_state() { stop(); }

    void stop() {
        sched.pool.stop();
        close_files(reader.files);
        for (auto & r : rings) {
            if (r.mirrored) {
                unmap_mirrored(r.origin, r.size);
                r.mirrored = false;
            }
            if (r.buf) {
                ggml_backend_buffer_free(r.buf);
                r.buf = nullptr;
            }
            free(r.mem);
            r.mem = nullptr;
        }
        free(sched.sync_staging);
        sched.sync_staging = nullptr;
        if (lent_mem != nullptr) {
            unmap_pages(lent_mem, lent_size);
            lent_mem = nullptr;
        }
    }

    // Never called with pool.mutex() held: it takes the lock, so a compute thread that is about to wait for a
    // read cannot miss the wake-up.
    void fail(const std::string & msg) {
        {
            std::lock_guard<std::mutex> lk(sched.pool.mutex());
            failed.set(msg);
        }
        sched.pool.done_cv().notify_all();
    }

    // One read job of tensor k (outside pool.mutex()); a failed read fails the model.
    void read(int k, size_t begin, size_t end, void * staging) {
        const std::string err = reader.read_range(tensors[k], begin, end, staging);
        if (!err.empty()) {
            fail(err);
        }
    }

    // The layout's homes (ring_layout::place) and every tensor's data pointer at its home. Nothing may be reading
    // or computing (setup, or relayout).
    void place() {
        layout.place();
        bind();
    }

    void        bind();
    void        point(int k);
    bool        begin_cycle(int k, int64_t c);
    size_t      set_lent(size_t keep);
    void        learn_order(ggml_cgraph * gf);
    void        relayout(const std::vector<int> & order, const std::vector<int> & n_uses);
    std::string layout_error() const;
};

// ---------------------------------------------------------------------------------------------------------
// The scheduler

// May tensor k's home receive cycle c's bytes: is every use of the bytes it shares over? A tensor before k
// in the order must have been released in cycle c, one after it (and k itself) in cycle c - 1.
// A home whose bytes a read is still writing is not free either, even when compute released the tensor: a
// use that did not run (a layer trimmed to no rows) releases a tensor its read may not have finished.
bool stream_scheduler::home_free(int k, int64_t c) const {
    const std::vector<stream_tensor> & tensors = st.tensors;
    if (tensors[k].released < c - 1 || tensors[k].pending > 0) {
        return false;
    }
    for (int j : st.layout.homes[k].overlaps) {
        if (tensors[j].released < (j < k ? c : c - 1) || tensors[j].pending > 0) {
            return false;
        }
    }
    return true;
}

// Issue reads in cycle order while homes are free (prefetch threads only). pool.mutex() is held.
void stream_scheduler::pump() {
    if (draining) {
        return;  // resync or relayout: waiting for the reads in flight to end
    }
    const int n   = (int) st.tensors.size();
    bool      any = false;
    while (!st.failed.is_set() && home_free(next_tensor, next_cycle)) {
        if (st.begin_cycle(next_tensor, next_cycle)) {
            issue(next_tensor, next_cycle);
            any = true;
        }
        if (++next_tensor == n) {
            next_tensor = 0;
            next_cycle++;
        }
    }
    if (any) {
        pool.wake();
    }
}

// One read job of tensor k for cycle c: dropped when the tensor's home has moved on (a re-synchronisation).
void stream_scheduler::queue_read(int k, int64_t c, size_t begin, size_t end) {
    inflight++;
    pool.push({
        [this, k, c] { return st.tensors[k].cycle == c; },
        [this, k, begin, end](void * staging) { st.read(k, begin, end, staging); },
        [this, k, c] {
            inflight--;
            if (st.tensors[k].cycle == c && --st.tensors[k].pending == 0) {
                st.tensors[k].lent_valid = st.tensors[k].in_lent && !st.failed.is_set();
                pump();  // a home this read kept busy may be free now
            }
        },
    });
}

// The read jobs of tensor k for cycle c, into its home (lent or in the ring). pool.mutex() is held.
void stream_scheduler::issue(int k, int64_t c) {
    stream_tensor & t = st.tensors[k];
    t.pending         = 0;
    layer_loads.fetch_add(1);
    const size_t units = stream_reader::job_units(t), step = stream_reader::job_step(t);
    for (size_t b = 0; b < units; b += step) {
        queue_read(k, c, b, std::min(units, b + step));
        t.pending++;
    }
}

// Drop the queued reads (the bytes of every home are unknown) and wait for those in flight. pool.mutex() is held
// by lk.
void stream_scheduler::drain(std::unique_lock<std::mutex> & lk) {
    for (auto & t : st.tensors) {
        t.cycle = -1;  // a lent home keeps what it holds: only its own read writes it
    }
    draining = true;
    pool.done_cv().wait(lk, [&] { return inflight == 0 || pool.stopping(); });
    draining = false;
}

// Start the cycle over at streamed layer li: whatever was acquired is not computing any more (compute is
// sequential), so once in-flight reads are done every home is free. pool.mutex() is held by lk.
void stream_scheduler::resync(int li, std::unique_lock<std::mutex> & lk) {
    resyncs.fetch_add(1);
    drain(lk);
    const int64_t base = std::max(next_cycle, cycle) + 1;
    const int     s    = st.layout.layers[li].first;
    for (int k = 0; k < (int) st.tensors.size(); ++k) {
        // tensors before layer li are not used in cycle `base`: their homes are free for it
        st.tensors[k].released = k < s ? base : base - 1;
        st.tensors[k].pending  = 0;
    }
    next_cycle  = base;
    next_tensor = s;
    cycle       = base;
}

// Compute thread: make streamed layer li's tensors available for this cycle.
void stream_scheduler::acquire(int li) {
    acquires.fetch_add(1);
    std::unique_lock<std::mutex> lk(pool.mutex());
    if (held >= 0 && held != li) {
        // compute is sequential: a layer still held is done. Its boundary did not run when llama.cpp trimmed the
        // last layer of a ubatch that wants no outputs to zero rows (an op on an empty tensor is skipped).
        release_locked(held);
    }
    if (li != expected_li) {
        resync(li, lk);
    } else if (li == 0) {
        cycle++;
    }
    expected_li          = (li + 1) % (int) st.layout.layers.size();
    held                 = li;
    held_use             = -1;
    const ring_layer & L = st.layout.layers[li];
    wait_for(L.first, L.first + L.count, lk);  // the tensors its use nodes do not wait for
}

// Compute thread, at the use node of tensor k: release the tensor the previous use waited for (its matmul is
// done), then make k available for this cycle.
void stream_scheduler::use(int k) {
    const ring_home & h = st.layout.homes[k];
    if (h.by_use && h.li != held) {
        acquire(h.li);  // its layer's boundary did not run (only this thread writes `held`)
    }
    std::unique_lock<std::mutex> lk(pool.mutex());
    if (held_use >= 0 && held_use != k) {
        st.tensors[held_use].released = std::max(st.tensors[held_use].released, cycle);
        held_use                      = -1;
    }
    if (!h.by_use || h.li != held) {
        if (pool.threads() > 0) {
            pump();  // for the release above; a tensor not held by its use came with its layer
        }
        return;
    }
    held_use = k;
    wait_for(k, k + 1, lk);
}

// Synchronous reads (no prefetch threads) of tensors [first, end) that are waited for here: whatever shares these
// homes was released, so they are free. pool.mutex() is held by lk.
void stream_scheduler::read_now(int first, int end, bool by_use, std::unique_lock<std::mutex> & lk) {
    for (int k = first; k < end && !st.failed.is_set(); ++k) {
        stream_tensor & t = st.tensors[k];
        if (!(by_use || !st.layout.homes[k].by_use)) {
            continue;
        }
        if (t.ready(cycle) || !st.begin_cycle(k, cycle)) {
            continue;
        }
        layer_loads.fetch_add(1);
        lk.unlock();
        for (size_t b = 0, units = stream_reader::job_units(t), step = stream_reader::job_step(t);
             b < units && !st.failed.is_set(); b += step) {
            st.read(k, b, std::min(units, b + step), sync_staging);
        }
        lk.lock();
        t.lent_valid = t.in_lent && !st.failed.is_set();
    }
}

// Tensors [first, end) that are waited for here (by their use when `by_use`, else with their layer): read them
// now (no prefetch threads) or wait until the prefetch threads have. pool.mutex() is held by lk.
void stream_scheduler::wait_for(int first, int end, std::unique_lock<std::mutex> & lk) {
    const bool by_use = end == first + 1 && st.layout.homes[first].by_use;
    if (pool.threads() == 0) {
        read_now(first, end, by_use, lk);
        return;
    }
    pump();
    auto all_ready = [&] {
        for (int k = first; k < end; ++k) {
            if ((by_use || !st.layout.homes[k].by_use) && !st.tensors[k].ready(cycle)) {
                return false;
            }
        }
        return true;
    };
    if (!all_ready() && !st.failed.is_set()) {
        layer_waits.fetch_add(1);
        const int64_t t0 = now_ns();
        // in slices, so an interrupt (Ctrl-C, SIGTERM) ends a wait the reads would not end soon: the abort
        // callback then stops the graph at its next node
        while (!pool.done_cv().wait_for(lk, std::chrono::milliseconds(100),
                                        [&] { return all_ready() || st.failed.is_set() || pool.stopping(); })) {
            if (interrupt_requested()) {
                break;
            }
        }
        wait_ns.fetch_add(now_ns() - t0);
    }
}

void stream_scheduler::release(int li) {
    std::lock_guard<std::mutex> lk(pool.mutex());
    release_locked(li);
}

// pool.mutex() is held.
void stream_scheduler::release_locked(int li) {
    const ring_layer & L = st.layout.layers[li];
    for (int k = L.first; k < L.first + L.count; ++k) {
        st.tensors[k].released = std::max(st.tensors[k].released, cycle);
    }
    if (held == li) {
        held = -1;
    }
    if (held_use >= L.first && held_use < L.first + L.count) {
        held_use = -1;
    }
    if (pool.threads() > 0) {
        pump();
    }
}

void stream_scheduler::on_boundary(int il_done) {
    if (st.failed.is_set()) {
        return;  // the abort callback ends the graph; never block on a failed model
    }
    if (il_done >= 0 && il_done < st.n_layer && st.li_of[il_done] >= 0) {
        release(st.li_of[il_done]);
    }
    const int next = il_done + 1;
    if (next < st.n_layer && st.li_of[next] >= 0) {
        acquire(st.li_of[next]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The layout's effects on the tensors

// Every tensor's data pointer at its home (placed by the layout), and the weight -> index map.
void stream_state::bind() {
    index_of.clear();
    for (size_t k = 0; k < tensors.size(); ++k) {
        index_of[tensors[k].t] = (int) k;
    }
    for (size_t k = 0; k < tensors.size(); ++k) {
        stream_tensor &   s = tensors[k];
        const ring_home & h = layout.homes[k];
        if (s.t->buffer == nullptr) {
            uint8_t * base = rings[h.ring].origin + h.off;
            void *    addr = s.staged ? (void *) base : (void *) (base + s.head);
            if (ggml_backend_tensor_alloc(rings[h.ring].buf, s.t, addr) != GGML_STATUS_SUCCESS) {
                throw std::runtime_error(
                    format("flashflex: cannot place %s in the streaming ring", ggml_get_name(s.t)));
            }
        }
        point((int) k);  // moved between two computes (relayout); the buffer and its extras stay
    }
}

// Tensor k's data pointer (and where a direct read goes) at its lent home or its ring home, as in_lent says. Only
// while nothing reads or computes: at setup, relayout and set_lent.
void stream_state::point(int k) {
    stream_tensor & s    = tensors[k];
    uint8_t *       base = s.in_lent ? s.lent : rings[layout.homes[k].ring].origin + layout.homes[k].off;
    s.home               = s.staged ? nullptr : base;
    s.t->data            = s.staged ? (void *) base : (void *) (base + s.head);
}

// Tensor k's bytes for cycle c, its home being free (pool.mutex() held): whether they must be read. A lent home
// keeps them once read; so does a ring home that shares bytes with nobody (unless the tensor was lent since).
bool stream_state::begin_cycle(int k, int64_t c) {
    stream_tensor & t    = tensors[k];
    const bool      kept = t.in_lent ?
                               t.lent_valid :
                               t.lent == nullptr && layout.homes[k].overlaps.empty() && t.cycle >= 0 && t.pending == 0;
    t.cycle              = c;
    if (kept && t.in_lent) {
        lent_skipped.fetch_add(t.read_len);
    }
    return !kept;
}

// Compute thread, between two decodes: the weights hold the first `keep` bytes of the lent memory. The lent
// tensors whose homes end there move to them (more: the context gave the rows' pages back), the others back to the
// ring, their pages to the system (less: a batch is about to ask for rows there). Like a relayout: the reads in flight
// end, the homes are placed again without the tensors that are lent, and the next layer acquired re-synchronises
// the cycle. Returns the bytes the lent tensors hold.
size_t stream_state::set_lent(size_t keep) {
    auto held_at = [&](size_t to) {
        size_t held = 0;
        for (const auto & t : tensors) {
            held = t.lent != nullptr && t.lent_end <= to ? std::max(held, t.lent_end) : held;
        }
        return held;
    };
    if (keep == lent_keep || lent_mem == nullptr) {
        return held_at(keep);
    }
    std::unique_lock<std::mutex> lk(sched.pool.mutex());
    sched.drain(lk);
    auto move = [&](size_t to) {
        for (int k = 0; k < (int) tensors.size(); ++k) {
            stream_tensor & t = tensors[k];
            t.pending         = 0;  // drained above
            if (t.lent != nullptr) {
                t.in_lent              = t.lent_end <= to;
                t.lent_valid           = t.lent_valid && t.in_lent;
                layout.homes[k].placed = !t.in_lent;
            }
        }
        place();
    };
    move(keep);
    int a = -1, b = -1;
    if (layout.conflict(a, b)) {
        // a flat ring wraps elsewhere without these homes, and a tensor its layer holds throughout would share bytes
        // with another of the layer: lend nothing (every tensor in the ring is the layout the model was checked with)
        keep = 0;
        move(keep);
    }
    const size_t held = held_at(keep);
    sched.forget_position();
    if (keep > lent_keep) {
        lends.fetch_add(1);
    } else {
        release_pages(lent_mem + held, lent_mem + lent_size);
    }
    lent_keep = keep;
    return held;
}

// A layer's tensors held for the whole layer (those without a use node) must not share bytes with any other
// tensor of the layer; a tensor held by its use only shares with the tensors used before it (released by then).
std::string stream_state::layout_error() const {
    int k = -1, j = -1;
    if (!layout.conflict(k, j)) {
        return {};
    }
    return format(
        "the streaming ring (%.1f MiB) cannot hold layer %d's %s, which its graph uses outside "
        "build_lora_mm and so is held for the whole layer, together with %s: re-plan with a larger "
        "--prefetch-window",
        ring_bytes / 1048576.0, layout.layers[layout.homes[k].li].layer, ggml_get_name(tensors[k].t),
        ggml_get_name(tensors[j].t));
}

// The order in which a finished graph uses the streamed weights (its use nodes, in node order; see
// ring_layout::learn_order). A weight used twice in one graph is held with its layer. Moves the homes when that
// differs from now.
void stream_state::learn_order(ggml_cgraph * gf) {
    std::unordered_map<const ggml_tensor *, const ggml_tensor *> weight_of(built_uses.begin(), built_uses.end());
    std::vector<int>                                             seq;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        auto it = weight_of.find(ggml_graph_node(gf, i));
        if (it != weight_of.end()) {
            seq.push_back(index_of.at(it->second));
        }
    }
    std::vector<int> order, n_uses;
    if (layout.learn_order(seq, order, n_uses)) {
        relayout(order, n_uses);
    }
    const std::string err = layout_error();
    if (!err.empty()) {
        fail(err);
    }
}

// Compute thread, between two computes: the new order takes effect (reads in flight are dropped first).
void stream_state::relayout(const std::vector<int> & order, const std::vector<int> & n_uses) {
    std::unique_lock<std::mutex> lk(sched.pool.mutex());
    sched.drain(lk);
    std::vector<stream_tensor> moved;
    moved.reserve(tensors.size());
    for (int k : order) {
        moved.push_back(std::move(tensors[k]));
        moved.back().pending = 0;  // drained above
    }
    tensors = std::move(moved);
    layout.reorder(order, n_uses);
    bind();
    sched.forget_position();
    relayouts.fetch_add(1);
}

model_registry<stream_state> g_models;

stream_state * find_state(const llama_model * model) {
    return g_models.find(model);
}

thread_local stream_state * g_building = nullptr;

void boundary_op(ggml_tensor * dst, const ggml_tensor * a, int ith, int nth, void * userdata) {
    (void) a;
    (void) nth;
    if (ith != 0) {
        return;
    }
    auto * b = (boundary *) userdata;
    // an in-place node: its bytes are those of an activation in the compute buffer of the CPU backend, where the
    // logits rows of a model whose output layer is on the CPU are computed too
    b->st->compute_buf.store(dst->buffer, std::memory_order_relaxed);
    b->st->sched.on_boundary(b->il_done);
}

void use_op(ggml_tensor * dst, const ggml_tensor * a, int ith, int nth, void * userdata) {
    (void) dst;
    (void) a;
    (void) nth;
    if (ith != 0) {
        return;
    }
    auto * u = (weight_use *) userdata;
    if (u->st->failed.is_set()) {
        return;  // the abort callback ends the graph
    }
    auto it = u->st->index_of.find(u->w);
    if (it != u->st->index_of.end()) {
        u->st->sched.use(it->second);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Setup, stage by stage (stream_setup)

// One tensor of the plan, validated against the file: where it is read from and how (direct or staged).
stream_tensor planned_tensor(const stream_tensor_cfg & ct,
                             llama_model_loader &      ml,
                             const loader_tensor_map & model_tensors,
                             int                       n_layer) {
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
    if (il < 0 || il >= n_layer) {
        throw std::runtime_error(format("flashflex: only per-layer tensors can stream, not %s", ct.name.c_str()));
    }
    ggml_backend_buffer_type_t buft = mt->second.second;
    require_host_weights(ct.name, buft, "dense streaming supports");
    stream_tensor s{};
    s.t        = t;
    s.file     = ct.file;
    s.nbytes   = ggml_nbytes(t);
    s.head     = ct.offset % k_page;
    s.read_off = ct.offset - s.head;
    s.read_len = align_up(s.head + s.nbytes, k_page);
    // staged: a repacked layout, or another host buffer type (a GPU's pinned host memory, allocated by that type:
    // its homes need not be page-aligned for O_DIRECT)
    s.staged   = buft != ggml_backend_cpu_buffer_type();
    return s;
}

// The plan's tensors validated and in the order compute uses them, layer by layer; the names that stream. Returns
// each tensor's buffer type (same index).
std::vector<ggml_backend_buffer_type_t> collect_tensors(stream_state &            st,
                                                        llama_model_loader &      ml,
                                                        const loader_tensor_map & model_tensors,
                                                        std::set<std::string> &   streamed_names) {
    std::map<int, std::vector<stream_tensor>> by_layer;
    for (const auto & ct : st.cfg.tensors) {
        stream_tensor s = planned_tensor(ct, ml, model_tensors, st.n_layer);
        if (!streamed_names.insert(ct.name).second) {
            throw std::runtime_error(format("flashflex: the plan streams %s twice", ct.name.c_str()));
        }
        by_layer[layer_of(ct.name)].push_back(s);
    }
    std::vector<ggml_backend_buffer_type_t> buft_of;
    for (auto & [il, ts] : by_layer) {
        ring_layer L{ il, (int) st.tensors.size(), (int) ts.size() };
        for (auto & s : ts) {
            ring_home h;
            h.li = (int) st.layout.layers.size();
            buft_of.push_back(model_tensors.at(ggml_get_name(s.t)).second);
            st.tensors.push_back(std::move(s));
            st.layout.homes.push_back(std::move(h));
        }
        st.li_of[il] = (int) st.layout.layers.size();
        st.layout.layers.push_back(L);
    }
    return buft_of;
}

// One ring per buffer type: the plain CPU type (read straight into homes) and each repacked type; each home's
// length, and how staged tensors are read (whole, or in row groups) and the staging that needs.
void assign_rings(stream_state & st, const std::vector<ggml_backend_buffer_type_t> & buft_of) {
    std::map<ggml_backend_buffer_type_t, int> ring_of;
    for (size_t k = 0; k < st.tensors.size(); ++k) {
        stream_tensor & s = st.tensors[k];
        ring_home &     h = st.layout.homes[k];
        if (!ring_of.count(buft_of[k])) {
            ring_of[buft_of[k]] = (int) st.rings.size();
            st.rings.push_back({ buft_of[k] });
            ggml_backend_dev_t dev   = ggml_backend_buft_get_device(buft_of[k]);  // none for the plain CPU type
            st.rings.back().host_cpu = buft_of[k] == ggml_backend_cpu_buffer_type() ||
                                       (dev != nullptr && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU);
        }
        h.ring = ring_of[buft_of[k]];
        if (s.staged) {
            const size_t a     = std::max<size_t>(ggml_backend_buft_get_alignment(buft_of[k]), 64);
            const size_t alloc = ggml_backend_buft_get_alloc_size(buft_of[k], s.t);
            h.len              = align_up(alloc, a);
            // a matrix whose repacked size is its own is staged a group of rows at a time (64 or more, a
            // multiple of every interleave), so staging is about one read job, not the largest tensor
            const size_t rb    = s.t->nb[1];
            const size_t group = std::max<size_t>(64, k_chunk / rb / 64 * 64);
            if (ggml_n_dims(s.t) <= 2 && alloc == s.nbytes && (size_t) ggml_nrows(s.t) > group) {
                s.job_rows       = group;
                st.staging_bytes = std::max(st.staging_bytes, group * rb + 2 * k_page);
            } else {
                st.staging_bytes = std::max(st.staging_bytes, s.read_len);
            }
        } else {
            h.len = s.read_len;  // page multiple: homes stay page-aligned for O_DIRECT
        }
    }
}

// A mirrored ring's memory: a buffer of its type with room for two ring sizes from a page boundary, whose pages
// there are replaced by one ring's worth of shared memory mapped twice (map_mirrored). The buffer's own interface
// (a repacked type's set_tensor) stays; stop() puts ordinary memory back before freeing it. Only for the CPU
// device's buffer types (plain or repacked: memory from malloc), never a GPU's host type (pinned or driver-mapped
// pages a remap would detach from the device). False: flat.
bool allocate_mirrored(ring_buffer & R, size_t size) {
    if (!R.host_cpu) {
        return false;
    }
    R.buf = ggml_backend_buft_alloc_buffer(R.buft, 2 * size + k_page);
    if (!R.buf) {
        return false;
    }
    uint8_t * origin = (uint8_t *) align_up((size_t) ggml_backend_buffer_get_base(R.buf), k_page);
    if (!map_mirrored(origin, size)) {
        ggml_backend_buffer_free(R.buf);
        R.buf = nullptr;
        return false;
    }
    ggml_backend_buffer_set_usage(R.buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    R.origin   = origin;
    R.mirrored = true;
    return true;
}

// Ring sizes (ring_sizes; a layer that also holds tensors outside matmuls needs more than the largest tensor,
// checked once the graph shows which: layout_error), then the rings' memory: mirrored where asked and where a
// ring wraps at all (one that holds everything it streams never does), flat where the platform cannot mirror.
void allocate_rings(stream_state & st) {
    const size_t      asked       = st.cfg.ring_bytes > 0 ? (size_t) st.cfg.ring_bytes : 0;
    const bool        want_mirror = st.cfg.ring_mirror != 0;
    const ring_sizing sz          = ring_sizes(st.layout, st.rings.size(), asked, st.cfg.window, k_page, want_mirror);
    if (asked > 0 && asked < sz.need) {
        LLAMA_LOG_WARN(
            "flashflex: a %.1f MiB ring is below the %.1f MiB this model's largest tensor needs; using "
            "%.1f MiB\n",
            asked / 1048576.0, sz.need / 1048576.0, sz.need / 1048576.0);
    }
    st.layout.ring_size = sz.size;
    st.layout.mirrored.assign(st.rings.size(), false);
    for (size_t r = 0; r < st.rings.size(); ++r) {
        ring_buffer & R    = st.rings[r];
        const size_t  size = sz.size[r];
        R.size             = size;
        if (want_mirror && size < sz.streams[r]) {
            if (allocate_mirrored(R, size)) {
                st.layout.mirrored[r] = true;
                st.ring_bytes += size;
                continue;
            }
            LLAMA_LOG_INFO(
                "flashflex: the %.1f MiB %s streaming ring is flat (not mapped twice here): it may "
                "waste up to a tensor at its end\n",
                size / 1048576.0, ggml_backend_buft_name(R.buft));
        }
        if (R.buft == ggml_backend_cpu_buffer_type()) {
            if (posix_memalign(&R.mem, k_page, size) != 0) {
                throw std::runtime_error(format("flashflex: cannot allocate the %zu-byte streaming ring", size));
            }
            R.buf = ggml_backend_cpu_buffer_from_ptr(R.mem, size);
        } else {
            R.buf = ggml_backend_buft_alloc_buffer(R.buft, size);
        }
        if (!R.buf) {
            throw std::runtime_error(format("flashflex: cannot allocate the %zu-byte %s streaming ring", size,
                                            ggml_backend_buft_name(R.buft)));
        }
        ggml_backend_buffer_set_usage(R.buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        R.origin = (uint8_t *) ggml_backend_buffer_get_base(R.buf);
        st.ring_bytes += size;
    }
}

// The lent memory (cfg.lent_bytes) and the tensors with a home in it: the largest first, of the rings in host memory
// of the CPU device, among those whose ring home shares bytes with another (one that shares none keeps its bytes
// anyway). Nothing is touched until the memory is lent.
void allocate_lent(stream_state & st) {
    if (st.cfg.lent_bytes <= 0) {
        return;
    }
    std::vector<int> order(st.tensors.size());
    for (size_t k = 0; k < order.size(); ++k) {
        order[k] = (int) k;
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return st.layout.homes[a].len > st.layout.homes[b].len; });
    std::vector<std::pair<int, size_t>> chosen;  // (tensor, offset in the lent memory)
    size_t                              used = 0;
    for (int k : order) {
        const ring_home & h   = st.layout.homes[k];
        const size_t      len = align_up(h.len, k_page);
        if (h.overlaps.empty() || !st.rings[h.ring].host_cpu || used + len > (size_t) st.cfg.lent_bytes) {
            continue;
        }
        chosen.emplace_back(k, used);
        used += len;
    }
    if (used == 0) {
        return;
    }
    st.lent_mem = map_pages(used);
    if (st.lent_mem == nullptr) {
        LLAMA_LOG_WARN("flashflex: cannot map %.1f MiB for lent memory; streamed weights will not use it\n",
                       used / 1048576.0);
        return;
    }
    st.lent_size = used;
    for (const auto & [k, off] : chosen) {
        st.tensors[k].lent     = st.lent_mem + off;
        st.tensors[k].lent_end = off + align_up(st.layout.homes[k].len, k_page);
    }
}

// The model files, the staging buffer for synchronous reads and the prefetch threads.
void start_reads(stream_state & st) {
    st.reader.files = open_files(st.cfg.files, st.cfg.direct_io, st.direct);
    if (st.staging_bytes > 0 && posix_memalign(&st.sched.sync_staging, k_page, st.staging_bytes) != 0) {
        throw std::runtime_error("flashflex: out of memory for the staging buffer");
    }
    st.sched.pool.start(st.cfg.prefetch_threads, st.staging_bytes, st.failed);
}

}  // namespace

// -------------------------------------------------------------------------------------------------------------
// Public C API

int32_t llama_flashflex_model_stats(const llama_model * model, char * buf, size_t buf_size) {
    stream_state * st = find_state(model);
    if (!st) {
        return -1;
    }
    json_object out;
    out.add("streamed_layers", st->layout.layers.size())
        .add("streamed_tensors", st->tensors.size())
        .add("rings", st->rings.size())
        .add("prefetch_threads", st->sched.pool.threads())
        .add("direct_io", st->direct)
        .add("ring_bytes", st->ring_bytes)
        .add("mirrored_rings", (size_t) std::count(st->layout.mirrored.begin(), st->layout.mirrored.end(), true))
        .add("staging_bytes", st->staging_bytes * std::max<size_t>(1, st->sched.pool.threads()))
        .add("bytes_read", st->reader.bytes_read.load())
        .add("read_seconds", st->reader.read_ns.load() / 1e9)
        .add("wait_seconds", st->sched.wait_ns.load() / 1e9)
        .add("layer_loads", st->sched.layer_loads.load())
        .add("layer_waits", st->sched.layer_waits.load())
        .add("acquires", st->sched.acquires.load())
        .add("resyncs", st->sched.resyncs.load())
        .add("relayouts", st->relayouts.load())
        .add("lent_bytes", st->lent_size)
        .add("lent_tensors", (size_t) std::count_if(st->tensors.begin(), st->tensors.end(),
                                                    [](const stream_tensor & t) { return t.lent != nullptr; }))
        .add("lends", st->lends.load())
        .add("lent_bytes_not_read", st->lent_skipped.load())
        .add_or_null("error", st->failed.message());
    return write_c_string(out.str(), buf, buf_size);
}

int64_t llama_flashflex_lend_rows(llama_context * ctx, int32_t n_rows) {
    stream_state * st = ctx != nullptr ? find_state(llama_get_model(ctx)) : nullptr;
    if (st == nullptr || st->lent_mem == nullptr) {
        return 0;
    }
    if (n_rows < 0) {
        return refuse("flashflex: llama_flashflex_lend_rows takes the rows a batch asks for beyond the first (>= 0)");
    }
#if !defined(__linux__)
    if (n_rows == 0) {
        return refuse(
            "flashflex: lending drafting's rows needs pages given back at once (Linux's MADV_DONTNEED); here they "
            "stay reserved");
    }
#endif
    // a row of logits: in the compute buffer and in the output buffer (the plan reserved this much per drafted token)
    const size_t n_vocab = (size_t) llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(ctx)));
    const size_t rows    = (size_t) n_rows * 2 * sizeof(float) * n_vocab;
    const size_t keep    = (size_t) st->cfg.lent_bytes > rows ? (size_t) st->cfg.lent_bytes - rows : 0;
    if (keep < st->lent_keep || n_rows > 0) {
        return (int64_t) st->set_lent(std::min(keep, st->lent_keep));  // lends more only at a one-row decode
    }
    output_rows           out;
    ggml_backend_buffer_t comp = st->compute_buf.load(std::memory_order_relaxed);
    if (!output_rows_of(ctx, out) || comp == nullptr) {
        return 0;  // nothing decoded yet: no rows to give back
    }
    if (out.shared) {
        return refuse(
            "flashflex: this context keeps embeddings or sampled tokens beside its logits, so the rows of a "
            "verification batch cannot be given back (decode without them, or leave the lent memory unused)");
    }
    if (ggml_backend_buffer_get_type(out.buf) != ggml_backend_cpu_buffer_type() ||
        ggml_backend_buffer_get_type(comp) != ggml_backend_cpu_buffer_type()) {
        return refuse(
            "flashflex: this context's logits or compute buffer is not plain host memory (a GPU's pinned "
            "memory), so the rows of a verification batch cannot be given back");
    }
    if (keep > st->lent_keep) {
        // the first row holds the last decode's logits; the others and the compute buffer are scratch until the next
        auto * base = (uint8_t *) ggml_backend_buffer_get_base(out.buf);
        release_pages(base + n_vocab * sizeof(float),
                      base + std::min(out.logits_bytes, ggml_backend_buffer_get_size(out.buf)));
        auto * cb = (uint8_t *) ggml_backend_buffer_get_base(comp);
        release_pages(cb, cb + ggml_backend_buffer_get_size(comp));
    }
    return (int64_t) st->set_lent(keep);
}

void llama_flashflex_model_stats_reset(const llama_model * model) {
    stream_state * st = find_state(model);
    if (!st) {
        return;
    }
    st->reader.bytes_read = 0;
    st->reader.read_ns    = 0;
    st->sched.wait_ns     = 0;
    st->sched.layer_loads = 0;
    st->sched.layer_waits = 0;
    st->sched.acquires    = 0;
    st->sched.resyncs     = 0;
    st->lent_skipped      = 0;
    st->lends             = 0;
}

// -------------------------------------------------------------------------------------------------------------
// Entry points for the call sites (llama-flashflex-config.cpp)

void flashflex::stream_setup(const llama_model & model, llama_model_loader & ml, const config & cfg) {
    auto st     = std::make_unique<stream_state>();
    st->cfg     = cfg;
    st->n_layer = (int) model.hparams.n_layer();
    st->li_of.assign(st->n_layer, -1);
    st->off_cpu.assign(st->n_layer, false);
    for (int il = 0; il < st->n_layer; ++il) {
        ggml_backend_dev_t dev = model.dev_layer(il);
        st->off_cpu[il]        = dev != nullptr && ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU;
    }
    st->seen_after.assign(st->n_layer, false);

    std::set<std::string>                         streamed_names;
    const std::vector<ggml_backend_buffer_type_t> buft_of =
        collect_tensors(*st, ml, loader_tensors(ml), streamed_names);
    assign_rings(*st, buft_of);
    allocate_rings(*st);
    st->place();
    allocate_lent(*st);

    // the loader must neither allocate nor read what streams
    for (const auto & name : streamed_names) {
        ml.weights_map.erase(name);
    }

    start_reads(*st);
    LLAMA_LOG_INFO(
        "flashflex: streaming %zu tensors of %zu layers through a %.1f MiB ring, %d prefetch "
        "threads, %s reads\n",
        streamed_names.size(), st->layout.layers.size(), st->ring_bytes / 1048576.0, st->cfg.prefetch_threads,
        st->direct ? "direct" : "buffered");
    g_models.add(&model, std::move(st));
}

bool flashflex::stream_active(const llama_model * model) {
    return find_state(model) != nullptr;
}

bool flashflex::stream_failed(const llama_model * model, std::string * error) {
    return g_models.failed(model, error);
}

void flashflex::stream_free(const llama_model * model) {
    g_models.remove(model);
}

void flashflex::stream_context_free(const llama_model * model) {
    stream_state * st = find_state(model);
    if (st != nullptr) {
        st->compute_buf.store(nullptr);
    }
}

void flashflex::stream_graph_begin(const llama_model * model) {
    g_building = find_state(model);
    if (g_building) {
        // the scheduler may reallocate its buffers for this graph: the compute buffer is known again once it runs
        g_building->compute_buf.store(nullptr);
        std::fill(g_building->seen_after.begin(), g_building->seen_after.end(), false);
        g_building->seen_input = false;
        g_building->built_uses.clear();
    }
}

void flashflex::stream_graph_end(ggml_cgraph * gf) {
    stream_state * st = g_building;
    g_building        = nullptr;
    if (!st) {
        return;
    }
    // Every streamed layer needs the boundary before it and after it, or compute could race the reads.
    for (const auto & L : st->layout.layers) {
        const bool before = L.layer == 0 ? st->seen_input : st->seen_after[L.layer - 1];
        if (!before || !st->seen_after[L.layer]) {
            st->fail(
                format("this model's graph does not mark the boundaries of layer %d, so its weights cannot "
                       "stream (architecture not supported by dense streaming)",
                       L.layer));
            return;
        }
    }
    if (gf != nullptr && !st->failed.is_set()) {
        st->learn_order(gf);
    }
}

ggml_tensor * flashflex::stream_weight_use(ggml_context * ctx, ggml_tensor * w, ggml_tensor * cur) {
    stream_state * st = g_building;
    if (!st || cur == nullptr || !st->index_of.count(w)) {
        return cur;
    }
    weight_use *  u    = &st->uses.try_emplace(w, weight_use{ st, w }).first->second;  // node-based: stays put
    ggml_tensor * node = place_on_cpu(ggml_map_custom1_inplace(ctx, cur, use_op, 1, u));
    st->built_uses.emplace_back(node, w);
    return node;
}

uint32_t flashflex::stream_graph_nodes(const llama_model * model) {
    stream_state * st = find_state(model);
    // a use node per streamed weight and a boundary per layer, with room for a weight used twice
    return st ? (uint32_t) (2 * st->tensors.size() + st->n_layer + 2) : 0;
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
    // nor between the last layer that streams and a layer on another device (a GPU): a node there would split that
    // device's graph where stock llama.cpp does not, and a GPU fuses ops across that point (an add into the next
    // layer's norm), so the logits would differ. The layer is released when compute next acquires a layer (acquire:
    // compute is sequential, a layer still held is done).
    if (!next_streams && il_done + 1 < st->n_layer && st->off_cpu[il_done + 1]) {
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
    return place_on_cpu(ggml_map_custom1_inplace(ctx, cur, boundary_op, 1, b));
}
