// flashflex MoE expert slot banks (Flash-MoE style): the routed expert tensors of a MoE model are not loaded
// from the GGUF. Their experts live in a sidecar (one file per layer, every expert slice 4096-aligned) and each
// layer keeps a bank of N resident slots per expert tensor; the MoE matmuls index slots, not experts.
//
// Design (public API in include/llama-flashflex.h):
// - Placement: each banked tensor [ne0, ne1, n_expert] is shrunk to [ne0, ne1, N + 1] and placed in a buffer
//   of the buffer type the loader chose for it (plain or repacked layout). Slot N is a zero-filled "junk" slot
//   that never holds an expert (see passes below). In resident-bank mode (N = 0 in the config) the tensor keeps
//   its shape and every expert is read from the sidecar at load time; the graph is then the stock graph.
// - Resolution: build_lora_mm_id's ggml_mul_mat_id call goes through moe_mul_mat_id, which inserts a custom op
//   turning the router's expert ids into slot ids. On a miss it picks victims by LRU after reserving every hit
//   of the ubatch (so no two experts share a slot), reads the misses from the sidecar with parallel preads
//   (O_DIRECT when possible) and only then lets the matmul run. Routing weights, per-expert scales and biases
//   keep using the true expert ids: only the matmul's ids change.
// - Passes: when a ubatch may use more distinct experts than the bank holds, the matmul is built as P passes.
//   Pass p installs the p-th group of at most N experts and sends every pair routed to another group to the
//   junk slot; a merge op copies each pair's row from the pass that computed it with its real expert. Every
//   expert's rows are computed together, in the same order, by the same kernel as stock, so the logits stay
//   bitwise identical at any ubatch size — the run never aborts and never needs -ub 1.
// - Traces, oracles, prefetch: with a trace file every layer call appends one JSON line (ids, slots, hit per
//   id). A replayed trace (a schedule) is checked record by record against the run's routing; the oracle
//   modes use it to pre-install every expert (oracle-all-hit) or to read the next record's experts ahead of use
//   (prefetch policy "oracle"). The real policy "router-lookahead" applies layer L+1's router to layer L's
//   input. Prefetch reads run on the I/O threads behind demand reads, into free or least recently used slots
//   that hold no expert the prediction or the current call needs; a resolution that needs a slot still being
//   prefetched waits for that read only.
// - Failure: a read error marks the model failed; resolution stops reading, and the abort callback ends the
//   graph, so llama_decode returns an error instead of computing on bad data.

#include "llama-flashflex.h"
#include "llama-flashflex-runtime.h"

#include "llama-impl.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cstdio>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

using namespace flashflex;

namespace {

struct bank_tensor {
    ggml_tensor * t = nullptr;
    std::string   name;
    int           layer  = -1;
    int           file   = 0;
    uint64_t      offset = 0;     // expert 0 in the sidecar file
    uint64_t      stride = 0;     // between experts in the sidecar file
    size_t        bytes  = 0;     // one expert
    bool          plain  = true;  // plain CPU layout: bytes are written straight into the slot
    uint8_t *     base   = nullptr;
    std::vector<ggml_tensor *> slot_tensor;   // repacked layout: one 2-D tensor per slot for ggml_backend_tensor_set
    std::vector<int>      slot_expert;        // expert held by each slot, -1 for none
    std::vector<int>      expert_slot;        // inverse, -1 when not resident
    std::vector<uint64_t> slot_used;          // LRU stamp
    std::vector<uint8_t>  inflight;           // a prefetch read is writing the slot (guarded by moe_state::mtx)
    std::vector<uint64_t> checksums;          // per expert; empty: not verified
};

struct layer_counters {
    std::atomic<uint64_t> hits{0};
    std::atomic<uint64_t> misses{0};
    std::atomic<uint64_t> bytes_read{0};
    std::atomic<int64_t>  read_ns{0};
    std::atomic<int64_t>  install_ns{0};
    std::atomic<uint64_t> calls{0};
    std::atomic<uint64_t> prefetch_issued{0};       // experts read ahead of use
    std::atomic<uint64_t> prefetch_used{0};         // ... that the layer's next call needed
    std::atomic<uint64_t> prefetch_bytes{0};
    std::atomic<uint64_t> prefetch_wasted_bytes{0}; // ... of experts the next call did not need
    std::atomic<int64_t>  prefetch_read_ns{0};
    std::atomic<int64_t>  prefetch_wait_ns{0};      // compute waiting for a prefetch read still in flight
    std::atomic<int64_t>  verify_ns{0};             // checksumming experts as they are read (I/O threads)

    void reset() {
        hits = 0; misses = 0; bytes_read = 0; read_ns = 0; install_ns = 0; calls = 0;
        prefetch_issued = 0; prefetch_used = 0; prefetch_bytes = 0; prefetch_wasted_bytes = 0;
        prefetch_read_ns = 0; prefetch_wait_ns = 0; verify_ns = 0;
    }
};

struct bank_layer {
    int layer = -1;
    std::vector<int> tensors;                 // indices into moe_state::tensors
    // the grouping of the ubatch being computed: made by its first resolution, shared by all tensors
    uint64_t epoch = UINT64_MAX;
    std::vector<int32_t> ids;                 // the router's ids it was made for (token-major)
    std::vector<std::vector<int>> groups;     // experts of each pass
    std::vector<int> group_of;                // expert -> group, -1 unused
    std::vector<bool> counted;                // per group: hits and misses already counted
    std::vector<int32_t> trace_slot;          // per (token, k) pair of the call: its slot and whether it hit
    std::vector<uint8_t> trace_hit;
    const ggml_tensor * router = nullptr;     // ffn_gate_inp, for router-lookahead
    size_t expert_bytes = 0;                  // one expert over all the layer's banked tensors
    std::vector<int> prefetched;              // experts read ahead since the layer's last call
    std::unique_ptr<layer_counters> stats = std::make_unique<layer_counters>();
};

struct resolve_site {
    struct moe_state * st;
    int tensor;
    int pass;
};

struct read_job {
    int  tensor;
    int  expert;
    int  slot;
    bool prefetch = false;
};

enum class prefetch_policy { none, router_lookahead, oracle };

// One record of a replayed trace: a layer call and its expert ids (token-major).
struct schedule_step {
    int layer;
    std::vector<int32_t> ids;
};

struct moe_state {
    config cfg;
    bool resident = false;       // resident-bank: every expert in its own slot, read at load
    int  n_slots  = 0;           // N (not counting the junk slot)
    bool has_junk = false;       // a zero slot after the N: needed when a ubatch may need several passes
    int  n_expert = 0;
    int  n_expert_used = 0;
    std::vector<bank_tensor> tensors;
    std::vector<bank_layer>  layers;
    std::vector<int>         layer_index;     // model layer -> index in layers, -1
    std::unordered_map<const ggml_tensor *, int> tensor_index;

