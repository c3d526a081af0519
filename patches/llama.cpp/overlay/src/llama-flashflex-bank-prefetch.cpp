// flashflex MoE expert banks: replay and prefetch. A replayed trace (the oracle modes) is checked against the
// run record by record; oracle-all-hit installs its experts at load, oracle prefetch reads the next record's
// experts ahead of use. The real policy, router-lookahead, applies layer L+1's router to layer L's MoE input
// and reads the experts it picks. Prefetch reads run on the bank's I/O threads behind demand reads, into free
// or least recently used slots that hold no expert the prediction or the current call needs.

#include "ggml-cpu.h"
#include "ggml.h"
#include "llama-flashflex-bank.h"
#include "llama-impl.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

using namespace flashflex;

// The prefetch policy and the replayed schedule of a configuration, checked against the banks.
void bank_state::setup_replay() {
    if (cfg.moe_prefetch == "router-lookahead") {
        policy = prefetch_policy::router_lookahead;
    } else if (cfg.moe_prefetch == "oracle") {
        policy = prefetch_policy::oracle;
    }
    if (policy != prefetch_policy::none && resident) {
        throw std::runtime_error("flashflex: expert prefetch needs slot banks (every expert is resident here)");
    }
    if (policy == prefetch_policy::router_lookahead) {
        for (const auto & stream : cfg.tensors) {
            for (const auto & L : layers) {
                if (L.router && stream.name == ggml_get_name(L.router)) {
                    throw std::runtime_error(
                        format("flashflex: router-lookahead reads %s, which dense streaming "
                               "does not keep resident",
                               stream.name.c_str()));
                }
            }
        }
    }
    schedule.load(cfg.moe_schedule, layer_index, n_expert);
    if ((policy == prefetch_policy::oracle || cfg.moe_preload) && schedule.empty()) {
        throw std::runtime_error("flashflex: the oracle modes need a replayed trace (an empty schedule was given)");
    }
}

// oracle-all-hit: every expert the schedule uses, installed at load (expert i of a layer's list in slot i).
void bank_state::preload_schedule() {
    const std::vector<std::vector<int>> by_model_layer = schedule.experts_by_layer((int) layer_index.size(), n_expert);
    std::vector<std::vector<int>>       experts(layers.size());
    for (size_t li = 0; li < layers.size(); ++li) {
        experts[li] = by_model_layer[layers[li].layer];
    }
    std::vector<read_job> batch;
    for (size_t li = 0; li < layers.size(); ++li) {
        if ((int) experts[li].size() > n_slots) {
            throw std::runtime_error(
                format("flashflex: the replayed trace uses %zu experts at layer %d, more than "
                       "the %d slots: oracle-all-hit needs a bank of at least %zu",
                       experts[li].size(), layers[li].layer, n_slots, experts[li].size()));
        }
        for (size_t i = 0; i < experts[li].size(); ++i) {
            for (int j : layers[li].tensors) {
                place(tensors[j], experts[li][i], (int) i);
                batch.push_back({ j, experts[li][i], (int) i });
            }
        }
    }
    run_jobs(batch);
    if (failed.is_set()) {
        throw std::runtime_error("flashflex: " + failed.message());
    }
}

// Reads `experts` into layer li's bank ahead of use: free slots first, then the least recently used, never
// a slot holding a predicted expert, an expert of the current call (`keep`, when li is the current layer)
// or one still being written. Returns at once; the reads run behind demand reads.
void bank_state::issue_prefetch(int li, const std::vector<int> & experts, const std::vector<int> & keep_experts) {
    bank_layer &         X     = layers[li];
    bank_tensor &        first = tensors[X.tensors[0]];
    std::vector<bool>    keep(n_slots, false);
    std::vector<uint8_t> busy(n_slots, 0);
    {
        std::lock_guard<std::mutex> lk(pool.mutex());
        for (int j : X.tensors) {
            for (int s = 0; s < n_slots; ++s) {
                busy[s] |= tensors[j].inflight[s];
            }
        }
    }
    for (const auto * list : { &experts, &keep_experts }) {
        for (int e : *list) {
            if (first.expert_slot[e] >= 0 && first.expert_slot[e] < n_slots) {
                keep[first.expert_slot[e]] = true;
            }
        }
    }
    std::vector<read_job> batch;
    for (int e : experts) {
        if (first.expert_slot[e] >= 0) {
            continue;  // resident already
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
            break;  // no slot left that may be evicted
        }
        keep[victim] = true;
        // the slot keeps its old LRU stamp: a wrong guess is the first thing the next miss evicts
        for (int j : X.tensors) {
            place(tensors[j], e, victim);
            batch.push_back({ j, e, victim, true });
        }
        X.prefetched.push_back(e);
        X.stats->prefetch_issued.fetch_add(1);
        X.stats->prefetch_bytes.fetch_add(X.expert_bytes);
    }
    queue_prefetch(batch);
}

// router-lookahead: the experts layer X's router picks for the tokens of `b` (layer X-1's MoE input).
std::vector<int> bank_state::predict_router(const bank_layer & X, const ggml_tensor * b, int64_t K) {
    const ggml_tensor * w = X.router;
    if (!w || !w->data || !w->buffer || !ggml_backend_buffer_is_host(w->buffer) ||
        (w->type != GGML_TYPE_F32 && !ggml_get_type_traits(w->type)->to_float) || w->ne[1] != n_expert) {
        fail(
            format("router-lookahead needs layer %d's router (ffn_gate_inp) in CPU memory in a plain layout "
                   "(it is %s%s); use --moe-prefetch none for this model",
                   X.layer, w && w->buffer ? ggml_backend_buffer_name(w->buffer) : "not loaded",
                   w ? (std::string(", ") + ggml_type_name(w->type)).c_str() : ""));
        return {};
    }
    if (b->type != GGML_TYPE_F32 || b->ne[0] != w->ne[0]) {
        return {};  // not the hidden state this router reads (no prediction for this call)
    }
    const int64_t n_embd = w->ne[0];
    const int64_t T      = b->ne[2];
    router_row.resize(n_embd);
    // only the router's most confident picks: the top ranks are the likeliest to be right, and on a
    // bandwidth-bound disk every wrong guess costs a read (docs/benchmarks.md measures the trade-off)
    const int64_t ranks = cfg.moe_prefetch_ranks > 0 ? std::min<int64_t>(cfg.moe_prefetch_ranks, K) : K;
    std::vector<std::pair<float, int>> logits(n_expert);
    std::vector<bool>                  picked(n_expert, false);
    std::vector<int>                   out;
    for (int64_t t = 0; t < T; ++t) {
        const float * x = (const float *) ((const char *) b->data + t * b->nb[2]);
        for (int e = 0; e < n_expert; ++e) {
            const char *  row = (const char *) w->data + e * w->nb[1];
            const float * r   = (const float *) row;
            if (w->type != GGML_TYPE_F32) {
                ggml_get_type_traits(w->type)->to_float(row, router_row.data(), n_embd);
                r = router_row.data();
            }
            float acc = 0.0f;
            for (int64_t i = 0; i < n_embd; ++i) {
                acc += r[i] * x[i];
            }
            logits[e] = { acc, e };
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
void bank_state::prefetch_after(int li, const std::vector<int32_t> & ids, const ggml_tensor * b, int64_t K) {
    std::vector<int>      current(ids.begin(), ids.end());
    const schedule_step * next = schedule.next();
    if (policy == prefetch_policy::oracle && next) {
        const int         target = layer_index[next->layer];
        std::vector<int>  experts;
        std::vector<bool> seen_e(n_expert, false);
        for (int32_t e : next->ids) {
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
