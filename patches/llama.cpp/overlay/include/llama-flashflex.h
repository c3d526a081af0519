// flashflex: the C API that flashflex adds to llama.cpp.
//
// Everything flashflex exports lives in this header, as new functions. Upstream structs are never
// extended (that would break llama-cpp-python's ctypes layouts); per-model settings are attached to a
// model through functions declared here.

#pragma once

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

// Version of this C API. Bumped whenever a function here changes signature or meaning.
#define LLAMA_FLASHFLEX_API_VERSION 6

LLAMA_API int32_t llama_flashflex_api_version(void);

// A JSON object describing this build, valid for the life of the process:
//   {"api_version": 6, "series_hash": "<sha256 of patches/llama.cpp>", "features": [...],
//    "backends": ["CPU", ...], "rpc_protocol": [7, 0, 0]}
// ("rpc_protocol": the version of ggml's RPC protocol this build speaks; null without the RPC backend)
// "series_hash" is the hash flashflex computed over its patch series when it configured the build
// ("unknown" when built by hand without -DFLASHFLEX_SERIES_HASH=...).
LLAMA_API const char * llama_flashflex_info(void);

//
// Dense weight streaming (FlexInfer-style): a per-model configuration, built before the model is loaded
// and handed to the load through the GGUF key override "flashflex.config" (an int holding the id).
// Tensors named with llama_flashflex_config_stream_tensor() are never loaded into the model's buffers:
// they live in a ring of bytes (API 6: "ring_bytes"; without it, `window` layers' worth), each at a fixed home laid
// out in the order compute uses them, and are read from the GGUF by `prefetch_threads` background threads ahead of
// compute (0 = synchronous reads) as soon as the bytes of their home are released.
// Every other tensor loads as usual. The model must be loaded without mmap (load_mode NONE).
//

// Create an empty configuration; returns its id (> 0).
LLAMA_API int32_t llama_flashflex_config_new(void);
// Set an integer option: "prefetch_threads" (>= 0), "window" (>= 1), "ring_bytes" (API 6, >= 0; at least the
// largest streamed layer plus its largest tensor per buffer type, which is used when it is less),
// "direct_io" (0 = buffered reads, 1 = O_DIRECT when the file system allows it, 2 = O_DIRECT or fail),
// and for MoE expert banks "moe_slots" (slots per layer, >= the experts each token uses; 0 = every expert
// resident, read from the sidecar at load), "moe_io_threads" (>= 1 parallel readers for misses) and
// "moe_shared_only" (1 = diagnostic: routed experts contribute nothing and nothing is read).
// Returns 0, or -1 for an unknown config id, key or value; every -1 of the configuration functions sets
// llama_flashflex_last_error() to the reason.
LLAMA_API int32_t llama_flashflex_config_set(int32_t config, const char * key, int64_t value);
// Register a model file; returns its index in this configuration, or -1.
LLAMA_API int32_t llama_flashflex_config_add_file(int32_t config, const char * path);
// Stream this tensor instead of loading it. offset/nbytes are its data range in that file; the load
// checks them against the GGUF and fails when they differ (a plan made for another file).
LLAMA_API int32_t
llama_flashflex_config_stream_tensor(int32_t config, const char * name, int32_t file, uint64_t offset, uint64_t nbytes);
// MoE expert slot banks (Flash-MoE-style): bank this routed-expert tensor ([ne0, ne1, n_expert]). Its experts
// are read from a sidecar file registered with llama_flashflex_config_add_file: expert e is bytes_per_expert
// bytes at offset + e * expert_stride (offset and stride multiples of 4096). The load checks the shape and
// size against the model and fails on a mismatch (a sidecar of another model).
LLAMA_API int32_t llama_flashflex_config_bank_tensor(int32_t      config,
                                                     const char * name,
                                                     int32_t      file,
                                                     uint64_t     offset,
                                                     uint64_t     expert_stride,
                                                     uint64_t     bytes_per_expert);
// API 5: the per-expert checksums of a banked tensor (n_experts values, see flashflex's sidecar format): with the
// int option "moe_verify" = 1 every expert read from the sidecar is checked against its checksum, and a mismatch
// fails the model with the layer, tensor and expert named (bit rot, or a layer file changed behind the manifest).
LLAMA_API int32_t llama_flashflex_config_bank_checksums(int32_t          config,
                                                        const char *     name,
                                                        const uint64_t * checksums,
                                                        size_t           n_experts);
// Set a string option (API 3): "moe_trace" = a file to append one JSON line per routed layer call to
// (sequence number, ubatch, layer, tokens, experts per token, expert ids, slot ids, hit per id; the caller
// writes the header line), "moe_prefetch" = the expert prefetch policy: "none", "router-lookahead" (while
// layer L computes, apply layer L+1's router to layer L's input and read the experts it picks) or "oracle"
// (read the next record of the replayed schedule ahead of use); the integer option "moe_prefetch_ranks" limits
// router-lookahead to each token's top ranks (0 = all k). Returns 0, or -1 for an unknown key or value.
LLAMA_API int32_t llama_flashflex_config_set_string(int32_t config, const char * key, const char * value);
// Replay a routing trace (API 3): `values` holds records as layer, n, then n expert ids (token-major), in the
// order the run resolves them. The run fails with a clear error when its routing differs from the schedule
// (another prompt, model or setting). With the integer option "moe_preload" = 1 every expert the schedule uses
// is installed at load (oracle-all-hit: the bank must have room for each layer's distinct experts).
LLAMA_API int32_t llama_flashflex_config_moe_schedule(int32_t config, const int32_t * values, size_t n_values);
// Forget a configuration (a loaded model keeps its own copy).
LLAMA_API void    llama_flashflex_config_free(int32_t config);

// The last error flashflex raised on this thread (empty string when none).
LLAMA_API const char * llama_flashflex_last_error(void);

// Statistics of a model loaded with a configuration, as a JSON object written into buf (NUL-terminated,
// truncated to buf_size). Returns the full length, or -1 when the model has no flashflex configuration.
LLAMA_API int32_t      llama_flashflex_model_stats(const struct llama_model * model, char * buf, size_t buf_size);
// Zero the model's counters (e.g. between the prompt and the decode phase).
LLAMA_API void         llama_flashflex_model_stats_reset(const struct llama_model * model);
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
// "device", "description", "host", "model", "context", "compute"}]} (bytes). Tensors flashflex streams or banks
// live in flashflex's own buffers and are not counted here. For a model loaded with no_alloc these are the sizes
// llama.cpp would allocate (nothing is): what flashflex's planner reserves for the KV cache and compute buffers. Returns the full length, or -1 without a context.
LLAMA_API int32_t llama_flashflex_memory_breakdown(const struct llama_context * ctx, char * buf, size_t buf_size);
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