    std::vector<open_file> files;
    bool direct = false;
    std::vector<void *> host_mem;
    std::vector<ggml_backend_buffer_t> bufs;
    ggml_context * slot_ctx = nullptr;
    size_t bank_bytes = 0;
    size_t staging_bytes = 0;

    // reads
    std::mutex mtx;
    std::condition_variable cv_jobs;
    std::condition_variable cv_done;
    std::deque<read_job> jobs;                // demand reads first, prefetch reads behind them
    int pending_demand = 0;
    bool stopping = false;
    std::vector<std::thread> workers;

    // graph
    std::deque<resolve_site> sites;           // stable addresses for graph userdata
    std::vector<bool> seen;                   // per tensor: used through moe_mul_mat_id in the graph being built
    bool seen_epoch = false;
    std::atomic<uint64_t> epoch{0};           // ubatches started
    uint64_t clock = 0;                       // LRU time

    std::atomic<bool> failed{false};
    std::string error;                        // guarded by mtx

    // traces, replay and prefetch
    prefetch_policy policy = prefetch_policy::none;
    std::vector<schedule_step> schedule;
    size_t cursor = 0;                        // next schedule record the run must match
    FILE * trace = nullptr;
    uint64_t trace_seq = 0;
    std::atomic<int64_t> trace_ns{0};         // time spent formatting and writing trace lines
    std::vector<float> router_row;            // dequantized router row (scratch)

    ~moe_state() { stop(); }

    void stop() {
        {
            std::lock_guard<std::mutex> lk(mtx);
            stopping = true;
        }
        cv_jobs.notify_all();
        for (auto & w : workers) {
            if (w.joinable()) {
                w.join();
            }
        }
        workers.clear();
        if (trace) {
            fclose(trace);
            trace = nullptr;
        }
        close_files(files);
        for (auto * b : bufs) {
            ggml_backend_buffer_free(b);
        }
        bufs.clear();
        for (void * p : host_mem) {
            free(p);
        }
        host_mem.clear();
        if (slot_ctx) {
            ggml_free(slot_ctx);
            slot_ctx = nullptr;
        }
    }

    // where pairs that are not this pass's go (slot 0 when there is no junk slot: then there is one pass)
    int junk() const { return has_junk ? n_slots : 0; }

    void fail(const std::string & msg) {
        {
            std::lock_guard<std::mutex> lk(mtx);
            if (error.empty()) {
                error = msg;
            }
        }
        failed.store(true);
        LLAMA_LOG_ERROR("flashflex: %s\n", msg.c_str());
    }

    // One expert of one tensor from the sidecar into a slot (an I/O thread).
    void read_expert(const read_job & j, void * staging) {
        bank_tensor & bt = tensors[j.tensor];
        const uint64_t off = bt.offset + (uint64_t) j.expert * bt.stride;
        uint8_t * slot = bt.base + (size_t) j.slot * bt.bytes;
        const bool into_slot = bt.plain && (!direct || bt.bytes % k_page == 0);
        const size_t len = into_slot ? bt.bytes : (direct ? align_up(bt.bytes, k_page) : bt.bytes);
        const int64_t t0 = now_ns();
        const long long n = pread_full(files[bt.file].fd, into_slot ? slot : staging, len, off);
        if (n < 0) {
            fail(format("reading expert %d of %s from %s failed: %s", j.expert, bt.name.c_str(),
                        files[bt.file].path.c_str(), strerror(errno)));
            return;
        }
        if ((size_t) n < bt.bytes) {
            fail(format("%s ended early while reading expert %d of %s (the sidecar is truncated or changed: "
                        "run flashflex sidecar verify)", files[bt.file].path.c_str(), j.expert, bt.name.c_str()));
            return;
        }
        if (cfg.moe_verify && !bt.checksums.empty()) {
            const int64_t tv = now_ns();
            const uint64_t sum = expert_checksum(into_slot ? slot : staging, bt.bytes);
            layers[layer_index[bt.layer]].stats->verify_ns.fetch_add(now_ns() - tv);
            if (sum != bt.checksums[j.expert]) {
                fail(format("layer %d, tensor %s, expert %d does not match its checksum in %s (bit rot, or the layer "
                            "file changed: run flashflex sidecar verify)", bt.layer, bt.name.c_str(), j.expert,
                            files[bt.file].path.c_str()));
                return;
            }
        }
        if (!into_slot) {
            if (bt.plain) {
                memcpy(slot, staging, bt.bytes);
            } else {
                ggml_backend_tensor_set(bt.slot_tensor[j.slot], staging, 0, bt.bytes);
            }
        }
        layer_counters & c = *layers[layer_index[bt.layer]].stats;
        c.bytes_read.fetch_add(bt.bytes);
        c.read_ns.fetch_add(now_ns() - t0);
        if (j.prefetch) {
            c.prefetch_read_ns.fetch_add(now_ns() - t0);
        }
    }

    void worker_main() {
        void * staging = nullptr;
        if (posix_memalign(&staging, k_page, staging_bytes) != 0) {
            fail("out of memory for an expert staging buffer");
            staging = nullptr;
        }
        std::unique_lock<std::mutex> lk(mtx);
        while (true) {
            cv_jobs.wait(lk, [&] { return stopping || !jobs.empty(); });
            if (stopping) {
                break;
            }
            read_job j = jobs.front();
            jobs.pop_front();
            if (!failed.load() && staging) {
                lk.unlock();
                read_expert(j, staging);
                lk.lock();
            }
            if (j.prefetch) {
                tensors[j.tensor].inflight[j.slot] = 0;
            } else {
                --pending_demand;
            }
            cv_done.notify_all();
        }
        lk.unlock();
        free(staging);
    }

    // Reads every job in parallel and returns when all are done (compute thread).
    void run_jobs(const std::vector<read_job> & batch) {
        if (batch.empty()) {
            return;
        }
        std::unique_lock<std::mutex> lk(mtx);
        for (auto it = batch.rbegin(); it != batch.rend(); ++it) {
            jobs.push_front(*it); // ahead of any prefetch read still queued
        }
        pending_demand += (int) batch.size();
        cv_jobs.notify_all();
        cv_done.wait(lk, [&] { return pending_demand == 0 || stopping; });
    }

    // Queues prefetch reads behind the demand reads and returns at once (compute thread).
    void queue_prefetch(const std::vector<read_job> & batch) {
        if (batch.empty()) {
            return;
        }
        {
            std::lock_guard<std::mutex> lk(mtx);
            for (const auto & j : batch) {
                tensors[j.tensor].inflight[j.slot] = 1;
                jobs.push_back(j);
            }
        }
        cv_jobs.notify_all();
    }

    // The slots of bt a prefetch read is still writing.
    std::vector<uint8_t> busy_slots(const bank_tensor & bt) {
        std::lock_guard<std::mutex> lk(mtx);
        return bt.inflight;
    }

