// flashflex: what our runtime files share — the per-model configuration built through the C API, small I/O
// helpers, and the entry points each execution path (dense streaming, MoE slot banks) gives the call sites
// in llama-flashflex-config.cpp. Not used by upstream files (they include llama-flashflex-internal.h).

#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

struct ggml_context;
struct ggml_tensor;
struct llama_model;
struct llama_model_loader;

namespace flashflex {

constexpr size_t k_page = 4096; // O_DIRECT granularity for offsets, lengths and addresses

inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

inline int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A tensor that dense streaming reads from the GGUF instead of loading it.
struct stream_tensor_cfg {
    std::string name;
    int         file;
    uint64_t    offset;
    uint64_t    nbytes;
};

// A routed-expert tensor whose experts live in a sidecar file: expert e is bytes_per_expert bytes at
// offset + e * expert_stride (all multiples of 4096, so misses can use O_DIRECT).
struct bank_tensor_cfg {
    std::string name;
    int         file;
    uint64_t    offset;
    uint64_t    expert_stride;
    uint64_t    bytes_per_expert;
    std::vector<uint64_t> checksums;  // one per expert (expert_checksum), empty when the sidecar has none
};

// The sidecar's per-expert checksum: the expert's bytes as little-endian 64-bit words w_i (the last one
// zero-padded), sum of w_i * (2i + 1) mod 2^64. Any change of one word changes it (odd weights are invertible),
// it runs at memory speed, and numpy computes the same at extraction.
uint64_t expert_checksum(const void * data, size_t n);

struct config {
    std::vector<std::string>       files;
    std::vector<stream_tensor_cfg> tensors; // dense streaming
    std::vector<bank_tensor_cfg>   banks;   // MoE slot banks
    int prefetch_threads = 1;
    int window           = 3;
    int direct_io        = 1;               // 0 buffered, 1 direct when possible, 2 direct or fail
    int moe_slots        = 0;               // slots per layer; 0 = every expert resident (resident-bank)
    int moe_io_threads   = 4;               // parallel readers for bank misses
    int moe_shared_only  = 0;               // diagnostic: routed experts contribute nothing, nothing is read
    int moe_preload      = 0;               // oracle-all-hit: install every expert of moe_schedule at load
    int moe_verify       = 0;               // check each expert read against its checksum (when it has one)
    std::string moe_trace;                  // append one JSONL record per routed layer call here ("" = off)
    std::string moe_prefetch = "none";      // none | router-lookahead | oracle (needs moe_schedule)
    int moe_prefetch_ranks = 0;             // router-lookahead: read each token's top ranks only; 0 = all k
    std::vector<int32_t> moe_schedule;      // a replayed trace: layer, n, n expert ids, layer, n, ...
};

struct open_file {
    std::string path;
    int fd = -1;
};

// Opens files for reading; with direct_io > 0 probes O_DIRECT with one aligned read and falls back to
// buffered reads (all files alike) unless direct_io == 2. Throws std::runtime_error naming the file.
std::vector<open_file> open_files(const std::vector<std::string> & paths, int direct_io, bool & direct);
void close_files(std::vector<open_file> & files);

// pread until [dst, dst + len) is filled or the file ends; returns bytes read, or -1 with errno set.
long long pread_full(int fd, void * dst, size_t len, uint64_t offset);

// The model layer a tensor name belongs to ("blk.N."), or -1.
int layer_of(const std::string & name);

std::string json_escape(const std::string & s);

// Copies s into buf (NUL-terminated, truncated to size) and returns its full length: the C API's JSON outputs.
int32_t write_c_string(const std::string & s, char * buf, size_t size);

// Dense streaming (llama-flashflex-stream.cpp).
void          stream_setup(const llama_model & model, llama_model_loader & ml, const config & cfg);
bool          stream_active(const llama_model * model);
void          stream_free(const llama_model * model);
void          stream_graph_begin(const llama_model * model);
void          stream_graph_end();
ggml_tensor * stream_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done);
bool          stream_failed(const llama_model * model, std::string * error);

// MoE slot banks (llama-flashflex-moe.cpp).
void          moe_setup(const llama_model & model, llama_model_loader & ml, const config & cfg);
bool          moe_active(const llama_model * model);
void          moe_free(const llama_model * model);
void          moe_graph_begin(const llama_model * model);
void          moe_graph_end();
ggml_tensor * moe_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done);
ggml_tensor * moe_mul_mat_id(ggml_context * ctx, ggml_tensor * as, ggml_tensor * b, ggml_tensor * ids);
bool          moe_failed(const llama_model * model, std::string * error);
uint32_t      moe_graph_nodes(const llama_model * model, uint32_t n_tokens);

} // namespace flashflex
