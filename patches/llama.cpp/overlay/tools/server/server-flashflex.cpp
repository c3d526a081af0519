// flashflex: llama-server's GET /flashflex/stats (see server-flashflex.h).

#include "server-flashflex.h"

#include "json.h"
#include "llama-flashflex.h"
#include "llama.h"

#include <string>

namespace {

// One of the C API's stats functions of a model or context: its JSON text, or null when it has no such configuration.
template <typename T> std::string stats_of(int32_t (*fn)(const T *, char *, size_t), const T * of) {
    const int32_t n = fn(of, nullptr, 0);
    if (n < 0) {
        return "null";
    }
    std::string buf((size_t) n + 1, '\0');
    fn(of, buf.data(), buf.size());
    buf.resize((size_t) n);
    return buf;
}

}  // namespace

server_http_res_ptr flashflex_server_stats(const llama_context * ctx) {
    auto res = std::make_unique<server_http_res>();
    if (ctx == nullptr) {
        res->status = 404;
        res->data   = R"({"error":{"code":404,"message":"this process has no model","type":"not_found_error"}})";
        return res;
    }
    const llama_model * model = llama_get_model(ctx);
    const char *        error = llama_flashflex_model_error(model);
    res->data                 = "{\"stream\":" + stats_of(llama_flashflex_model_stats, model) +
                ",\"moe\":" + stats_of(llama_flashflex_moe_stats, model) +
                ",\"draft\":" + stats_of(llama_flashflex_draft_stats, ctx) +
                ",\"memory\":" + stats_of(llama_flashflex_placement, ctx) +
                ",\"error\":" + (error ? common_json::make(std::string(error)).dump() : std::string("null")) + "}";
    return res;
}
