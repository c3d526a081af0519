// flashflex: the C API that flashflex adds to llama.cpp.
//
// Everything flashflex exports lives in this header, as new functions. Upstream structs are never
// extended (that would break llama-cpp-python's ctypes layouts); per-model settings reach a model as a spec
// file named by a GGUF key override.

#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Version of this C API. Bumped whenever a function here changes signature or meaning.
#define LLAMA_FLASHFLEX_API_VERSION 13

LLAMA_API int32_t llama_flashflex_api_version(void);

// A JSON object describing this build, valid for the life of the process:
//   {"api_version": 9, "series_hash": "<sha256 of patches/llama.cpp>", "features": [...],
//    "backends": ["CPU", ...], "rpc_protocol": [7, 0, 0]}
// ("rpc_protocol": the version of ggml's RPC protocol this build speaks; null without the RPC backend)
// "series_hash" is the hash flashflex computed over its patch series when it configured the build
// ("unknown" when built by hand without -DFLASHFLEX_SERIES_HASH=...).
LLAMA_API const char * llama_flashflex_info(void);

//
// Runtime specs (API 7). A plan reaches the runtime as one JSON file, the spec, named at model load by the GGUF key
// override LLAMA_FLASHFLEX_SPEC_KEY (a string: the file's path, under 128 bytes), so every llama.cpp program that
// takes --override-kv runs under a flashflex plan; flashflex writes specs (`flashflex exec`, its Python API) and
// documents their fields (docs/spec-format.md). A model loaded without the override is the stock path.
//
// What a spec configures:
// - Dense weight streaming (FlexInfer-style): the tensors in "stream" are never loaded into the model's buffers:
//   they live in a ring of bytes ("ring_bytes"; without it, "window" layers' worth), each at a fixed home laid out
//   in the order compute uses them, and are read from the GGUF by "prefetch_threads" background threads ahead of
//   compute (0 = synchronous reads) as soon as the bytes of their home are released; "direct_io" 0 = buffered,
//   1 = O_DIRECT when the file system allows it, 2 = O_DIRECT or fail.
// - MoE expert slot banks (Flash-MoE-style): each tensor in "banks" ([ne0, ne1, n_expert]) has its experts in a
//   sidecar file: expert e is bytes_per_expert bytes at offset + e * expert_stride (multiples of 4096), read into
//   "moe_slots" slots per layer (0 = every expert resident), misses by "moe_io_threads" readers; "checksums" with
//   "moe_verify" = 1 check every read; "moe_trace" appends one JSON line per routed layer call to a file;
//   "moe_prefetch" none | router-lookahead | oracle (replaying "schedule": records of layer, n, n expert ids, with
//   "moe_preload" = 1 installing them all at load).
// The load refuses, naming the file: another spec version or patch series, a digest that does not match (edited
// by hand), a model file of another size than the one planned for, a tensor at another offset or of another shape,
// a model loaded with mmap.
//

#define LLAMA_FLASHFLEX_SPEC_KEY     "flashflex.spec"
#define LLAMA_FLASHFLEX_SPEC_VERSION 1

// Read and check the spec file at path without loading a model: 0, or -1 with the reason in
// llama_flashflex_last_error() (the same checks the load makes, except those that need the model).
LLAMA_API int32_t llama_flashflex_spec_check(const char * path);

// The last error flashflex raised on this thread (empty string when none).
LLAMA_API const char * llama_flashflex_last_error(void);

// Statistics of a model loaded with a configuration, as a JSON object written into buf (NUL-terminated,
// truncated to buf_size). Returns the full length, or -1 when the model has no flashflex configuration.
LLAMA_API int32_t      llama_flashflex_model_stats(const struct llama_model * model, char * buf, size_t buf_size);
// Zero the model's counters (e.g. between the prompt and the decode phase).
LLAMA_API void         llama_flashflex_model_stats_reset(const struct llama_model * model);
// API 8: the memory a plan reserves for drafting's verification rows (spec option "lent_bytes"), lent to streamed
// weights while no verification uses it. Call it before each decode, on the thread that decodes, with the rows of
// logits the batch asks for beyond the first (n_rows: 0 for a single-token step or a prompt). The weights keep what
// the batch leaves of the memory: less, when it asks for more rows than the last (lent tensors go back to reading
// from the ring and their pages to the system); all of it again at a decode that asks for one row (the context's
// logits rows beyond the first and its CPU compute buffer give their pages back first: their contents are
// consumed or scratch by then). Lent tensors are read once into the lent memory and then kept. Returns the bytes
// the weights hold (0: nothing to lend, or nothing decoded yet), or -1 (llama_flashflex_last_error) where the rows
// cannot be given back (a GPU's pinned buffers, embeddings kept beside the logits).
LLAMA_API int64_t      llama_flashflex_lend_rows(struct llama_context * ctx, int32_t n_rows);
// Expert-bank statistics of a model loaded with banked tensors, as JSON (same conventions as
// llama_flashflex_model_stats): hits, misses, hit rate, bytes read, read and install seconds, total and per
// layer. Returns -1 when the model has no banks.
LLAMA_API int32_t      llama_flashflex_moe_stats(const struct llama_model * model, char * buf, size_t buf_size);
LLAMA_API void         llama_flashflex_moe_stats_reset(const struct llama_model * model);
// The model's runtime error (I/O failure, file changed), or NULL when none.
LLAMA_API const char * llama_flashflex_model_error(const struct llama_model * model);
// An abort callback for llama_set_abort_callback(ctx, llama_flashflex_abort_callback, model): aborts the
// graph when the model's streaming or expert reads failed, so llama_decode returns an error instead of using bad data,
// or when an interrupt was requested (any model, also one loaded without a flashflex configuration).
LLAMA_API bool         llama_flashflex_abort_callback(void * model);
// API 4: request (on = true) or clear an interrupt: every llama_decode whose context uses the callback above
// stops at its next graph node. Process-wide, like the SIGINT it is meant for; clear it before the next run.
LLAMA_API void         llama_flashflex_interrupt(bool on);

