// flashflex MoE expert slot banks (Flash-MoE style): the routed expert tensors of a MoE model are not loaded
// from the GGUF. Their experts live in a sidecar (one file per layer, every expert slice 4096-aligned) and each
// layer keeps a bank of N resident slots per expert tensor; the MoE matmuls index slots, not experts.
//
// Design (public API in include/llama-flashflex.h):
// - Placement: each banked tensor [ne0, ne1, n_expert] is shrunk to [ne0, ne1, N + 1] and placed in a buffer
//   of the buffer type the loader chose for it (plain or repacked layout). Slot N is a zero-filled "junk" slot
//   that never holds an expert (see passes below). In resident-bank mode (N = 0 in the config) the tensor keeps
//   its shape and every expert is read from the sidecar at load time; the graph is then the stock graph.
// - Resolution: build_lora_mm_id's ggml_mul_mat_id call goes through bank_mul_mat_id, which inserts a custom op
//   turning the router's expert ids into slot ids. On a miss it picks victims by LRU after reserving every hit
//   of the ubatch (so no two experts share a slot), reads the misses from the sidecar with parallel preads
//   (O_DIRECT when possible) and only then lets the matmul run. Routing weights, per-expert scales and biases
//   keep using the true expert ids: only the matmul's ids change.
// - Passes: when a ubatch may use more distinct experts than the bank holds, the matmul is built as P passes.
//   Pass p installs the p-th group of at most N experts and sends every pair routed to another group to the
//   junk slot; a merge op copies each pair's row from the pass that computed it with its real expert. Every
//   expert's rows are computed together, in the same order, by the same kernel as stock, so the logits stay
//   bitwise identical at any ubatch size — the run never aborts and never needs -ub 1. Each pass's matmul goes
//   where stock's would (the CPU, or a GPU that takes large batches: op offload), so pass p > 0 reads the bank
//   through a tensor of its own (ggml's scheduler copies an offloaded weight to the GPU once per graph, with the
//   slots the first matmul using it routes to), and the merge writes a new tensor on the CPU.
// - Traces, oracles, prefetch: with a trace file every layer call appends one JSON line (ids, slots, hit per
//   id). A replayed trace (a schedule) is checked record by record against the run's routing; the oracle
//   modes use it to pre-install every expert (oracle-all-hit) or to read the next record's experts ahead of use
//   (prefetch policy "oracle"). The real policy "router-lookahead" applies layer L+1's router to layer L's
//   input. Prefetch reads run on the I/O threads behind demand reads, into free or least recently used slots
//   that hold no expert the prediction or the current call needs; a resolution that needs a slot still being
//   prefetched waits for that read only.
// - Failure: a read error marks the model failed; resolution stops reading, and the abort callback ends the
//   graph, so llama_decode returns an error instead of computing on bad data.

#include "llama-flashflex-bank.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"
#include "llama-flashflex-json.h"
#include "llama-flashflex-runtime.h"
#include "llama-flashflex.h"
#include "llama-impl.h"
#include "llama-model-loader.h"
#include "llama-model.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

using namespace flashflex;

// -------------------------------------------------------------------------------------------------------------
// The bank's reads: demand reads (a resolution waits for them) ahead of prefetch reads (nobody waits) in one
// pool of I/O threads.

