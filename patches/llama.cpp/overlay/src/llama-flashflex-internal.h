// flashflex: the call sites upstream files use. Everything here is a no-op for a model loaded without a
// flashflex configuration, so the stock path stays stock.

#pragma once

#include "ggml-backend.h"

#include <cstdint>

class llm_graph_result;
struct ggml_context;
struct ggml_tensor;
struct llama_context;
struct llama_model;
struct llama_model_loader;

// llama_model_loader::create_tensor, once a weight's buffer type is chosen: the CPU's plain type for a weight the
// spec keeps in the file's layout (config::file_layout) where the loader chose one of the CPU backend's repacked
// types; buft otherwise. Streamed weights are then read straight into their homes, and resident ones stay repacked
// as stock repacks them (llama.cpp's own override to the CPU type picks the repacked type again).
ggml_backend_buffer_type_t llama_flashflex_weight_buft(const llama_model_loader & ml,
                                                       const char *               name,
                                                       ggml_backend_buffer_type_t buft);

// llama_model_base::load_tensors, after all tensors are created and before buffers are allocated:
// places the configured streamed tensors in the model's ring buffers and removes them from the loader,
// so neither buffer allocation nor load_all_data touch them. Throws std::runtime_error on a bad plan.
void llama_flashflex_on_tensors_created(const llama_model & model, llama_model_loader & ml);

// llama_model_base::load_tensors: true when every tensor of ctx was placed by flashflex (the context then
// needs no weight buffer of its own).
bool llama_flashflex_ctx_is_placed(const llama_model & model, ggml_context * ctx);

// ~llama_model: stops the model's prefetch threads and frees its buffers.
void llama_flashflex_on_model_free(const llama_model * model);

// llama_context::llama_context, last: a model that streams weights or banks experts serves one context at a time
// (its runtime state belongs to the model and decoding changes it); throws std::runtime_error for a second one.
void llama_flashflex_on_context_created(const llama_model & model, const llama_context * ctx);
// ~llama_context: the model may serve another context.
void llama_flashflex_on_context_free(const llama_model & model, const llama_context * ctx);

// llama_context::output_reserve, last: the output buffer, the bytes its logits rows take now (they start it), and
// whether anything else (embeddings, backend sampling) is in it. Lets llama_flashflex_lend_rows give the rows of a
// verification batch back while none runs. Records nothing for a context whose model runs no flashflex path.
void llama_flashflex_on_output_reserved(const llama_context * ctx,
                                        ggml_backend_buffer_t buf,
                                        size_t                logits_bytes,
                                        bool                  shared);

// llama_model::build_graph: marks the model whose graph is being built on this thread, and the scheduler that will
// run it: the graph nodes flashflex adds (layer boundaries, weight uses, expert-bank ops) are pinned to backend_cpu,
// because they call back into this process (a node the scheduler gave to an RPC worker or a GPU could not run
// there). When the scope ends, res holds the finished graph: dense streaming reads the order its weights are used in.
struct llama_flashflex_graph_scope {
    llama_flashflex_graph_scope(const llama_model *  model,
                                ggml_backend_sched_t sched,
                                ggml_backend_t       backend_cpu,
                                llm_graph_result *   res);
    ~llama_flashflex_graph_scope();
    llama_flashflex_graph_scope(const llama_flashflex_graph_scope &)             = delete;
    llama_flashflex_graph_scope & operator=(const llama_flashflex_graph_scope &) = delete;

  private:
    llm_graph_result * res;
};

// llm_graph_context::build_inp_embd (il_done = -1) and build_cvec (il_done = the layer just built):
// returns cur, wrapped in an in-place op that releases layer il_done's streamed weights and waits until
// layer il_done + 1's have arrived. Returns cur unchanged when the model streams nothing.
ggml_tensor * llama_flashflex_layer_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done);

// llm_graph_context::build_lora_mm: returns cur, wrapped — when w streams — in an in-place op that waits until w's
// bytes are in place and releases the weight the previous such op waited for (its matmul is done: compute is
// sequential, and each wait runs just before its own matmul). Returns cur unchanged for any other weight.
ggml_tensor * llama_flashflex_weight_use(ggml_context * ctx, ggml_tensor * w, ggml_tensor * cur);

// llm_graph_context::build_lora_mm_id: ggml_mul_mat_id, or — for a tensor held in a MoE slot bank — the same
// matmul on slot ids that a custom op resolves (and installs) from the router's expert ids.
ggml_tensor * llama_flashflex_mul_mat_id(ggml_context * ctx, ggml_tensor * as, ggml_tensor * b, ggml_tensor * ids);

// llama_context::graph_max_nodes: the graph nodes dense streaming and MoE slot banks add for a ubatch of n_tokens
// (0 without either).
uint32_t llama_flashflex_graph_nodes(const llama_model & model, uint32_t n_tokens);
