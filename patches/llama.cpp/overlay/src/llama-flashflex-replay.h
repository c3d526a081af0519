// flashflex: a replayed routing trace (the oracle modes). The run checks each routed layer call against the
// schedule's next record, so a replay of another prompt, model or setting fails with a clear error instead of
// measuring something else; oracle-all-hit installs the schedule's experts at load, oracle prefetch reads the
// next record's experts ahead of use.

#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace flashflex {

// One record of a replayed trace: a layer call and its expert ids (token-major).
struct schedule_step {
    int                  layer;
    std::vector<int32_t> ids;
};

class replay_schedule {
  public:
    // Parses config.moe_schedule (layer, n, n ids, ...; well-formed, checked by the C API) against the banked
    // layers (layer_index: model layer -> bank layer, -1) and the model's experts. Throws std::runtime_error.
    void load(const std::vector<int32_t> & flat, const std::vector<int> & layer_index, int n_expert);

    bool empty() const { return steps.empty(); }

    size_t size() const { return steps.size(); }

    size_t position() const { return cursor; }

    // A layer call of the run: "" when it is the next record (which it consumes), else why the run left the
    // schedule. Always "" for an empty schedule.
    std::string advance(int layer, const std::vector<int32_t> & ids);

    // The record the next layer call must match; nullptr at the end.
    const schedule_step * next() const { return cursor < steps.size() ? &steps[cursor] : nullptr; }

    // Each model layer's distinct experts over the whole schedule, in order of first use.
    std::vector<std::vector<int>> experts_by_layer(int n_layer, int n_expert) const;

  private:
    std::vector<schedule_step> steps;
    size_t                     cursor = 0;
};

}  // namespace flashflex