void bank_state::stop() {
    pool.stop();
    trace.close();
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

// Never called with pool.mutex() held: it takes the lock, so a resolution about to wait cannot miss the wake-up.
void bank_state::fail(const std::string & msg) {
    {
        std::lock_guard<std::mutex> lk(pool.mutex());
        failed.set(msg);
    }
    pool.done_cv().notify_all();
}

namespace {

// The pool job of one expert read: demand reads count down pending_demand, prefetch reads clear the slot's
// in-flight mark (both under the pool's lock).
io_job io_job_for(bank_state & st, const read_job & j) {
    return {
        nullptr,
        [&st, j](void * staging) { st.read_expert(j, staging); },
        [&st, j] {
            if (j.prefetch) {
                st.tensors[j.tensor].inflight[j.slot] = 0;
            } else {
                if (st.waiter_verifies(j)) {
                    st.to_verify.push_back(j);
                }
                --st.pending_demand;
            }
        },
    };
}

}  // namespace

// One expert of one tensor from the sidecar into a slot (an I/O thread).
void bank_state::read_expert(const read_job & j, void * staging) {
    bank_tensor &   bt        = tensors[j.tensor];
    const uint64_t  off       = bt.offset + (uint64_t) j.expert * bt.stride;
    uint8_t *       slot      = bt.base + (size_t) j.slot * bt.bytes;
    const bool      into_slot = bt.plain && (!direct || bt.bytes % k_page == 0);
    const size_t    len       = into_slot ? bt.bytes : (direct ? align_up(bt.bytes, k_page) : bt.bytes);
    const int64_t   t0        = now_ns();
    const long long n         = pread_full(files[bt.file].fd, into_slot ? slot : staging, len, off);
    if (n < 0) {
        fail(format("reading expert %d of %s from %s failed: %s", j.expert, bt.name.c_str(),
                    files[bt.file].path.c_str(), strerror(errno)));
        return;
    }
    if ((size_t) n < bt.bytes) {
        fail(
            format("%s ended early while reading expert %d of %s (the sidecar is truncated or changed: "
                   "run flashflex sidecar verify)",
                   files[bt.file].path.c_str(), j.expert, bt.name.c_str()));
        return;
    }
    if (cfg.moe_verify && !bt.checksums.empty() && !waiter_verifies(j)) {
        verify_expert(bt, j.expert, into_slot ? slot : staging);
        if (failed.is_set()) {
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

// Whether the compute thread checksums this read rather than the I/O thread: a demand read of plain bytes, which the
// compute thread would otherwise only wait for. Checksumming reads back the expert from memory (an O_DIRECT read
// leaves it out of the caches), and on the I/O thread that sits between the read and the wait's end, on a core the
// compute threads want; on the waiting thread it overlaps the reads still in flight.
bool bank_state::waiter_verifies(const read_job & j) const {
    const bank_tensor & bt = tensors[j.tensor];
    return cfg.moe_verify && !bt.checksums.empty() && !j.prefetch && bt.plain;
}

// Checks one expert's bytes against the checksum extraction recorded; a mismatch fails the runtime.
void bank_state::verify_expert(const bank_tensor & bt, int expert, const void * data) {
    const int64_t  tv  = thread_cpu_ns();
    const uint64_t sum = expert_checksum(data, bt.bytes);
    layers[layer_index[bt.layer]].stats->verify_ns.fetch_add(thread_cpu_ns() - tv);
    if (sum != bt.checksums[expert]) {
        fail(
            format("layer %d, tensor %s, expert %d does not match its checksum in %s (bit rot, or the layer file "
                   "changed: run flashflex sidecar verify)",
                   bt.layer, bt.name.c_str(), expert, files[bt.file].path.c_str()));
    }
}

// Reads every job in parallel and returns when all are done and checked (compute thread), checksumming the reads
// that are done while it waits for the others.
void bank_state::run_jobs(const std::vector<read_job> & batch) {
    if (batch.empty()) {
        return;
    }
    std::unique_lock<std::mutex> lk(pool.mutex());
    for (auto it = batch.rbegin(); it != batch.rend(); ++it) {
        pool.push(io_job_for(*this, *it), /*urgent =*/true);  // ahead of any prefetch read still queued
    }
    pending_demand += (int) batch.size();
    pool.wake();
    for (;;) {
        pool.done_cv().wait(lk, [&] { return pending_demand == 0 || !to_verify.empty() || pool.stopping(); });
        if (to_verify.empty() || pool.stopping()) {
            to_verify.clear();
            return;
        }
        const read_job j = to_verify.back();
        to_verify.pop_back();
        if (failed.is_set()) {
            continue;  // a read failed: its slot holds no expert, and the first error is the one to report
        }
        lk.unlock();
        const bank_tensor & bt = tensors[j.tensor];
        verify_expert(bt, j.expert, bt.base + (size_t) j.slot * bt.bytes);
        lk.lock();
    }
}

// Queues prefetch reads behind the demand reads and returns at once (compute thread).
void bank_state::queue_prefetch(const std::vector<read_job> & batch) {
    if (batch.empty()) {
        return;
    }
    {
        std::lock_guard<std::mutex> lk(pool.mutex());
        for (const auto & j : batch) {
            tensors[j.tensor].inflight[j.slot] = 1;
            pool.push(io_job_for(*this, j));
        }
    }
    pool.wake();
}

// The slots of bt a prefetch read is still writing.
std::vector<uint8_t> bank_state::busy_slots(const bank_tensor & bt) {
    std::lock_guard<std::mutex> lk(pool.mutex());
    return bt.inflight;
}

// Waits until no prefetch read is writing any of `slots` of bt; the wait counts against prefetch.
void bank_state::wait_slots(const bank_tensor & bt, const std::vector<int> & slots, layer_counters & c) {
    std::unique_lock<std::mutex> lk(pool.mutex());
    auto                         busy = [&] {
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
    pool.done_cv().wait(lk, [&] { return pool.stopping() || !busy(); });
    c.prefetch_wait_ns.fetch_add(now_ns() - t0);
}

// -------------------------------------------------------------------------------------------------------------
// Resolution: the router's expert ids -> slot ids, installing misses (LRU) and grouping a ubatch into passes.

// Bank bookkeeping: expert e now lives in slot s of tensor bt (evicting whatever was there).
void bank_state::place(bank_tensor & bt, int e, int s) {
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
void bank_state::group_ubatch(bank_layer & L, const bank_tensor & bt, const std::vector<int32_t> & ids) {
    L.ids   = ids;
    L.epoch = epoch.load();
    L.group_of.assign(n_expert, -1);
    std::vector<int> resident_first, others;
    for (int32_t e : ids) {
        if (L.group_of[e] != -1) {
            continue;
        }
        L.group_of[e] = -2;  // seen
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
bool bank_state::begin_layer_call(bank_layer & L, const std::vector<int32_t> & ids) {
    const std::string off_schedule = schedule.advance(L.layer, ids);
    if (!off_schedule.empty()) {
        fail(off_schedule);
        return false;
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

// The router's ids (token-major) from its output; false, with the model failed, when one is out of range.
bool bank_state::routed_ids(const ggml_tensor * ids_t, std::vector<int32_t> & ids) {
    const int64_t K = ids_t->ne[0];
    const int64_t T = ids_t->ne[1];
    ids.resize(K * T);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t k = 0; k < K; ++k) {
            const int32_t e = *(const int32_t *) ((const char *) ids_t->data + t * ids_t->nb[1] + k * ids_t->nb[0]);
            if (e < 0 || e >= n_expert) {
                fail(format("the router chose expert %d, outside 0..%d", e, n_expert - 1));
                return false;
            }
            ids[t * K + k] = e;
        }
    }
    return true;
}

// A pass's experts into slots of tensor `tensor`: hits first, reserving every slot the group already has (waiting
// for any still being prefetched), then victims for the misses among the rest by LRU. The misses' reads go to
// `batch`; `missed` marks them. Returns how many missed.
size_t bank_state::install_group(int                      tensor,
                                 bank_layer &             L,
                                 const std::vector<int> & group,
                                 std::vector<bool> &      missed,
                                 std::vector<read_job> &  batch) {
    bank_tensor &     bt = tensors[tensor];
    std::vector<bool> reserved(n_slots, false);
    std::vector<int>  misses, hit_slots;
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
        batch.push_back({ tensor, e, victim });
    }
    return misses.size();
}

// One group for the whole ubatch: the layer's other banked tensors take the same slots as tensor `tensor` now, so
// their reads run in the same parallel batch and their own resolutions are all hits.
void bank_state::share_group(int                      tensor,
                             bank_layer &             L,
                             const std::vector<int> & group,
                             uint64_t                 stamp,
                             std::vector<read_job> &  batch) {
    const bank_tensor & bt = tensors[tensor];
    for (int j : L.tensors) {
        if (j == tensor) {
            continue;
        }
        bank_tensor &    c = tensors[j];
        std::vector<int> install;
        for (int e : group) {
            if (c.slot_expert[bt.expert_slot[e]] != e) {
                install.push_back(bt.expert_slot[e]);
            }
        }
        wait_slots(c, install, *L.stats);  // a prefetch may still be writing a slot this replaces
        for (int e : group) {
            const int s = bt.expert_slot[e];
            if (c.slot_expert[s] != e) {
                place(c, e, s);
                batch.push_back({ j, e, s });
            }
            c.slot_used[s] = stamp;
        }
    }
}

// The first resolution of a pass in a layer call: its hits and misses, its trace entries, and after the call's
// last pass the trace line and the read-ahead.
void bank_state::count_pass(const resolve_site &         site,
                            int                          li,
                            const std::vector<int32_t> & ids,
                            const std::vector<bool> &    missed,
                            size_t                       n_group,
                            size_t                       n_missed,
                            const ggml_tensor *          b,
                            int64_t                      K,
                            int64_t                      T) {
    bank_layer &        L  = layers[li];
    const bank_tensor & bt = tensors[site.tensor];
    L.counted[site.pass]   = true;
    L.stats->hits.fetch_add(n_group - n_missed);
    L.stats->misses.fetch_add(n_missed);
    L.stats->calls.fetch_add(1);
    if (trace.is_open()) {
        L.trace_slot.resize(K * T);
        L.trace_hit.resize(K * T);
        for (int64_t i = 0; i < K * T; ++i) {
            if (L.group_of[ids[i]] == site.pass) {
                L.trace_slot[i] = bt.expert_slot[ids[i]];
                L.trace_hit[i]  = missed[ids[i]] ? 0 : 1;
            }
        }
    }
    if (site.pass + 1 == (int) L.groups.size()) {
        // the layer call's own reads are done: record it and read ahead while it computes
        if (trace.is_open() && !trace.write(epoch.load(), L.layer, T, K, ids, L.trace_slot, L.trace_hit)) {
            fail(format("writing the routing trace failed: %s", strerror(errno)));
        }
        if (policy != prefetch_policy::none) {
            prefetch_after(li, ids, b, K);
        }
    }
}

// The custom op before a banked matmul: expert ids -> slot ids for pass `site.pass` (compute thread).
// `b` is the matmul's input (for router-lookahead).
void bank_state::resolve(const resolve_site & site,
                         const ggml_tensor *  ids_t,
                         const ggml_tensor *  b,
                         ggml_tensor *        dst) {
    const int64_t t0  = now_ns();
    const int64_t K   = ids_t->ne[0];
    const int64_t T   = ids_t->ne[1];
    int32_t *     out = (int32_t *) dst->data;
    std::fill(out, out + K * T, (int32_t) junk());
    if (failed.is_set() || cfg.moe_shared_only) {
        return;  // shared-only: every routed pair hits the zero slot; failed: the abort callback ends the graph
    }
    std::vector<int32_t> ids;
    if (!routed_ids(ids_t, ids)) {
        return;
    }
    bank_tensor & bt = tensors[site.tensor];
    const int     li = layer_index[bt.layer];
    bank_layer &  L  = layers[li];
    if (L.epoch != epoch.load() || L.ids != ids) {
        if (!begin_layer_call(L, ids)) {
            return;
        }
        group_ubatch(L, bt, ids);
    }
    if (site.pass >= (int) L.groups.size()) {
        return;  // this ubatch needs fewer passes than the graph has
    }
    const std::vector<int> & group = L.groups[site.pass];

    std::vector<bool>     missed(n_expert, false);
    std::vector<read_job> batch;
    const size_t          n_missed = install_group(site.tensor, L, group, missed, batch);
    const uint64_t        stamp    = ++clock;
    for (int e : group) {
        bt.slot_used[bt.expert_slot[e]] = stamp;
    }
    if (L.groups.size() == 1) {
        share_group(site.tensor, L, group, stamp, batch);
    }
    run_jobs(batch);

    if (!L.counted[site.pass]) {
        count_pass(site, li, ids, missed, group.size(), n_missed, b, K, T);
    }
    for (int64_t i = 0; i < K * T; ++i) {
        if (L.group_of[ids[i]] == site.pass) {
            out[i] = bt.expert_slot[ids[i]];
        }
    }
    L.stats->install_ns.fetch_add(now_ns() - t0);
}

// -------------------------------------------------------------------------------------------------------------
// Graph ops and the registry

namespace {

model_registry<bank_state> g_models;
thread_local bank_state *  g_building = nullptr;

bank_state * find_state(const llama_model * model) {
    return g_models.find(model);
}

void resolve_op(ggml_tensor *       dst,
                const ggml_tensor * ids,
                const ggml_tensor * after,
                const ggml_tensor * b,
                int                 ith,
                int                 nth,
                void *              ud) {
    (void) after;
    (void) nth;
    if (ith == 0) {
        auto * site = (resolve_site *) ud;
        site->st->resolve(*site, ids, b, dst);
    }
}

// dst <- each pair's row of `pass_out` where this pass computed it with its real expert, else its row of `acc`.
void merge_op(ggml_tensor *       dst,
              const ggml_tensor * acc,
              const ggml_tensor * pass_out,
              const ggml_tensor * slots,
              int                 ith,
              int                 nth,
              void *              ud) {
    const int32_t junk = ((resolve_site *) ud)->st->junk();
    const int64_t K    = slots->ne[0];
    const int64_t T    = slots->ne[1];
    const size_t  row  = dst->ne[0] * sizeof(float);
    for (int64_t i = ith; i < K * T; i += nth) {
        const int64_t       k    = i % K;
        const int64_t       t    = i / K;
        const ggml_tensor * from = ((const int32_t *) slots->data)[i] != junk ? pass_out : acc;
        memcpy((char *) dst->data + k * dst->nb[1] + t * dst->nb[2],
               (const char *) from->data + k * from->nb[1] + t * from->nb[2], row);
    }
}

void epoch_op(ggml_tensor * dst, const ggml_tensor * a, int ith, int nth, void * ud) {
    (void) dst;
    (void) a;
    (void) nth;
    if (ith == 0) {
        ((bank_state *) ud)->epoch.fetch_add(1);
    }
}

resolve_site * site_for(bank_state & st, int tensor, int pass) {
    for (auto & s : st.sites) {
        if (s.tensor == tensor && s.pass == pass) {
            return &s;
        }
    }
    st.sites.push_back({ &st, tensor, pass });
    return &st.sites.back();
}

}  // namespace

// -------------------------------------------------------------------------------------------------------------
// Setup, stage by stage (bank_setup)

namespace {

// The bank's shape from the model and the configuration: experts, slots, and whether a junk slot is needed.
void size_bank(bank_state & st, const llama_model & model, const config & cfg) {
    st.cfg           = cfg;
    st.resident      = cfg.moe_slots == 0;
    st.n_expert      = (int) model.hparams.n_expert;
    st.n_expert_used = (int) model.hparams.n_expert_used_max();
    if (st.n_expert <= 0) {
        throw std::runtime_error("flashflex: slot banks need a MoE model, and this model has no routed experts");
    }
    st.n_slots = st.resident ? st.n_expert : cfg.moe_slots;
    if (!st.resident && st.n_slots < st.n_expert_used) {
        throw std::runtime_error(
            format("flashflex: a bank of %d slots is smaller than the %d experts each token "
                   "uses; use at least %d slots",
                   st.n_slots, st.n_expert_used, st.n_expert_used));
    }
    if (st.n_slots > st.n_expert) {
        throw std::runtime_error(
            format("flashflex: a bank of %d slots is larger than the model's %d experts", st.n_slots, st.n_expert));
    }
    st.layer_index.assign((int) model.hparams.n_layer(), -1);
    st.has_junk = !st.resident && (st.n_slots < st.n_expert || cfg.moe_shared_only);
}

// The model tensor a sidecar entry banks, validated: a routed expert tensor of this model, in host memory.
ggml_tensor * banked_tensor(const bank_state &        st,
                            const bank_tensor_cfg &   bc,
                            llama_model_loader &      ml,
                            const loader_tensor_map & model_tensors) {
    auto mt = model_tensors.find(bc.name);
    if (mt == model_tensors.end() || ml.weights_map.find(bc.name) == ml.weights_map.end()) {
        throw std::runtime_error(
            format("flashflex: the sidecar banks %s, which this model does not have "
                   "(a sidecar of another model?)",
                   bc.name.c_str()));
    }
    ggml_tensor * t = mt->second.first;
    if (st.tensor_index.count(t)) {
        throw std::runtime_error(format("flashflex: %s is banked twice", bc.name.c_str()));
    }
    if (t->ne[2] != st.n_expert || t->ne[3] != 1 || !ggml_is_contiguous(t) ||
        ggml_nbytes(t) != bc.bytes_per_expert * (uint64_t) st.n_expert) {
        throw std::runtime_error(
            format("flashflex: %s is not a routed expert tensor of %d experts x %llu bytes "
                   "(a sidecar of another model?)",
                   bc.name.c_str(), st.n_expert, (unsigned long long) bc.bytes_per_expert));
    }
    const int il = layer_of(bc.name);
    if (il < 0 || il >= (int) st.layer_index.size()) {
        throw std::runtime_error(format("flashflex: %s is not a per-layer tensor", bc.name.c_str()));
    }
    require_host_weights(bc.name, mt->second.second, "slot banks support");
    return t;
}

// Each sidecar entry validated, its tensor shrunk to its bank, and added to its layer; where each tensor lies in
// the buffer of its buffer type (tensor_off) and the size of each buffer (buf_size).
void collect_banks(bank_state &                                   st,
                   const llama_model &                            model,
                   llama_model_loader &                           ml,
                   const loader_tensor_map &                      model_tensors,
                   std::map<ggml_backend_buffer_type_t, size_t> & buf_size,
                   std::vector<size_t> &                          tensor_off) {
    const int64_t n_bank = st.n_slots + (st.has_junk ? 1 : 0);
    for (const auto & bc : st.cfg.banks) {
        ggml_tensor *              t    = banked_tensor(st, bc, ml, model_tensors);
        ggml_backend_buffer_type_t buft = model_tensors.at(bc.name).second;
        const int                  il   = layer_of(bc.name);
        t->ne[2]                        = n_bank;
        t->nb[3]                        = t->nb[2] * t->ne[2];

        bank_tensor bt;
        bt.t      = t;
        bt.name   = bc.name;
        bt.layer  = il;
        bt.file   = bc.file;
        bt.offset = bc.offset;
        bt.stride = bc.expert_stride;
        bt.bytes  = bc.bytes_per_expert;
        bt.plain  = buft == ggml_backend_cpu_buffer_type();
        if (!bc.checksums.empty() && bc.checksums.size() != (size_t) st.n_expert) {
            throw std::runtime_error(
                format("flashflex: %s has %zu checksums for %d experts (a sidecar of another "
                       "model?)",
                       bc.name.c_str(), bc.checksums.size(), st.n_expert));
        }
        bt.checksums = bc.checksums;
        bt.slot_expert.assign(n_bank, -1);
        bt.expert_slot.assign(st.n_expert, -1);
        bt.slot_used.assign(n_bank, 0);
        bt.inflight.assign(n_bank, 0);
        size_t & off = buf_size[buft];
        tensor_off.push_back(off);
        // with a junk slot, room after it: ggml's scheduler, copying the experts an offloaded matmul uses to the GPU,
        // copies up to 512 bytes past the last one it uses unless that is the tensor's last (the phantom slots)
        off += align_up(ggml_backend_buft_get_alloc_size(buft, t) + (st.has_junk ? 512 : 0), k_page);
        st.staging_bytes = std::max(st.staging_bytes, align_up(bt.bytes, k_page));

        if (st.layer_index[il] < 0) {
            st.layer_index[il] = (int) st.layers.size();
            st.layers.emplace_back();
            st.layers.back().layer = il;
        }
        st.layers[st.layer_index[il]].tensors.push_back((int) st.tensors.size());
        st.layers[st.layer_index[il]].expert_bytes += bt.bytes;
        st.layers[st.layer_index[il]].router = model.layers[il].ffn_gate_inp;
        st.tensor_index[t]                   = (int) st.tensors.size();
        st.tensors.push_back(std::move(bt));
    }
    st.seen.assign(st.tensors.size(), false);
}

// One zero-filled buffer per buffer type; plain memory is page-aligned for O_DIRECT reads into slots.
std::map<ggml_backend_buffer_type_t, ggml_backend_buffer_t> allocate_banks(
    bank_state &                                         st,
    const std::map<ggml_backend_buffer_type_t, size_t> & buf_size) {
    std::map<ggml_backend_buffer_type_t, ggml_backend_buffer_t> buf_of;
    for (auto & [buft, size] : buf_size) {
        ggml_backend_buffer_t buf = nullptr;
        if (buft == ggml_backend_cpu_buffer_type()) {
            void * mem = nullptr;
            if (posix_memalign(&mem, k_page, size) != 0) {
                throw std::runtime_error(format("flashflex: cannot allocate the %zu-byte expert banks", size));
            }
            st.host_mem.push_back(mem);
            buf = ggml_backend_cpu_buffer_from_ptr(mem, size);
        } else {
            buf = ggml_backend_buft_alloc_buffer(buft, size);
        }
        if (!buf) {
            throw std::runtime_error(
                format("flashflex: cannot allocate the %zu-byte %s expert banks", size, ggml_backend_buft_name(buft)));
        }
        ggml_backend_buffer_clear(buf, 0);
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        st.bufs.push_back(buf);
        buf_of[buft] = buf;
        st.bank_bytes += size;
    }
    return buf_of;
}

// The most passes a banked matmul can need: one per group of N of the model's experts.
int max_passes(const bank_state & st) {
    return st.has_junk ? (st.n_expert + st.n_slots - 1) / st.n_slots : 1;
}

// The weights of passes 1.. of bt's matmul: tensors of the same shape and layout over the same bytes, each a weight
// of its own for ggml's scheduler, which copies an offloaded weight to the GPU once per graph (see bank_mul_mat_id).
void add_pass_tensors(bank_state & st, bank_tensor & bt, ggml_backend_buffer_t buf) {
    for (int p = 1; p < max_passes(st); ++p) {
        ggml_tensor * v =
            ggml_new_tensor_3d(st.slot_ctx, bt.t->type, bt.t->ne[0], bt.t->ne[1], st.n_slots + (st.has_junk ? 1 : 0));
        if (ggml_backend_tensor_alloc(buf, v, bt.base) != GGML_STATUS_SUCCESS) {
            throw std::runtime_error(format("flashflex: cannot place pass %d of %s", p, bt.name.c_str()));
        }
        v->ne[2] = bt.t->ne[2];  // the phantom slots, as bt's (set after the allocation: no memory behind them)
        v->nb[3] = bt.t->nb[3];
        ggml_format_name(v, "%s (pass %d)", bt.name.c_str(), p);
        bt.pass_tensor.push_back(v);
    }
}

// Every banked tensor in its buffer (and, in a repacked layout, one tensor per slot to set an expert alone; a tensor
// per pass after the first); the loader neither allocates nor reads them.
void place_banks(bank_state &                                                        st,
                 llama_model_loader &                                                ml,
                 const loader_tensor_map &                                           model_tensors,
                 const std::map<ggml_backend_buffer_type_t, ggml_backend_buffer_t> & buf_of,
                 const std::vector<size_t> &                                         tensor_off) {
    const int64_t n_bank         = st.n_slots + (st.has_junk ? 1 : 0);
    size_t        n_slot_tensors = 0;
    for (const auto & bt : st.tensors) {
        n_slot_tensors += (bt.plain ? 0 : (size_t) n_bank) + (size_t) (max_passes(st) - 1);
    }
    if (n_slot_tensors > 0) {
        ggml_init_params params = { n_slot_tensors * ggml_tensor_overhead(), nullptr, true };
        st.slot_ctx             = ggml_init(params);
    }
    for (size_t i = 0; i < st.tensors.size(); ++i) {
        bank_tensor &         bt  = st.tensors[i];
        ggml_backend_buffer_t buf = buf_of.at(model_tensors.at(bt.name).second);
        bt.base                   = (uint8_t *) ggml_backend_buffer_get_base(buf) + tensor_off[i];
        if (ggml_backend_tensor_alloc(buf, bt.t, bt.base) != GGML_STATUS_SUCCESS) {
            throw std::runtime_error(format("flashflex: cannot place %s in its expert bank", bt.name.c_str()));
        }
        if (!bt.plain) {
            // the repacked layout keeps each expert's bytes in its own range, so one expert can be set alone
            for (int64_t s = 0; s < n_bank; ++s) {
                ggml_tensor * v = ggml_new_tensor_3d(st.slot_ctx, bt.t->type, bt.t->ne[0], bt.t->ne[1], 1);
                if (ggml_backend_tensor_alloc(buf, v, bt.base + s * bt.bytes) != GGML_STATUS_SUCCESS) {
                    throw std::runtime_error(format("flashflex: cannot place a slot of %s", bt.name.c_str()));
                }
                bt.slot_tensor.push_back(v);
            }
        }
        if (st.has_junk && st.n_expert_used > 1) {
            // Phantom slots after the junk slot, with no memory behind them. In a pass every pair routed to another
            // pass goes to the junk slot, up to n_expert_used - 1 pairs of one token, while ggml's mul_mat_id maps
            // rows into a work-buffer table of (slots x tokens) entries, one per token per slot: the junk slot's
            // extra rows run into the next slots' entries. Phantom slots are never routed to (so never read) and
            // make room for those rows inside the table; without them they ran past the end of the work buffer
            // when nothing else had made it larger (a heap overflow with every layer on an RPC worker).
            bt.t->ne[2] = n_bank + st.n_expert_used - 1;
            bt.t->nb[3] = bt.t->nb[2] * bt.t->ne[2];
        }
        add_pass_tensors(st, bt, buf);
        ml.weights_map.erase(bt.name);  // the loader neither allocates nor reads what the banks hold
    }
}

// resident-bank: expert e in slot e of every tensor, read once now.
void read_resident(bank_state & st) {
    std::vector<read_job> batch;
    for (size_t i = 0; i < st.tensors.size(); ++i) {
        for (int e = 0; e < st.n_expert; ++e) {
            bank_state::place(st.tensors[i], e, e);
            batch.push_back({ (int) i, e, e });
        }
    }
    st.run_jobs(batch);
    if (st.failed.is_set()) {
        throw std::runtime_error("flashflex: " + st.failed.message());
    }
}

}  // namespace

// -------------------------------------------------------------------------------------------------------------
// Entry points for the call sites (llama-flashflex-config.cpp)

void flashflex::bank_setup(const llama_model & model, llama_model_loader & ml, const config & cfg) {
    auto st = std::make_unique<bank_state>();
    size_bank(*st, model, cfg);

    // validate the configuration against the model, shrink each tensor to its bank and size the buffers
    const loader_tensor_map                      model_tensors = loader_tensors(ml);
    std::map<ggml_backend_buffer_type_t, size_t> buf_size;
    std::vector<size_t>                          tensor_off;
    collect_banks(*st, model, ml, model_tensors, buf_size, tensor_off);
    place_banks(*st, ml, model_tensors, allocate_banks(*st, buf_size), tensor_off);

    st->setup_replay();

    st->files = open_files(cfg.files, cfg.direct_io, st->direct);
    st->pool.start(cfg.moe_io_threads, st->staging_bytes, st->failed);
    if (st->resident) {
        read_resident(*st);
    }
    if (cfg.moe_preload) {
        st->preload_schedule();
    }
    if (!cfg.moe_trace.empty()) {
        st->trace.open(cfg.moe_trace);
    }
    LLAMA_LOG_INFO(
        "flashflex: %s: %zu expert tensors of %zu layers, %d slots each (%.1f MiB), %d I/O threads, "
        "%s reads%s, prefetch %s%s\n",
        st->resident ? "resident bank" : "slot banks", st->tensors.size(), st->layers.size(), st->n_slots,
        st->bank_bytes / 1048576.0, cfg.moe_io_threads, st->direct ? "direct" : "buffered",
        cfg.moe_shared_only ? ", shared experts only" : "", cfg.moe_prefetch.c_str(),
        st->schedule.empty() ? "" : ", replaying a trace");
    g_models.add(&model, std::move(st));
}

bool flashflex::bank_active(const llama_model * model) {
    return find_state(model) != nullptr;
}

void flashflex::bank_free(const llama_model * model) {
    g_models.remove(model);
}

bool flashflex::bank_failed(const llama_model * model, std::string * error) {
    return g_models.failed(model, error);
}

void flashflex::bank_graph_begin(const llama_model * model) {
    g_building = find_state(model);
    if (g_building) {
        std::fill(g_building->seen.begin(), g_building->seen.end(), false);
        g_building->seen_epoch = false;
    }
}

void flashflex::bank_graph_end() {
    bank_state * st = g_building;
    g_building      = nullptr;
    if (!st || st->resident) {
        return;  // a resident bank is a full tensor: any use of it is the stock use
    }
    // A banked tensor used anywhere but build_lora_mm_id would be indexed with expert ids: refuse the model.
    for (size_t i = 0; i < st->tensors.size(); ++i) {
        if (!st->seen[i] && st->seen_epoch) {
            st->fail(
                format("this model's graph does not route %s through the MoE matmul flashflex resolves, so "
                       "its experts cannot live in slot banks (architecture not supported)",
                       st->tensors[i].name.c_str()));
            return;
        }
    }
}

ggml_tensor * flashflex::bank_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done) {
    bank_state * st = g_building;
    if (!st || cur == nullptr || il_done != -1 || st->resident) {
        return cur;
    }
    st->seen_epoch = true;
    return place_on_cpu(ggml_map_custom1_inplace(ctx, cur, epoch_op, 1, st));
}

namespace {

// Passes a banked matmul needs for a ubatch of `pairs` (token, expert) pairs: enough for every distinct expert.
int passes_for(const bank_state & st, int64_t pairs) {
    const int64_t distinct = std::min<int64_t>(st.n_expert, pairs);
    return (int) ((distinct + st.n_slots - 1) / st.n_slots);
}

}  // namespace

uint32_t flashflex::bank_graph_nodes(const llama_model * model, uint32_t n_tokens) {
    bank_state * st = find_state(model);
    if (!st || st->resident) {
        return 0;
    }
    // per pass: the resolve op, the matmul, the merge op and the pass's weight
    const int n_pass = passes_for(*st, (int64_t) n_tokens * st->n_expert_used);
    return (uint32_t) (st->tensors.size() * (4 * (size_t) n_pass + 1) + 16);
}

ggml_tensor * flashflex::bank_mul_mat_id(ggml_context * ctx, ggml_tensor * as, ggml_tensor * b, ggml_tensor * ids) {
    bank_state * st = g_building;
    if (!st || st->resident || !st->tensor_index.count(as)) {
        return ggml_mul_mat_id(ctx, as, b, ids);
    }
    const int j         = st->tensor_index.at(as);
    st->seen[j]         = true;
    const int64_t pairs = ids->ne[0] * ids->ne[1];
    if (pairs == 0) {
        return ggml_mul_mat_id(ctx, as, b, ids);  // a layer trimmed to no tokens (no outputs wanted): nothing runs
    }
    const int     n_pass = passes_for(*st, pairs);
    ggml_tensor * acc    = nullptr;
    GGML_ASSERT(n_pass <= 1 + (int) st->tensors[j].pass_tensor.size());
    for (int p = 0; p < n_pass; ++p) {
        resolve_site * site  = site_for(*st, j, p);
        // pass p may only evict pass p-1's experts after pass p-1's matmul: depend on its result
        ggml_tensor *  slots = place_on_cpu(ggml_map_custom3(ctx, ids, acc ? acc : ids, b, resolve_op, 1, site));
        // Every pass's matmul goes where stock llama.cpp's would, by its weights' buffer (the bank's, host memory):
        // the CPU, or a local GPU that takes large batches (op offload, copying the slots used), as with --cpu-moe.
        // An offloaded weight is copied to the GPU once per graph, with the slots of the first matmul that uses it:
        // so each later pass reads the bank through its own tensor, copied with its own slots after its resolution.
        ggml_tensor *  w     = p == 0 ? as : st->tensors[j].pass_tensor[p - 1];
        ggml_tensor *  out   = ggml_mul_mat_id(ctx, w, b, slots);
        // the merge writes a new tensor on the CPU (a pass's result may be in a GPU's memory)
        acc = acc ? pin_to_cpu(ggml_map_custom3(ctx, acc, out, slots, merge_op, GGML_N_TASKS_MAX, site)) : out;
    }
    return acc;
}

// -------------------------------------------------------------------------------------------------------------
// Public C API: statistics

int32_t llama_flashflex_moe_stats(const llama_model * model, char * buf, size_t buf_size) {
    bank_state * st = find_state(model);
    if (!st) {
        return -1;
    }
    st->trace.flush();  // the trace is complete up to now for whoever reads the stats
    uint64_t                 hits = 0, misses = 0, bytes = 0, calls = 0;
    int64_t                  read_ns = 0, install_ns = 0;
    uint64_t                 pf_issued = 0, pf_used = 0, pf_bytes = 0, pf_wasted = 0;
    int64_t                  pf_read_ns = 0, pf_wait_ns = 0, verify_ns = 0;
    std::vector<std::string> per_layer;
    for (const bank_layer & L : st->layers) {
        const layer_counters & c = *L.stats;
        const uint64_t         h = c.hits.load(), m = c.misses.load();
        per_layer.push_back(json_object()
                                .add("layer", L.layer)
                                .add("calls", c.calls.load())
                                .add("hits", h)
                                .add("misses", m)
                                .add("hit_rate", h + m ? (double) h / (h + m) : 0.0)
                                .add("bytes_read", c.bytes_read.load())
                                .add("read_seconds", c.read_ns.load() / 1e9)
                                .add("install_seconds", c.install_ns.load() / 1e9)
                                .add("prefetch_issued", c.prefetch_issued.load())
                                .add("prefetch_used", c.prefetch_used.load())
                                .str());
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
    json_object out;
    out.add("mode", st->resident ? "resident-bank" : "slot-bank")
        .add("slots", st->n_slots)
        .add("n_expert", st->n_expert)
        .add("n_expert_used", st->n_expert_used)
        .add("banked_tensors", st->tensors.size())
        .add("banked_layers", st->layers.size())
        .add("bank_bytes", st->bank_bytes)
        .add("io_threads", st->cfg.moe_io_threads)
        .add("direct_io", st->direct)
        .add("shared_only", st->cfg.moe_shared_only != 0)
        .add("calls", calls)
        .add("hits", hits)
        .add("misses", misses)
        .add("hit_rate", hits + misses ? (double) hits / (hits + misses) : 0.0)
        .add("bytes_read", bytes)
        .add("read_seconds", read_ns / 1e9)
        .add("install_seconds", install_ns / 1e9)
        .add("prefetch", st->cfg.moe_prefetch)
        .add("prefetch_issued", pf_issued)
        .add("prefetch_used", pf_used)
        .add("prefetch_bytes", pf_bytes)
        .add("prefetch_wasted_bytes", pf_wasted)
        .add("prefetch_read_seconds", pf_read_ns / 1e9)
        .add("prefetch_wait_seconds", pf_wait_ns / 1e9)
        .add("replay_records", st->schedule.size())
        .add("replay_position", st->schedule.position())
        .add_or_null("trace", st->cfg.moe_trace)
        .add("trace_seconds", st->trace.seconds())
        .add("verify", st->cfg.moe_verify != 0)
        .add("verify_seconds", verify_ns / 1e9)
        .add_array("layers", per_layer)
        .add_or_null("error", st->failed.message());
    return write_c_string(out.str(), buf, buf_size);
}

void llama_flashflex_moe_stats_reset(const llama_model * model) {
    bank_state * st = find_state(model);
    if (!st) {
        return;
    }
    for (auto & L : st->layers) {
        L.stats->reset();
    }
    st->trace.reset_seconds();
}