// API 9 (feature "draft-length"; API 10: per sequence): the draft lengths of a program that drafts for several
// sequences decoded together (llama-server's slots), for a context whose model runs a flashflex plan. Once it has
// drafted for the pass it is about to decode, the program gives the n_drafting sequences it asked to draft (seq_ids)
// and the drafts they made (lengths: 0 for none, at most n_max, the program's own length), of its n_sequences
// sequences generating; each length comes back as how many tokens of its draft the sequence keeps. It reports what
// each verification kept and, after the pass (decode and sampling), the rows the pass decoded. From the seconds of
// this context's passes, measured per number of sequences and rows, and each sequence's acceptance: where some
// sequences have no draft, the pass may take at most 3% longer than a plain one; within that (and where all draft)
// the lengths weigh each draft's expected tokens against what its rows cost every sequence in the pass
// (llama-flashflex-draft.cpp). Spec option "draft_adaptive" 0: every draft kept whole. Where the plan lends
// drafting's rows to streamed weights (API 8), llama_flashflex_draft_lengths also takes back what the pass's drafted
// tokens need (llama_flashflex_lend_rows with their sum), or lends them again at a plain pass of at most one
// sequence: call it before every pass, drafts or none.
// A context whose model runs no plan keeps its drafts whole, and the other calls do nothing (the stock path).
LLAMA_API void    llama_flashflex_draft_lengths(struct llama_context * ctx,
                                                int32_t                n_sequences,
                                                int32_t                n_max,
                                                const llama_seq_id *   seq_ids,
                                                int32_t *              lengths,
                                                int32_t                n_drafting);
LLAMA_API void    llama_flashflex_draft_verified(struct llama_context * ctx,
                                                 llama_seq_id           seq_id,
                                                 int32_t                n_drafted,
                                                 int32_t                n_kept);
// API 13 (feature "draft-shadows"): llama_flashflex_draft_lengths given the drafts' tokens as well (drafts[i]: the
// lengths[i] tokens of sequence seq_ids[i]'s draft), and each token a sequence takes in a pass where it sent no
// draft (llama_flashflex_draft_taken): a draft cut to nothing is then judged unsent by the tokens the sequence takes
// next (its shadow), so each sequence's acceptance follows its text at every token and no probe goes out.
LLAMA_API void    llama_flashflex_draft_lengths_with_tokens(struct llama_context *      ctx,
                                                            int32_t                     n_sequences,
                                                            int32_t                     n_max,
                                                            const llama_seq_id *        seq_ids,
                                                            const llama_token * const * drafts,
                                                            int32_t *                   lengths,
                                                            int32_t                     n_drafting);
LLAMA_API void    llama_flashflex_draft_taken(struct llama_context * ctx, llama_seq_id seq_id, llama_token token);
// generation_only: every row of the pass is a sequence's next token or a draft (a pass with prompt tokens in it
// prices nothing)
LLAMA_API void    llama_flashflex_draft_pass(struct llama_context * ctx, int32_t n_rows, bool generation_only);
// API 11: the sequence ends its request (a server's slot released): what its drafts were kept says nothing of the
// next request's text, so its acceptance starts again from the prior.
LLAMA_API void    llama_flashflex_draft_end(struct llama_context * ctx, llama_seq_id seq_id);
// What the controller measured, as JSON (same conventions as llama_flashflex_model_stats): "adaptive",
// "acceptance_estimate" (the sequences' mean of how often a draft's first token is kept), "acceptance_continued"
// (of a token after a kept one), "acceptance_by_sequence": [{"sequence", "estimate", "continued"}], "drafted",
// "kept", "shadowed" (the program gives its drafts' tokens: API 13), "shadow_judged" and "shadow_kept" (tokens of
// drafts cut to nothing, judged by the tokens taken), "by_sequences": [{"sequences", "probes", "next_length_all_drafting",
// "passes_by_rows": [{"rows", "passes", "median_seconds"}]}]; -1 for a context whose model runs no plan.
LLAMA_API int32_t llama_flashflex_draft_stats(const struct llama_context * ctx, char * buf, size_t buf_size);

