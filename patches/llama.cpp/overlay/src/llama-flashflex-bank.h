// flashflex: the state of a model's MoE expert slot banks, shared by the bank itself (llama-flashflex-bank.cpp:
// setup, resolution, passes, graph, statistics) and its prefetch policies (llama-flashflex-bank-prefetch.cpp).
// Design notes are at the top of llama-flashflex-bank.cpp.

#pragma once

#include "ggml-backend.h"
#include "ggml.h"
#include "llama-flashflex-config.h"
#include "llama-flashflex-io.h"
#include "llama-flashflex-replay.h"
#include "llama-flashflex-trace.h"

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace flashflex {

struct bank_tensor {
    ggml_tensor *              t = nullptr;
    std::string                name;
    int                        layer  = -1;
    int                        file   = 0;
    uint64_t                   offset = 0;     // expert 0 in the sidecar file
    uint64_t                   stride = 0;     // between experts in the sidecar file
    size_t                     bytes  = 0;     // one expert
    bool                       plain  = true;  // plain CPU layout: bytes are written straight into the slot
    uint8_t *                  base   = nullptr;
    std::vector<ggml_tensor *> slot_tensor;    // repacked layout: one 2-D tensor per slot for ggml_backend_tensor_set
    std::vector<ggml_tensor *> pass_tensor;    // passes 1..: the bank again, a weight of its own (see bank_mul_mat_id)
    std::vector<int>           slot_expert;    // expert held by each slot, -1 for none
    std::vector<int>           expert_slot;    // inverse, -1 when not resident
    std::vector<uint64_t>      slot_used;      // LRU stamp
    std::vector<uint8_t>       inflight;       // a prefetch read is writing the slot (guarded by the pool's lock)
    std::vector<uint64_t>      checksums;      // per expert; empty: not verified
};

struct layer_counters {
    std::atomic<uint64_t> hits{ 0 };
    std::atomic<uint64_t> misses{ 0 };
    std::atomic<uint64_t> bytes_read{ 0 };
    std::atomic<int64_t>  read_ns{ 0 };
    std::atomic<int64_t>  install_ns{ 0 };
    std::atomic<uint64_t> calls{ 0 };
    std::atomic<uint64_t> prefetch_issued{ 0 };        // experts read ahead of use
    std::atomic<uint64_t> prefetch_used{ 0 };          // ... that the layer's next call needed
    std::atomic<uint64_t> prefetch_bytes{ 0 };
    std::atomic<uint64_t> prefetch_wasted_bytes{ 0 };  // ... of experts the next call did not need
    std::atomic<int64_t>  prefetch_read_ns{ 0 };
    std::atomic<int64_t>  prefetch_wait_ns{ 0 };       // compute waiting for a prefetch read still in flight
    std::atomic<int64_t>  verify_ns{ 0 };              // CPU time of checksumming experts as they are read

    void reset() {
        hits                  = 0;
        misses                = 0;
        bytes_read            = 0;
        read_ns               = 0;
        install_ns            = 0;
        calls                 = 0;
        prefetch_issued       = 0;
        prefetch_used         = 0;
        prefetch_bytes        = 0;
        prefetch_wasted_bytes = 0;
        prefetch_read_ns      = 0;
        prefetch_wait_ns      = 0;
        verify_ns             = 0;
    }
};

struct bank_layer {
    int                             layer = -1;
    std::vector<int>                tensors;  // indices into bank_state::tensors
    // the grouping of the ubatch being computed: made by its first resolution, shared by all tensors
    uint64_t                        epoch = UINT64_MAX;
    std::vector<int32_t>            ids;         // the router's ids it was made for (token-major)
    std::vector<std::vector<int>>   groups;      // experts of each pass
    std::vector<int>                group_of;    // expert -> group, -1 unused
    std::vector<bool>               counted;     // per group: hits and misses already counted
    std::vector<int32_t>            trace_slot;  // per (token, k) pair of the call: its slot and whether it hit
    std::vector<uint8_t>            trace_hit;
    const ggml_tensor *             router       = nullptr;  // ffn_gate_inp, for router-lookahead
    size_t                          expert_bytes = 0;        // one expert over all the layer's banked tensors
    std::vector<int>                prefetched;              // experts read ahead since the layer's last call
    std::unique_ptr<layer_counters> stats = std::make_unique<layer_counters>();
};

// Where a graph's resolve op finds its bank: userdata of the custom ops, at stable addresses.
struct resolve_site {
    struct bank_state * st;
    int                 tensor;
    int                 pass;
};

// One expert of one banked tensor, from the sidecar into a slot.
struct read_job {
    int  tensor;
    int  expert;
    int  slot;
    bool prefetch = false;
};

enum class prefetch_policy { none, router_lookahead, oracle };

struct bank_state {
    config                   cfg;
    bool                     resident = false;  // resident-bank: every expert in its own slot, read at load
    int                      n_slots  = 0;      // N (not counting the junk slot)
    bool                     has_junk = false;  // a zero slot after the N: needed when a ubatch may need several passes
    int                      n_expert = 0;
    int                      n_expert_used = 0;
    std::vector<bank_tensor> tensors;
    std::vector<bank_layer>  layers;
    std::vector<int>         layer_index;  // model layer -> index in layers, -1
    std::unordered_map<const ggml_tensor *, int> tensor_index;

    std::vector<open_file>             files;
    bool                               direct = false;
    std::vector<void *>                host_mem;
    std::vector<ggml_backend_buffer_t> bufs;
    ggml_context *                     slot_ctx      = nullptr;
    size_t                             bank_bytes    = 0;
    size_t                             staging_bytes = 0;

    // reads: demand reads ahead of prefetch reads in one pool; pending_demand and to_verify are guarded by
    // pool.mutex()
    io_pool               pool;
    int                   pending_demand = 0;
    std::vector<read_job> to_verify;  // demand reads done, checksummed by the compute thread waiting for the rest
    failure               failed;

    // graph
    std::deque<resolve_site> sites;       // stable addresses for graph userdata
    std::vector<bool>        seen;        // per tensor: used through bank_mul_mat_id in the graph being built
    bool                     seen_epoch = false;
    std::atomic<uint64_t>    epoch{ 0 };  // ubatches started
    uint64_t                 clock = 0;   // LRU time

    // traces, replay and prefetch
    prefetch_policy    policy = prefetch_policy::none;
    replay_schedule    schedule;
    trace_writer       trace;
    std::vector<float> router_row;  // dequantized router row (scratch)

    ~bank_state() { stop(); }

    void stop();
    void fail(const std::string & msg);

    // where pairs that are not this pass's go (slot 0 when there is no junk slot: then there is one pass)
    int junk() const { return has_junk ? n_slots : 0; }

    // I/O (bank.cpp)
    void                 read_expert(const read_job & j, void * staging);
    bool                 waiter_verifies(const read_job & j) const;
    void                 verify_expert(const bank_tensor & bt, int expert, const void * data);
    void                 run_jobs(const std::vector<read_job> & batch);        // demand reads; returns when done
    void                 queue_prefetch(const std::vector<read_job> & batch);  // returns at once
    std::vector<uint8_t> busy_slots(const bank_tensor & bt);
    void                 wait_slots(const bank_tensor & bt, const std::vector<int> & slots, layer_counters & c);

    // resolution (bank.cpp)
    static void place(bank_tensor & bt, int e, int s);
    void        group_ubatch(bank_layer & L, const bank_tensor & bt, const std::vector<int32_t> & ids);
    bool        begin_layer_call(bank_layer & L, const std::vector<int32_t> & ids);
    void        resolve(const resolve_site & site, const ggml_tensor * ids_t, const ggml_tensor * b, ggml_tensor * dst);
    bool        routed_ids(const ggml_tensor * ids_t, std::vector<int32_t> & ids);
    size_t      install_group(int                      tensor,
                              bank_layer &             L,
                              const std::vector<int> & group,
                              std::vector<bool> &      missed,
                              std::vector<read_job> &  batch);
    void        share_group(int                      tensor,
                            bank_layer &             L,
                            const std::vector<int> & group,
                            uint64_t                 stamp,
                            std::vector<read_job> &  batch);
    void        count_pass(const resolve_site &         site,
                           int                          li,
                           const std::vector<int32_t> & ids,
                           const std::vector<bool> &    missed,
                           size_t                       n_group,
                           size_t                       n_missed,
                           const ggml_tensor *          b,
                           int64_t                      K,
                           int64_t                      T);

    // replay and prefetch (bank-prefetch.cpp)
    void             setup_replay();
    void             preload_schedule();
    void             issue_prefetch(int li, const std::vector<int> & experts, const std::vector<int> & keep_experts);
    std::vector<int> predict_router(const bank_layer & X, const ggml_tensor * b, int64_t K);
    void             prefetch_after(int li, const std::vector<int32_t> & ids, const ggml_tensor * b, int64_t K);
};

}  // namespace flashflex
