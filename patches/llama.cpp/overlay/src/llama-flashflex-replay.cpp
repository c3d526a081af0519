// flashflex: a replayed routing trace (see llama-flashflex-replay.h).

#include "llama-flashflex-replay.h"

#include "llama-impl.h"

#include <stdexcept>

namespace flashflex {

void replay_schedule::load(const std::vector<int32_t> & v, const std::vector<int> & layer_index, int n_expert) {
    for (size_t i = 0; i < v.size();) {
        const int     il = v[i];
        const int32_t n  = v[i + 1];
        if (il >= (int) layer_index.size() || layer_index[il] < 0) {
            throw std::runtime_error(
                format("flashflex: the replayed trace routes layer %d, which has no banked "
                       "experts in this model (a trace of another model?)",
                       il));
        }
        schedule_step step{ il, std::vector<int32_t>(v.begin() + i + 2, v.begin() + i + 2 + n) };
        for (int32_t e : step.ids) {
            if (e < 0 || e >= n_expert) {
                throw std::runtime_error(
                    format("flashflex: the replayed trace names expert %d; this model has %d "
                           "(a trace of another model?)",
                           e, n_expert));
            }
        }
        steps.push_back(std::move(step));
        i += 2 + (size_t) n;
    }
}

std::string replay_schedule::advance(int layer, const std::vector<int32_t> & ids) {
    if (steps.empty()) {
        return "";
    }
    if (cursor >= steps.size()) {
        return format("the run went on past the end of the replayed trace (%zu records)", steps.size());
    }
    const schedule_step & step = steps[cursor];
    if (step.layer != layer || step.ids != ids) {
        return format("the run's routing differs from the replayed trace at record %zu (layer %d)", cursor, layer);
    }
    ++cursor;
    return "";
}

std::vector<std::vector<int>> replay_schedule::experts_by_layer(int n_layer, int n_expert) const {
    std::vector<std::vector<int>>  experts(n_layer);
    std::vector<std::vector<bool>> seen(n_layer, std::vector<bool>(n_expert, false));
    for (const auto & step : steps) {
        for (int32_t e : step.ids) {
            if (!seen[step.layer][e]) {
                seen[step.layer][e] = true;
                experts[step.layer].push_back(e);
            }
        }
    }
    return experts;
}

}  // namespace flashflex
