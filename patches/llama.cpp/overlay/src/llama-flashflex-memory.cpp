// flashflex: what llama.cpp allocates for a context, by buffer type (see include/llama-flashflex.h). The planner
// reserves these bytes instead of estimating them: on a model loaded with no_alloc, llama.cpp sizes every buffer
// (weights, KV cache, compute) without allocating any, so the measurement costs a metadata read and a graph build.

#include "ggml-backend.h"
#include "llama-ext.h"
#include "llama-flashflex-json.h"
#include "llama-flashflex-runtime.h"
#include "llama-flashflex.h"

#include <string>
#include <vector>

int32_t llama_flashflex_context_memory(const llama_context * ctx, char * buf, size_t buf_size) {
    if (ctx == nullptr) {
        return -1;
    }
    size_t                   model = 0, context = 0, compute = 0;
    std::vector<std::string> types;
    for (const auto & [buft, mb] : llama_get_memory_breakdown(ctx)) {
        model += mb.model;
        context += mb.context;
        compute += mb.compute;
        types.push_back(flashflex::json_object()
                            .add("name", buft ? ggml_backend_buft_name(buft) : "none")
                            .add("model", mb.model)
                            .add("context", mb.context)
                            .add("compute", mb.compute)
                            .str());
    }
    const std::string out = flashflex::json_object()
                                .add("model", model)
                                .add("context", context)
                                .add("compute", compute)
                                .add_array("buffer_types", types)
                                .str();
    return flashflex::write_c_string(out, buf, buf_size);
}
