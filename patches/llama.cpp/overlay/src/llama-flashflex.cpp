// flashflex build information (see include/llama-flashflex.h).

#include "llama-flashflex.h"

#include "ggml-backend.h"
#include "llama-flashflex-json.h"

#ifdef GGML_USE_RPC
#    include "ggml-rpc.h"
#endif

#include <string>
#include <vector>

#ifndef FLASHFLEX_SERIES_HASH
#    define FLASHFLEX_SERIES_HASH "unknown"
#endif

// Features this build carries (the Python side checks them before using an API).
static const char * const k_flashflex_features[] = {
    "info",         "dense-stream",  "slot-bank",     "moe-trace", "interrupt", "expert-checksum",
    "one-context",  "byte-ring",     "devices",       "spec-file", "tools",     "lent-rows",
    "draft-length", "prompt-lookup", "draft-shadows",
#ifdef GGML_USE_RPC
    "rpc",
#endif
};

int32_t llama_flashflex_api_version(void) {
    return LLAMA_FLASHFLEX_API_VERSION;
}

static std::string build_info_json() {
    std::vector<std::string> features, backends;
    for (const char * f : k_flashflex_features) {
        features.push_back(flashflex::json_string(f));
    }
    // Backends registered in this process (dynamic backends appear once loaded).
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        backends.push_back(flashflex::json_string(ggml_backend_reg_name(ggml_backend_reg_get(i))));
    }
#ifdef GGML_USE_RPC
    const int32_t rpc_protocol[] = { RPC_PROTO_MAJOR_VERSION, RPC_PROTO_MINOR_VERSION, RPC_PROTO_PATCH_VERSION };
#endif
    flashflex::json_object out;
    out.add("api_version", LLAMA_FLASHFLEX_API_VERSION)
        .add("series_hash", FLASHFLEX_SERIES_HASH)
        .add_array("features", features)
        .add_array("backends", backends);
#ifdef GGML_USE_RPC
    out.add_ints("rpc_protocol", rpc_protocol, 3);
#else
    out.add_raw("rpc_protocol", "null");
#endif
    return out.str();
}

const char * llama_flashflex_info(void) {
    // Built on each call so backends loaded after the first call are listed; kept alive per thread.
    static thread_local std::string info;
    info = build_info_json();
    return info.c_str();
}