// API 10 (feature "prompt-lookup"): flashflex's prompt lookup, the drafter of `flashflex run` and, under a plan
// that drafts by prompt lookup (spec option "prompt_lookup" 1), of llama.cpp's programs (their ngram-simple
// drafter calls it). Up to n_max tokens that followed the most recent earlier occurrence of the context's last
// ngram tokens; where there is none, of the ngram tokens before the last one followed by any token (the last token
// taken as changed: the copy goes on after it); then of the last n tokens for n from ngram - 1 down to 1. Writes
// the draft into draft (room for n_max tokens) and returns its length (0: no match). Pure: no model, no state.
LLAMA_API int32_t llama_flashflex_prompt_lookup(const llama_token * context,
                                                int32_t             n_context,
                                                int32_t             ngram,
                                                int32_t             n_max,
                                                llama_token *       draft);
// Whether a loaded model's plan asks llama.cpp's prompt-lookup drafter (ngram-simple) to draft as above.
LLAMA_API bool    llama_flashflex_prompt_lookup_planned(void);
// API 11: for a program that batches requests (llama-server), called when it wakes from idle with a request: waits
// the window a loaded model's plan asks for (spec option "gather_ms": a few percent of a pass over its streamed
// weights; the largest over the loaded models), so that requests sent together share the first pass. Returns the
// milliseconds waited: 0, at once, where no plan asks for a window (the stock path).
LLAMA_API int32_t llama_flashflex_gather(void);

//
// Devices and ggml's RPC backend (API 6; feature "devices", and "rpc" when the build has ggml's RPC backend).
//

// The backend devices this process sees (ggml's registry: local devices, then RPC workers' devices once added), as
// JSON (same conventions as llama_flashflex_model_stats): {"devices": [{"index", "name", "description",
// "type": "cpu|gpu|igpu|accel", "backend" (its registry: "CPU", "RPC", ...), "free", "total"}]}. Asking an RPC
// device for its memory is a round trip to its worker.
LLAMA_API int32_t            llama_flashflex_devices(char * buf, size_t buf_size);
// The device at `index` of that list (for llama_model_params.devices), or NULL.
LLAMA_API ggml_backend_dev_t llama_flashflex_device(int32_t index);
// The memory a context and its model hold per buffer type, as llama.cpp allocated it: {"buffers": [{"buffer_type",
// "device", "description", "host", "model", "context", "compute"}], "kv_layers": [bytes of each layer's KV cache, by
// layer index, wherever it lives; empty when the context's memory is not a KV cache]} (bytes). Tensors flashflex streams or banks
// live in flashflex's own buffers and are not counted here. For a model loaded with no_alloc these are the sizes
// llama.cpp would allocate (nothing is): what flashflex's planner reserves for the KV cache and compute buffers. Returns the full length, or -1 without a context.
LLAMA_API int32_t llama_flashflex_memory_breakdown(const struct llama_context * ctx, char * buf, size_t buf_size);
// API 12: where a context's model weights and KV cache are: the "buffers" of llama_flashflex_memory_breakdown without
// "compute" (nor "kv_layers"). Both are allocated once, so unlike the breakdown (whose compute buffers a decode may
// reallocate) it may be called while another thread decodes (llama-server's GET /flashflex/stats).
LLAMA_API int32_t llama_flashflex_placement(const struct llama_context * ctx, char * buf, size_t buf_size);
// Add the devices of the RPC worker at endpoint ("host:port") to the device list (ggml_backend_rpc_add_server, then
// ggml_backend_register), once per endpoint per process. Returns its device count, or -1 (llama_flashflex_last_error).
// ggml connects at once and aborts the process when the worker does not answer: check that it does first (flashflex
// probes it with a timeout). From the first call on, an abort of ggml's RPC client (a worker that stops answering
// during a run) prints one line naming the worker and exits with status 1.
LLAMA_API int32_t llama_flashflex_rpc_add_server(const char * endpoint);
// Serve the devices at device_indices (of llama_flashflex_devices) to RPC clients at endpoint ("host:port"), with
// n_threads compute threads and an optional tensor cache directory (NULL or "" = none), until the process ends.
// announce_bytes > 0: each device tells clients it has that much memory (total; free = the smaller of that and the
// device's own), so the client's planner places no more than that on it (a figure, not a limit the worker
// enforces). ggml's RPC protocol has no authentication: whoever reaches the port can use the devices. Returns -1
// (llama_flashflex_last_error) when it cannot start; it does not return otherwise.
LLAMA_API int32_t llama_flashflex_rpc_serve(const char *    endpoint,
                                            const char *    cache_dir,
                                            int32_t         n_threads,
                                            uint64_t        announce_bytes,
                                            const int32_t * device_indices,
                                            size_t          n_devices);

#ifdef __cplusplus
}
#endif