    // Waits until no prefetch read is writing any of `slots` of bt; the wait counts against prefetch.
    void wait_slots(const bank_tensor & bt, const std::vector<int> & slots, layer_counters & c) {
        std::unique_lock<std::mutex> lk(mtx);
        auto busy = [&] {
            for (int s : slots) {
                if (bt.inflight[s]) {
                    return true;
                }
            }
            return false;
        };
        if (!busy()) {
            return;
        }
        const int64_t t0 = now_ns();
        cv_done.wait(lk, [&] { return stopping || !busy(); });
        c.prefetch_wait_ns.fetch_add(now_ns() - t0);
    }

    // Bank bookkeeping: expert e now lives in slot s of tensor bt (evicting whatever was there).
    static void place(bank_tensor & bt, int e, int s) {
        const int old = bt.slot_expert[s];
        if (old >= 0) {
            bt.expert_slot[old] = -1;
        }
        if (bt.expert_slot[e] >= 0) {
            bt.slot_expert[bt.expert_slot[e]] = -1;
        }
        bt.slot_expert[s] = e;
        bt.expert_slot[e] = s;
    }

    // The first resolution of a layer in a ubatch groups its distinct experts into passes of at most N:
    // experts already resident in `bt` first (so a ubatch that overflows the bank still hits what it can).
    void group_ubatch(bank_layer & L, const bank_tensor & bt, const std::vector<int32_t> & ids) {
        L.ids = ids;
        L.epoch = epoch.load();
        L.group_of.assign(n_expert, -1);
        std::vector<int> resident_first, others;
        for (int32_t e : ids) {
            if (L.group_of[e] != -1) {
                continue;
            }
            L.group_of[e] = -2; // seen
            (bt.expert_slot[e] >= 0 ? resident_first : others).push_back(e);
        }
        resident_first.insert(resident_first.end(), others.begin(), others.end());
        L.groups.clear();
        for (size_t i = 0; i < resident_first.size(); i += n_slots) {
            L.groups.emplace_back(resident_first.begin() + i,
                                  resident_first.begin() + std::min(resident_first.size(), i + (size_t) n_slots));
            for (int e : L.groups.back()) {
                L.group_of[e] = (int) L.groups.size() - 1;
            }
        }
        L.counted.assign(L.groups.size(), false);
    }

    // The first resolution of a layer call: check it against the replayed schedule and settle what was
    // prefetched for it. Returns false when the run no longer follows the schedule (the model is failed).
    bool begin_layer_call(bank_layer & L, const std::vector<int32_t> & ids) {
        if (!schedule.empty()) {
            if (cursor >= schedule.size()) {
                fail(format("the run went on past the end of the replayed trace (%zu records)", schedule.size()));
                return false;
            }
            const schedule_step & step = schedule[cursor];
            if (step.layer != L.layer || step.ids != ids) {
                fail(format("the run's routing differs from the replayed trace at record %zu (layer %d)", cursor,
                            L.layer));
                return false;
            }
            ++cursor;
        }
        if (!L.prefetched.empty()) {
            std::vector<bool> wanted(n_expert, false);
            for (int32_t e : ids) {
                wanted[e] = true;
            }
            for (int e : L.prefetched) {
                if (wanted[e]) {
                    L.stats->prefetch_used.fetch_add(1);
                } else {
                    L.stats->prefetch_wasted_bytes.fetch_add(L.expert_bytes);
                }
            }
            L.prefetched.clear();
        }
        return true;
    }

    // Reads `experts` into layer li's bank ahead of use: free slots first, then the least recently used, never
    // a slot holding a predicted expert, an expert of the current call (`keep`, when li is the current layer)
    // or one still being written. Returns at once; the reads run behind demand reads.
    void issue_prefetch(int li, const std::vector<int> & experts, const std::vector<int> & keep_experts) {
        bank_layer & X = layers[li];
        bank_tensor & first = tensors[X.tensors[0]];
        std::vector<bool> keep(n_slots, false);
        std::vector<uint8_t> busy(n_slots, 0);
        {
            std::lock_guard<std::mutex> lk(mtx);
            for (int j : X.tensors) {
                for (int s = 0; s < n_slots; ++s) {
                    busy[s] |= tensors[j].inflight[s];
                }
            }
        }
        for (const auto * list : {&experts, &keep_experts}) {
            for (int e : *list) {
                if (first.expert_slot[e] >= 0 && first.expert_slot[e] < n_slots) {
                    keep[first.expert_slot[e]] = true;
                }
            }
        }
        std::vector<read_job> batch;
        for (int e : experts) {
            if (first.expert_slot[e] >= 0) {
                continue; // resident already
            }
            int victim = -1;
            for (int s = 0; s < n_slots; ++s) {
                if (keep[s] || busy[s]) {
                    continue;
                }
                if (first.slot_expert[s] < 0) {
                    victim = s;
                    break;
                }
                if (victim < 0 || first.slot_used[s] < first.slot_used[victim]) {
                    victim = s;
                }
            }
            if (victim < 0) {
                break; // no slot left that may be evicted
            }
            keep[victim] = true;
            // the slot keeps its old LRU stamp: a wrong guess is the first thing the next miss evicts
            for (int j : X.tensors) {
                place(tensors[j], e, victim);
                batch.push_back({j, e, victim, true});
            }
            X.prefetched.push_back(e);
            X.stats->prefetch_issued.fetch_add(1);
            X.stats->prefetch_bytes.fetch_add(X.expert_bytes);
        }
        queue_prefetch(batch);
    }

    // router-lookahead: the experts layer X's router picks for the tokens of `b` (layer X-1's MoE input).
    std::vector<int> predict_router(const bank_layer & X, const ggml_tensor * b, int64_t K) {
        const ggml_tensor * w = X.router;
        if (!w || !w->data || !w->buffer || !ggml_backend_buffer_is_host(w->buffer) ||
            (w->type != GGML_TYPE_F32 && !ggml_get_type_traits(w->type)->to_float) || w->ne[1] != n_expert) {
            fail(format("router-lookahead needs layer %d's router (ffn_gate_inp) in CPU memory in a plain layout "
                        "(it is %s%s); use --moe-prefetch none for this model", X.layer,
                        w && w->buffer ? ggml_backend_buffer_name(w->buffer) : "not loaded",
                        w ? (std::string(", ") + ggml_type_name(w->type)).c_str() : ""));
            return {};
        }
        if (b->type != GGML_TYPE_F32 || b->ne[0] != w->ne[0]) {
            return {}; // not the hidden state this router reads (no prediction for this call)
        }
        const int64_t n_embd = w->ne[0];
        const int64_t T = b->ne[2];
        router_row.resize(n_embd);
        // only the router's most confident picks: the top ranks are the likeliest to be right, and on a
        // bandwidth-bound disk every wrong guess costs a read (docs/benchmarks.md measures the trade-off)
        const int64_t ranks = cfg.moe_prefetch_ranks > 0 ? std::min<int64_t>(cfg.moe_prefetch_ranks, K) : K;
        std::vector<std::pair<float, int>> logits(n_expert);
        std::vector<bool> picked(n_expert, false);
        std::vector<int> out;
        for (int64_t t = 0; t < T; ++t) {
            const float * x = (const float *) ((const char *) b->data + t * b->nb[2]);
            for (int e = 0; e < n_expert; ++e) {
                const char * row = (const char *) w->data + e * w->nb[1];
                const float * r = (const float *) row;
                if (w->type != GGML_TYPE_F32) {
                    ggml_get_type_traits(w->type)->to_float(row, router_row.data(), n_embd);
                    r = router_row.data();
                }
                float acc = 0.0f;
                for (int64_t i = 0; i < n_embd; ++i) {
                    acc += r[i] * x[i];
                }
                logits[e] = {acc, e};
            }
            std::partial_sort(logits.begin(), logits.begin() + ranks, logits.end(),
                              [](const auto & a, const auto & c) { return a.first > c.first; });
            for (int64_t k = 0; k < ranks; ++k) {
                if (!picked[logits[k].second]) {
                    picked[logits[k].second] = true;
                    out.push_back(logits[k].second);
                }
            }
        }
        return out;
    }

