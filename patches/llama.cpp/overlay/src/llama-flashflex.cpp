// flashflex build information (see include/llama-flashflex.h).

#include "llama-flashflex.h"

#include "ggml-backend.h"

#include <string>

#ifndef FLASHFLEX_SERIES_HASH
#define FLASHFLEX_SERIES_HASH "unknown"
#endif

// Features this build carries (the Python side checks them before using an API).
static const char * const k_flashflex_features[] = {
    "info",
    "dense-stream",
    "slot-bank",
    "moe-trace",
    "interrupt",
    "expert-checksum",
};

int32_t llama_flashflex_api_version(void) {
    return LLAMA_FLASHFLEX_API_VERSION;
}

static void append_json_string(std::string & out, const char * s) {
    out += '"';
    for (; *s; ++s) {
        const char c = *s;
        if (c == '"' || c == '\\') {
            out += '\\';
            out += c;
        } else if ((unsigned char) c < 0x20) {
            out += ' ';
        } else {
            out += c;
        }
    }
    out += '"';
}

static std::string build_info_json() {
    std::string out = "{\"api_version\": " + std::to_string(LLAMA_FLASHFLEX_API_VERSION);
    out += ", \"series_hash\": ";
    append_json_string(out, FLASHFLEX_SERIES_HASH);
    out += ", \"features\": [";
    for (size_t i = 0; i < sizeof(k_flashflex_features) / sizeof(k_flashflex_features[0]); ++i) {
        if (i) out += ", ";
        append_json_string(out, k_flashflex_features[i]);
    }
    out += "], \"backends\": [";
    // Backends registered in this process (dynamic backends appear once loaded).
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        if (i) out += ", ";
        append_json_string(out, ggml_backend_reg_name(ggml_backend_reg_get(i)));
    }
    out += "]}";
    return out;
}

const char * llama_flashflex_info(void) {
    // Built on each call so backends loaded after the first call are listed; kept alive per thread.
    static thread_local std::string info;
    info = build_info_json();
    return info.c_str();
}
