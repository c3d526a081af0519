// flashflex: the entry points each execution path gives the call sites (llama-flashflex-hooks.cpp). Every
// function is a no-op (or returns its input) for a model the path does not run.

#pragma once

#include "ggml-backend.h"
#include "llama-flashflex-config.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>

struct ggml_cgraph;
struct ggml_context;
struct ggml_tensor;
struct llama_context;
struct llama_model;
struct llama_model_loader;

namespace flashflex {

// Pins a graph node flashflex added to the CPU backend of the graph being built (llama_flashflex_graph_scope), so
// the scheduler never hands it to another device (an RPC worker cannot call back into this process). Returns t.
ggml_tensor * pin_to_cpu(ggml_tensor * t);

// A custom op node flashflex added (a streamed weight's wait, a layer boundary), for the CPU backend: pinned there
// (pin_to_cpu) when a device other than a CPU would claim it (none does: an RPC worker's devices are told to refuse
// custom ops at registration, llama-flashflex-rpc.cpp); otherwise left
// unassigned, so that it lands on the CPU (the only backend with custom ops) without changing where the scheduler
// puts the nodes around it: a pinned CPU node stops the scheduler's expansion of GPU assignments (ggml_backend_sched
// pass 2), and would move e.g. a host layer's attention that stock llama.cpp offloads to a local GPU (a batch of 32
// or more) to the CPU, changing its logits. Returns t.
ggml_tensor * place_on_cpu(ggml_tensor * t);

// Whether an interrupt was requested (llama_flashflex_interrupt): a runtime waiting on reads stops waiting.
bool interrupt_requested();

// Copies s into buf (NUL-terminated, truncated to size) and returns its full length: the C API's JSON outputs.
int32_t write_c_string(const std::string & s, char * buf, size_t size);

// The loader's tensors by name, each with the buffer type (context) the loader put it in (hooks.cpp): what dense
// streaming and the slot banks take over at load.
using loader_tensor_map = std::unordered_map<std::string, std::pair<ggml_tensor *, ggml_backend_buffer_type_t>>;
loader_tensor_map loader_tensors(llama_model_loader & ml);

// A context's output buffer as llama.cpp last reserved it (llama_flashflex_on_output_reserved): its logits rows
// start it and took at most logits_bytes; `shared`: something else (embeddings, backend sampling) lives in it too.
struct output_rows {
    ggml_backend_buffer_t buf          = nullptr;
    size_t                logits_bytes = 0;
    bool                  shared       = false;
};

// False when the context has reserved none (or its model runs no flashflex path).
bool output_rows_of(const llama_context * ctx, output_rows & out);

// Dense streaming (llama-flashflex-stream.cpp).
void          stream_setup(const llama_model & model, llama_model_loader & ml, const config & cfg);
bool          stream_active(const llama_model * model);
void          stream_free(const llama_model * model);
void          stream_graph_begin(const llama_model * model);
void          stream_graph_end(ggml_cgraph * gf);
ggml_tensor * stream_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done);
ggml_tensor * stream_weight_use(ggml_context * ctx, ggml_tensor * w, ggml_tensor * cur);
uint32_t      stream_graph_nodes(const llama_model * model);
bool          stream_failed(const llama_model * model, std::string * error);
void          stream_context_free(const llama_model * model);  // forget the context's compute buffer

// MoE slot banks (llama-flashflex-bank.cpp).
void          bank_setup(const llama_model & model, llama_model_loader & ml, const config & cfg);
bool          bank_active(const llama_model * model);
void          bank_free(const llama_model * model);
void          bank_graph_begin(const llama_model * model);
void          bank_graph_end();
ggml_tensor * bank_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done);
ggml_tensor * bank_mul_mat_id(ggml_context * ctx, ggml_tensor * as, ggml_tensor * b, ggml_tensor * ids);
bool          bank_failed(const llama_model * model, std::string * error);
uint32_t      bank_graph_nodes(const llama_model * model, uint32_t n_tokens);

}  // namespace flashflex