    // After a layer call's last demand read: read ahead for the next call the policy can predict.
    void prefetch_after(int li, const std::vector<int32_t> & ids, const ggml_tensor * b, int64_t K) {
        std::vector<int> current(ids.begin(), ids.end());
        if (policy == prefetch_policy::oracle && cursor < schedule.size()) {
            const schedule_step & next = schedule[cursor];
            const int target = layer_index[next.layer];
            std::vector<int> experts;
            std::vector<bool> seen_e(n_expert, false);
            for (int32_t e : next.ids) {
                if (!seen_e[e] && (int) experts.size() < n_slots) {
                    seen_e[e] = true;
                    experts.push_back(e);
                }
            }
            issue_prefetch(target, experts, target == li ? current : std::vector<int>{});
        } else if (policy == prefetch_policy::router_lookahead && li + 1 < (int) layers.size() &&
                   (int64_t) ids.size() <= n_slots) {
            std::vector<int> experts = predict_router(layers[li + 1], b, K);
            if (!experts.empty()) {
                issue_prefetch(li + 1, experts, {});
            }
        }
    }

    static void append_list(std::string & out, const char * key, const int32_t * v, size_t n) {
        out += ", \"";
        out += key;
        out += "\": [";
        char num[16];
        for (size_t i = 0; i < n; ++i) {
            if (i) {
                out += ", ";
            }
            const auto r = std::to_chars(num, num + sizeof(num), v[i]);
            out.append(num, r.ptr);
        }
        out += "]";
    }

    // One JSON line per layer call (schema: orchestrator/traces.py, docs/traces.md).
    void write_trace(const bank_layer & L, const std::vector<int32_t> & ids, int64_t K, int64_t T) {
        const int64_t t0 = now_ns();
        std::string line = format("{\"seq\": %llu, \"ubatch\": %llu, \"layer\": %d, \"tokens\": %lld, \"k\": %lld",
                                  (unsigned long long) trace_seq++, (unsigned long long) epoch.load(), L.layer,
                                  (long long) T, (long long) K);
        line.reserve(line.size() + ids.size() * 12 + 64);
        append_list(line, "ids", ids.data(), ids.size());
        append_list(line, "slots", L.trace_slot.data(), L.trace_slot.size());
        std::vector<int32_t> hit(L.trace_hit.begin(), L.trace_hit.end());
        append_list(line, "hit", hit.data(), hit.size());
        line += "}\n";
        if (fwrite(line.data(), 1, line.size(), trace) != line.size()) {
            fail(format("writing the routing trace failed: %s", strerror(errno)));
        }
        trace_ns.fetch_add(now_ns() - t0);
    }

    // The custom op before a banked matmul: expert ids -> slot ids for pass `site.pass` (compute thread).
    // `b` is the matmul's input (for router-lookahead).
    void resolve(const resolve_site & site, const ggml_tensor * ids_t, const ggml_tensor * b, ggml_tensor * dst) {
        const int64_t t0 = now_ns();
        const int64_t K = ids_t->ne[0];
        const int64_t T = ids_t->ne[1];
        int32_t * out = (int32_t *) dst->data;
        std::fill(out, out + K * T, (int32_t) junk());
        if (failed.load() || cfg.moe_shared_only) {
            return; // shared-only: every routed pair hits the zero slot; failed: the abort callback ends the graph
        }
        std::vector<int32_t> ids(K * T);
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t k = 0; k < K; ++k) {
                const int32_t e = *(const int32_t *) ((const char *) ids_t->data + t * ids_t->nb[1] + k * ids_t->nb[0]);
                if (e < 0 || e >= n_expert) {
                    fail(format("the router chose expert %d, outside 0..%d", e, n_expert - 1));
                    return;
                }
                ids[t * K + k] = e;
            }
        }
        bank_tensor & bt = tensors[site.tensor];
        const int li = layer_index[bt.layer];
        bank_layer & L = layers[li];
        if (L.epoch != epoch.load() || L.ids != ids) {
            if (!begin_layer_call(L, ids)) {
                return;
            }
            group_ubatch(L, bt, ids);
        }
        if (site.pass >= (int) L.groups.size()) {
            return; // this ubatch needs fewer passes than the graph has
        }
        const std::vector<int> & group = L.groups[site.pass];

        // hits first: reserve every slot the group already has (waiting for any still being prefetched),
        // then choose victims among the rest by LRU
        std::vector<bool> reserved(n_slots, false);
        std::vector<int> misses, hit_slots;
        std::vector<bool> missed(n_expert, false);
        for (int e : group) {
            if (bt.expert_slot[e] >= 0) {
                reserved[bt.expert_slot[e]] = true;
                hit_slots.push_back(bt.expert_slot[e]);
            } else {
                misses.push_back(e);
                missed[e] = true;
            }
        }
        wait_slots(bt, hit_slots, *L.stats);
        std::vector<read_job> batch;
        std::vector<uint8_t> busy = busy_slots(bt);
        for (int e : misses) {
            int victim = -1;
            for (int attempt = 0; attempt < 2 && victim < 0; ++attempt) {
                for (int s = 0; s < n_slots; ++s) {
                    if (!reserved[s] && !busy[s] && (victim < 0 || bt.slot_used[s] < bt.slot_used[victim])) {
                        victim = s;
                    }
                }
                if (victim < 0) {
                    // every free slot is still being prefetched into: wait for those reads, then choose again
                    std::vector<int> all;
                    for (int s = 0; s < n_slots; ++s) {
                        all.push_back(s);
                    }
                    wait_slots(bt, all, *L.stats);
                    busy = busy_slots(bt);
                }
            }
            // |group| <= N, so a free slot always exists
            reserved[victim] = true;
            place(bt, e, victim);
            batch.push_back({site.tensor, e, victim});
        }
        const uint64_t stamp = ++clock;
        for (int e : group) {
            bt.slot_used[bt.expert_slot[e]] = stamp;
        }
        // One group for the whole ubatch: the layer's other banked tensors take the same slots now, so their
        // reads run in this same parallel batch and their own resolutions are all hits.
        if (L.groups.size() == 1) {
            for (int j : L.tensors) {
                if (j == site.tensor) {
                    continue;
                }
                bank_tensor & c = tensors[j];
                std::vector<int> install;
                for (int e : group) {
                    if (c.slot_expert[bt.expert_slot[e]] != e) {
                        install.push_back(bt.expert_slot[e]);
                    }
                }
                wait_slots(c, install, *L.stats); // a prefetch may still be writing a slot this replaces
                for (int e : group) {
                    const int s = bt.expert_slot[e];
                    if (c.slot_expert[s] != e) {
                        place(c, e, s);
                        batch.push_back({j, e, s});
                    }
                    c.slot_used[s] = stamp;
                }
            }
        }
        run_jobs(batch);

