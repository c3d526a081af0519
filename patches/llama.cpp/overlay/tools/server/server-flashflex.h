// flashflex: llama-server's GET /flashflex/stats — the runtime counters (dense streaming, expert banks) of the model
// this server loaded, read while it decodes (they are atomics). flashflex's front door serves them to users beside
// its own counters; the route itself is behind llama-server's API key like every non-public one.

#pragma once

#include "server-http.h"

struct llama_context;

// {"stream": llama_flashflex_model_stats or null, "moe": llama_flashflex_moe_stats or null, "draft":
// llama_flashflex_draft_stats or null, "memory": llama_flashflex_placement (the weights and KV cache per buffer
// type: on which device they are), "error": the runtime's error or null}; 404 when this process has no model
// (llama-server's router mode).
server_http_res_ptr flashflex_server_stats(const llama_context * ctx);