        if (!L.counted[site.pass]) {
            L.counted[site.pass] = true;
            L.stats->hits.fetch_add(group.size() - misses.size());
            L.stats->misses.fetch_add(misses.size());
            L.stats->calls.fetch_add(1);
            if (trace) {
                L.trace_slot.resize(K * T);
                L.trace_hit.resize(K * T);
                for (int64_t i = 0; i < K * T; ++i) {
                    if (L.group_of[ids[i]] == site.pass) {
                        L.trace_slot[i] = bt.expert_slot[ids[i]];
                        L.trace_hit[i] = missed[ids[i]] ? 0 : 1;
                    }
                }
            }
            if (site.pass + 1 == (int) L.groups.size()) {
                // the layer call's own reads are done: record it and read ahead while it computes
                if (trace) {
                    write_trace(L, ids, K, T);
                }
                if (policy != prefetch_policy::none) {
                    prefetch_after(li, ids, b, K);
                }
            }
        }
        for (int64_t i = 0; i < K * T; ++i) {
            if (L.group_of[ids[i]] == site.pass) {
                out[i] = bt.expert_slot[ids[i]];
            }
        }
        L.stats->install_ns.fetch_add(now_ns() - t0);
    }
};

std::mutex g_models_mutex;
std::unordered_map<const llama_model *, std::unique_ptr<moe_state>> g_models;
thread_local moe_state * g_building = nullptr;

moe_state * find_state(const llama_model * model) {
    std::lock_guard<std::mutex> lk(g_models_mutex);
    auto it = g_models.find(model);
    return it == g_models.end() ? nullptr : it->second.get();
}

void resolve_op(ggml_tensor * dst, const ggml_tensor * ids, const ggml_tensor * after, const ggml_tensor * b,
                int ith, int nth, void * ud) {
    (void) after; (void) nth;
    if (ith == 0) {
        auto * site = (resolve_site *) ud;
        site->st->resolve(*site, ids, b, dst);
    }
}

// acc (in place) <- the rows of `pass_out` whose pairs this pass computed with their real expert.
void merge_op(ggml_tensor * dst, const ggml_tensor * acc, const ggml_tensor * pass_out, const ggml_tensor * slots,
              int ith, int nth, void * ud) {
    (void) acc;
    const int32_t junk = ((resolve_site *) ud)->st->junk();
    const int64_t K = slots->ne[0];
    const int64_t T = slots->ne[1];
    const size_t row = dst->ne[0] * sizeof(float);
    for (int64_t i = ith; i < K * T; i += nth) {
        const int64_t k = i % K;
        const int64_t t = i / K;
        if (((const int32_t *) slots->data)[i] != junk) {
            memcpy((char *) dst->data + k * dst->nb[1] + t * dst->nb[2],
                   (const char *) pass_out->data + k * pass_out->nb[1] + t * pass_out->nb[2], row);
        }
    }
}

void epoch_op(ggml_tensor * dst, const ggml_tensor * a, int ith, int nth, void * ud) {
    (void) dst; (void) a; (void) nth;
    if (ith == 0) {
        ((moe_state *) ud)->epoch.fetch_add(1);
    }
}

resolve_site * site_for(moe_state & st, int tensor, int pass) {
    for (auto & s : st.sites) {
        if (s.tensor == tensor && s.pass == pass) {
            return &s;
        }
    }
    st.sites.push_back({&st, tensor, pass});
    return &st.sites.back();
}

// The prefetch policy and the replayed schedule of a configuration, checked against the banks.
void setup_replay(moe_state & st, const config & cfg) {
    if (cfg.moe_prefetch == "router-lookahead") {
        st.policy = prefetch_policy::router_lookahead;
    } else if (cfg.moe_prefetch == "oracle") {
        st.policy = prefetch_policy::oracle;
    }
    if (st.policy != prefetch_policy::none && st.resident) {
        throw std::runtime_error("flashflex: expert prefetch needs slot banks (every expert is resident here)");
    }
    if (st.policy == prefetch_policy::router_lookahead) {
        for (const auto & stream : cfg.tensors) {
            for (const auto & L : st.layers) {
                if (L.router && stream.name == ggml_get_name(L.router)) {
                    throw std::runtime_error(format("flashflex: router-lookahead reads %s, which dense streaming "
                                                    "does not keep resident", stream.name.c_str()));
                }
            }
        }
    }
    const auto & v = cfg.moe_schedule;
    for (size_t i = 0; i < v.size();) {
        const int il = v[i];
        const int32_t n = v[i + 1];
        if (il >= (int) st.layer_index.size() || st.layer_index[il] < 0) {
            throw std::runtime_error(format("flashflex: the replayed trace routes layer %d, which has no banked "
                                            "experts in this model (a trace of another model?)", il));
        }
        schedule_step step{il, std::vector<int32_t>(v.begin() + i + 2, v.begin() + i + 2 + n)};
        for (int32_t e : step.ids) {
            if (e < 0 || e >= st.n_expert) {
                throw std::runtime_error(format("flashflex: the replayed trace names expert %d; this model has %d "
                                                "(a trace of another model?)", e, st.n_expert));
            }
        }
        st.schedule.push_back(std::move(step));
        i += 2 + (size_t) n;
    }
    if ((st.policy == prefetch_policy::oracle || cfg.moe_preload) && st.schedule.empty()) {
        throw std::runtime_error("flashflex: the oracle modes need a replayed trace (an empty schedule was given)");
    }
}

// oracle-all-hit: every expert the schedule uses, installed at load (expert i of a layer's list in slot i).
void preload_schedule(moe_state & st) {
    std::vector<std::vector<int>> experts(st.layers.size());
    std::vector<std::vector<bool>> seen(st.layers.size(), std::vector<bool>(st.n_expert, false));
    for (const auto & step : st.schedule) {
        const int li = st.layer_index[step.layer];
        for (int32_t e : step.ids) {
            if (!seen[li][e]) {
                seen[li][e] = true;
                experts[li].push_back(e);
            }
        }
    }
    std::vector<read_job> batch;
    for (size_t li = 0; li < st.layers.size(); ++li) {
        if ((int) experts[li].size() > st.n_slots) {
            throw std::runtime_error(format("flashflex: the replayed trace uses %zu experts at layer %d, more than "
                                            "the %d slots: oracle-all-hit needs a bank of at least %zu",
                                            experts[li].size(), st.layers[li].layer, st.n_slots, experts[li].size()));
        }
        for (size_t i = 0; i < experts[li].size(); ++i) {
            for (int j : st.layers[li].tensors) {
                moe_state::place(st.tensors[j], experts[li][i], (int) i);
                batch.push_back({j, experts[li][i], (int) i});
            }
        }
    }
    st.run_jobs(batch);
    if (st.failed.load()) {
        throw std::runtime_error("flashflex: " + st.error);
    }
}

} // namespace

// -------------------------------------------------------------------------------------------------------------
// Entry points for the call sites (llama-flashflex-config.cpp)

void flashflex::moe_setup(const llama_model & model, llama_model_loader & ml, const config & cfg) {
    auto st = std::make_unique<moe_state>();
    st->cfg = cfg;
    st->resident = cfg.moe_slots == 0;
    st->n_expert = (int) model.hparams.n_expert;
    st->n_expert_used = (int) model.hparams.n_expert_used_max();
    if (st->n_expert <= 0) {
        throw std::runtime_error("flashflex: slot banks need a MoE model, and this model has no routed experts");
    }
    st->n_slots = st->resident ? st->n_expert : cfg.moe_slots;
    if (!st->resident && st->n_slots < st->n_expert_used) {
        throw std::runtime_error(format("flashflex: a bank of %d slots is smaller than the %d experts each token "
                                        "uses; use at least %d slots", st->n_slots, st->n_expert_used,
                                        st->n_expert_used));
    }
    if (st->n_slots > st->n_expert) {
        throw std::runtime_error(format("flashflex: a bank of %d slots is larger than the model's %d experts",
                                        st->n_slots, st->n_expert));
    }
    const int n_layer = (int) model.hparams.n_layer();
    st->layer_index.assign(n_layer, -1);

    std::unordered_map<std::string, std::pair<ggml_tensor *, ggml_backend_buffer_type_t>> model_tensors;
    for (auto & [key, ctx_ptr] : ml.ctx_map) {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx_ptr.get()); t; t = ggml_get_next_tensor(ctx_ptr.get(), t)) {
            model_tensors[ggml_get_name(t)] = {t, key.buft};
        }
    }

    // validate the configuration against the model, shrink each tensor to its bank and size the buffers
    st->has_junk = !st->resident && (st->n_slots < st->n_expert || cfg.moe_shared_only);
    const int64_t n_bank = st->n_slots + (st->has_junk ? 1 : 0);
    std::map<ggml_backend_buffer_type_t, size_t> buf_size;
    std::vector<size_t> tensor_off;
    for (const auto & bc : cfg.banks) {
        auto mt = model_tensors.find(bc.name);
        if (mt == model_tensors.end() || ml.weights_map.find(bc.name) == ml.weights_map.end()) {
            throw std::runtime_error(format("flashflex: the sidecar banks %s, which this model does not have "
                                            "(a sidecar of another model?)", bc.name.c_str()));
        }
        ggml_tensor * t = mt->second.first;
        if (st->tensor_index.count(t)) {
            throw std::runtime_error(format("flashflex: %s is banked twice", bc.name.c_str()));
        }
        if (t->ne[2] != st->n_expert || t->ne[3] != 1 || !ggml_is_contiguous(t) ||
            ggml_nbytes(t) != bc.bytes_per_expert * (uint64_t) st->n_expert) {
            throw std::runtime_error(format("flashflex: %s is not a routed expert tensor of %d experts x %llu bytes "
                                            "(a sidecar of another model?)", bc.name.c_str(), st->n_expert,
                                            (unsigned long long) bc.bytes_per_expert));
        }
        const int il = layer_of(bc.name);
        if (il < 0 || il >= n_layer) {
            throw std::runtime_error(format("flashflex: %s is not a per-layer tensor", bc.name.c_str()));
        }
        ggml_backend_buffer_type_t buft = mt->second.second;
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        if (dev && ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
            throw std::runtime_error(format("flashflex: %s is placed on %s; slot banks support CPU weights only",
                                            bc.name.c_str(), ggml_backend_buft_name(buft)));
        }
        t->ne[2] = n_bank;
        t->nb[3] = t->nb[2] * t->ne[2];

        bank_tensor bt;
        bt.t      = t;
        bt.name   = bc.name;
        bt.layer  = il;
        bt.file   = bc.file;
        bt.offset = bc.offset;
        bt.stride = bc.expert_stride;
        bt.bytes  = bc.bytes_per_expert;
        bt.plain  = buft == ggml_backend_cpu_buffer_type();
        if (!bc.checksums.empty() && bc.checksums.size() != (size_t) st->n_expert) {
            throw std::runtime_error(format("flashflex: %s has %zu checksums for %d experts (a sidecar of another "
                                            "model?)", bc.name.c_str(), bc.checksums.size(), st->n_expert));
        }
        bt.checksums = bc.checksums;
        bt.slot_expert.assign(n_bank, -1);
        bt.expert_slot.assign(st->n_expert, -1);
        bt.slot_used.assign(n_bank, 0);
        bt.inflight.assign(n_bank, 0);
        size_t & off = buf_size[buft];
        tensor_off.push_back(off);
        off += align_up(ggml_backend_buft_get_alloc_size(buft, t), k_page);
        st->staging_bytes = std::max(st->staging_bytes, align_up(bt.bytes, k_page));

        if (st->layer_index[il] < 0) {
            st->layer_index[il] = (int) st->layers.size();
            st->layers.emplace_back();
            st->layers.back().layer = il;
        }
        st->layers[st->layer_index[il]].tensors.push_back((int) st->tensors.size());
        st->layers[st->layer_index[il]].expert_bytes += bt.bytes;
        st->layers[st->layer_index[il]].router = model.layers[il].ffn_gate_inp;
        st->tensor_index[t] = (int) st->tensors.size();
        st->tensors.push_back(std::move(bt));
    }
    st->seen.assign(st->tensors.size(), false);

    // one zero-filled buffer per buffer type; plain memory is page-aligned for O_DIRECT reads into slots
    std::map<ggml_backend_buffer_type_t, ggml_backend_buffer_t> buf_of;
    for (auto & [buft, size] : buf_size) {
        ggml_backend_buffer_t buf = nullptr;
        if (buft == ggml_backend_cpu_buffer_type()) {
            void * mem = nullptr;
            if (posix_memalign(&mem, k_page, size) != 0) {
                throw std::runtime_error(format("flashflex: cannot allocate the %zu-byte expert banks", size));
            }
            st->host_mem.push_back(mem);
            buf = ggml_backend_cpu_buffer_from_ptr(mem, size);
        } else {
            buf = ggml_backend_buft_alloc_buffer(buft, size);
        }
        if (!buf) {
            throw std::runtime_error(format("flashflex: cannot allocate the %zu-byte %s expert banks", size,
                                            ggml_backend_buft_name(buft)));
        }
        ggml_backend_buffer_clear(buf, 0);
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        st->bufs.push_back(buf);
        buf_of[buft] = buf;
        st->bank_bytes += size;
    }
    size_t n_slot_tensors = 0;
    for (const auto & bt : st->tensors) {
        n_slot_tensors += bt.plain ? 0 : (size_t) n_bank;
    }
    if (n_slot_tensors > 0) {
        ggml_init_params params = { n_slot_tensors * ggml_tensor_overhead(), nullptr, true };
        st->slot_ctx = ggml_init(params);
    }
    for (size_t i = 0; i < st->tensors.size(); ++i) {
        bank_tensor & bt = st->tensors[i];
        ggml_backend_buffer_t buf = buf_of[model_tensors[bt.name].second];
        bt.base = (uint8_t *) ggml_backend_buffer_get_base(buf) + tensor_off[i];
        if (ggml_backend_tensor_alloc(buf, bt.t, bt.base) != GGML_STATUS_SUCCESS) {
            throw std::runtime_error(format("flashflex: cannot place %s in its expert bank", bt.name.c_str()));
        }
        if (!bt.plain) {
            // the repacked layout keeps each expert's bytes in its own range, so one expert can be set alone
            for (int64_t s = 0; s < n_bank; ++s) {
                ggml_tensor * v = ggml_new_tensor_3d(st->slot_ctx, bt.t->type, bt.t->ne[0], bt.t->ne[1], 1);
                if (ggml_backend_tensor_alloc(buf, v, bt.base + s * bt.bytes) != GGML_STATUS_SUCCESS) {
                    throw std::runtime_error(format("flashflex: cannot place a slot of %s", bt.name.c_str()));
                }
                bt.slot_tensor.push_back(v);
            }
        }
        ml.weights_map.erase(bt.name); // the loader neither allocates nor reads what the banks hold
    }

    setup_replay(*st, cfg);

    st->files = open_files(cfg.files, cfg.direct_io, st->direct);
    moe_state * raw = st.get();
    for (int i = 0; i < cfg.moe_io_threads; ++i) {
        st->workers.emplace_back([raw] { raw->worker_main(); });
    }
    if (st->resident) {
        // resident-bank: expert e in slot e of every tensor, read once now
        std::vector<read_job> batch;
        for (size_t i = 0; i < st->tensors.size(); ++i) {
            for (int e = 0; e < st->n_expert; ++e) {
                moe_state::place(st->tensors[i], e, e);
                batch.push_back({(int) i, e, e});
            }
        }
        st->run_jobs(batch);
        if (st->failed.load()) {
            throw std::runtime_error("flashflex: " + st->error);
        }
    }
    if (cfg.moe_preload) {
        preload_schedule(*st);
    }
    if (!cfg.moe_trace.empty()) {
        st->trace = fopen(cfg.moe_trace.c_str(), "ab");
        if (!st->trace) {
            throw std::runtime_error(format("flashflex: cannot open the routing trace %s: %s", cfg.moe_trace.c_str(),
                                            strerror(errno)));
        }
        setvbuf(st->trace, nullptr, _IOFBF, 1 << 20);
    }
    LLAMA_LOG_INFO("flashflex: %s: %zu expert tensors of %zu layers, %d slots each (%.1f MiB), %d I/O threads, "
                   "%s reads%s, prefetch %s%s\n", st->resident ? "resident bank" : "slot banks", st->tensors.size(),
                   st->layers.size(), st->n_slots, st->bank_bytes / 1048576.0, cfg.moe_io_threads,
                   st->direct ? "direct" : "buffered", cfg.moe_shared_only ? ", shared experts only" : "",
                   cfg.moe_prefetch.c_str(), st->schedule.empty() ? "" : ", replaying a trace");
    std::lock_guard<std::mutex> lk(g_models_mutex);
    g_models[&model] = std::move(st);
}

bool flashflex::moe_active(const llama_model * model) {
    return find_state(model) != nullptr;
}

void flashflex::moe_free(const llama_model * model) {
    std::unique_ptr<moe_state> st;
    {
        std::lock_guard<std::mutex> lk(g_models_mutex);
        auto it = g_models.find(model);
        if (it == g_models.end()) {
            return;
        }
        st = std::move(it->second);
        g_models.erase(it);
    }
    st->stop();
}

bool flashflex::moe_failed(const llama_model * model, std::string * error) {
    moe_state * st = find_state(model);
    if (!st || !st->failed.load()) {
        return false;
    }
    if (error) {
        std::lock_guard<std::mutex> lk(st->mtx);
        *error = st->error;
    }
    return true;
}

void flashflex::moe_graph_begin(const llama_model * model) {
    g_building = find_state(model);
    if (g_building) {
        std::fill(g_building->seen.begin(), g_building->seen.end(), false);
        g_building->seen_epoch = false;
    }
}

void flashflex::moe_graph_end() {
    moe_state * st = g_building;
    g_building = nullptr;
    if (!st || st->resident) {
        return; // a resident bank is a full tensor: any use of it is the stock use
    }
    // A banked tensor used anywhere but build_lora_mm_id would be indexed with expert ids: refuse the model.
    for (size_t i = 0; i < st->tensors.size(); ++i) {
        if (!st->seen[i] && st->seen_epoch) {
            st->fail(format("this model's graph does not route %s through the MoE matmul flashflex resolves, so "
                            "its experts cannot live in slot banks (architecture not supported)",
                            st->tensors[i].name.c_str()));
            return;
        }
    }
}

ggml_tensor * flashflex::moe_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done) {
    moe_state * st = g_building;
    if (!st || cur == nullptr || il_done != -1 || st->resident) {
        return cur;
    }
    st->seen_epoch = true;
    return ggml_map_custom1_inplace(ctx, cur, epoch_op, 1, st);
}

namespace {

// Passes a banked matmul needs for a ubatch of `pairs` (token, expert) pairs: enough for every distinct expert.
int passes_for(const moe_state & st, int64_t pairs) {
    const int64_t distinct = std::min<int64_t>(st.n_expert, pairs);
    return (int) ((distinct + st.n_slots - 1) / st.n_slots);
}

} // namespace

uint32_t flashflex::moe_graph_nodes(const llama_model * model, uint32_t n_tokens) {
    moe_state * st = find_state(model);
    if (!st || st->resident) {
        return 0;
    }
    // per pass: the resolve op, the matmul, the merge op and its view
    const int n_pass = passes_for(*st, (int64_t) n_tokens * st->n_expert_used);
    return (uint32_t) (st->tensors.size() * (4 * (size_t) n_pass + 1) + 16);
}

ggml_tensor * flashflex::moe_mul_mat_id(ggml_context * ctx, ggml_tensor * as, ggml_tensor * b, ggml_tensor * ids) {
    moe_state * st = g_building;
    if (!st || st->resident || !st->tensor_index.count(as)) {
        return ggml_mul_mat_id(ctx, as, b, ids);
    }
    const int j = st->tensor_index.at(as);
    st->seen[j] = true;
    const int64_t pairs = ids->ne[0] * ids->ne[1];
    if (pairs == 0) {
        return ggml_mul_mat_id(ctx, as, b, ids); // a layer trimmed to no tokens (no outputs wanted): nothing runs
    }
    const int n_pass = passes_for(*st, pairs);
    ggml_tensor * acc = nullptr;
    for (int p = 0; p < n_pass; ++p) {
        resolve_site * site = site_for(*st, j, p);
        // pass p may only evict pass p-1's experts after pass p-1's matmul: depend on its result
        ggml_tensor * slots = ggml_map_custom3(ctx, ids, acc ? acc : ids, b, resolve_op, 1, site);
        ggml_tensor * out = ggml_mul_mat_id(ctx, as, b, slots);
        acc = acc ? ggml_map_custom3_inplace(ctx, acc, out, slots, merge_op, GGML_N_TASKS_MAX, site) : out;
    }
    return acc;
}

// -------------------------------------------------------------------------------------------------------------
// Public C API: statistics

int32_t llama_flashflex_moe_stats(const llama_model * model, char * buf, size_t buf_size) {
    moe_state * st = find_state(model);
    if (!st) {
        return -1;
    }
    std::string err;
    {
        std::lock_guard<std::mutex> lk(st->mtx);
        err = st->error;
    }
    if (st->trace) {
        fflush(st->trace); // the trace is complete up to now for whoever reads the stats
    }
    uint64_t hits = 0, misses = 0, bytes = 0, calls = 0;
    int64_t read_ns = 0, install_ns = 0;
    uint64_t pf_issued = 0, pf_used = 0, pf_bytes = 0, pf_wasted = 0;
    int64_t pf_read_ns = 0, pf_wait_ns = 0, verify_ns = 0;
    std::string per_layer = "[";
    for (size_t i = 0; i < st->layers.size(); ++i) {
        const layer_counters & c = *st->layers[i].stats;
        const uint64_t h = c.hits.load(), m = c.misses.load();
        per_layer += format("%s{\"layer\": %d, \"calls\": %llu, \"hits\": %llu, \"misses\": %llu, \"hit_rate\": %.6f, "
                            "\"bytes_read\": %llu, \"read_seconds\": %.6f, \"install_seconds\": %.6f, "
                            "\"prefetch_issued\": %llu, \"prefetch_used\": %llu}",
                            i ? ", " : "", st->layers[i].layer, (unsigned long long) c.calls.load(),
                            (unsigned long long) h, (unsigned long long) m, h + m ? (double) h / (h + m) : 0.0,
                            (unsigned long long) c.bytes_read.load(), c.read_ns.load() / 1e9, c.install_ns.load() / 1e9,
                            (unsigned long long) c.prefetch_issued.load(), (unsigned long long) c.prefetch_used.load());
        hits += h;
        misses += m;
        bytes += c.bytes_read.load();
        calls += c.calls.load();
        read_ns += c.read_ns.load();
        install_ns += c.install_ns.load();
        pf_issued += c.prefetch_issued.load();
        pf_used += c.prefetch_used.load();
        pf_bytes += c.prefetch_bytes.load();
        pf_wasted += c.prefetch_wasted_bytes.load();
        pf_read_ns += c.prefetch_read_ns.load();
        pf_wait_ns += c.prefetch_wait_ns.load();
        verify_ns += c.verify_ns.load();
    }
    per_layer += "]";
    std::string out = format(
        "{\"mode\": \"%s\", \"slots\": %d, \"n_expert\": %d, \"n_expert_used\": %d, \"banked_tensors\": %zu, "
        "\"banked_layers\": %zu, \"bank_bytes\": %zu, \"io_threads\": %d, \"direct_io\": %s, \"shared_only\": %s, "
        "\"calls\": %llu, \"hits\": %llu, \"misses\": %llu, \"hit_rate\": %.6f, \"bytes_read\": %llu, "
        "\"read_seconds\": %.6f, \"install_seconds\": %.6f, \"prefetch\": \"%s\", \"prefetch_issued\": %llu, "
        "\"prefetch_used\": %llu, \"prefetch_bytes\": %llu, \"prefetch_wasted_bytes\": %llu, "
        "\"prefetch_read_seconds\": %.6f, \"prefetch_wait_seconds\": %.6f, \"replay_records\": %zu, "
        "\"replay_position\": %zu, \"trace\": %s, \"trace_seconds\": %.6f, \"verify\": %s, "
        "\"verify_seconds\": %.6f, \"layers\": %s, \"error\": %s}",
        st->resident ? "resident-bank" : "slot-bank", st->n_slots, st->n_expert, st->n_expert_used,
        st->tensors.size(), st->layers.size(), st->bank_bytes, st->cfg.moe_io_threads, st->direct ? "true" : "false",
        st->cfg.moe_shared_only ? "true" : "false", (unsigned long long) calls, (unsigned long long) hits,
        (unsigned long long) misses, hits + misses ? (double) hits / (hits + misses) : 0.0,
        (unsigned long long) bytes, read_ns / 1e9, install_ns / 1e9, st->cfg.moe_prefetch.c_str(),
        (unsigned long long) pf_issued, (unsigned long long) pf_used, (unsigned long long) pf_bytes,
        (unsigned long long) pf_wasted, pf_read_ns / 1e9, pf_wait_ns / 1e9, st->schedule.size(), st->cursor,
        st->cfg.moe_trace.empty() ? "null" : json_escape(st->cfg.moe_trace).c_str(), st->trace_ns.load() / 1e9,
        st->cfg.moe_verify ? "true" : "false", verify_ns / 1e9, per_layer.c_str(),
        err.empty() ? "null" : json_escape(err).c_str());
    return write_c_string(out, buf, buf_size);
}

void llama_flashflex_moe_stats_reset(const llama_model * model) {
    moe_state * st = find_state(model);
    if (!st) {
        return;
    }
    for (auto & L : st->layers) {
        L.stats->reset();
    }
    st->trace_ns = 0;
}
