// flashflex: a model's runtime configuration as read from its spec file (llama-flashflex-config.cpp) and the
// execution paths read it at load: the files, the tensors dense streaming reads, the expert banks and the
// options of each path.

#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace flashflex {

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
    std::string           name;
    int                   file;
    uint64_t              offset;
    uint64_t              expert_stride;
    uint64_t              bytes_per_expert;
    std::vector<uint64_t> checksums;  // one per expert (expert_checksum), empty when the sidecar has none
};

struct config {
    std::string                    model_path;       // the model the spec was planned for
    uint64_t                       model_bytes = 0;  // its size: a load of another file is refused
    std::vector<std::string>       files;
    std::vector<stream_tensor_cfg> tensors;          // dense streaming
    std::vector<bank_tensor_cfg>   banks;            // MoE slot banks
    std::vector<std::string>       file_layout;      // weights kept in the file's layout (never repacked by the CPU
                                                     // backend): those that stream, and the same in stock's reference
    int                            prefetch_threads = 1;
    int                            window           = 3;
    int64_t                        ring_bytes  = 0;  // dense streaming ring size in bytes (0: `window` layers' worth)
    int64_t                        lent_bytes  = 0;  // room for drafting's verification rows, lent to streamed weights
    int                            direct_io   = 1;  // 0 buffered, 1 direct when possible, 2 direct or fail
    int                            ring_mirror = 1;  // 1: map each ring twice back to back (no wrap slack); 0 flat
    int                            draft_adaptive = 1;  // 1: drafts as long as the measured passes afford; 0: fixed
    int                            prompt_lookup  = 0;  // 1: llama.cpp's ngram-simple drafter drafts by ours
    int                            gather_ms      = 0;  // a server waking from idle waits this long for more requests
    int                            moe_slots      = 0;  // slots per layer; 0 = every expert resident (resident-bank)
    int                            moe_io_threads = 4;  // parallel readers for bank misses
    int                  moe_shared_only = 0;          // diagnostic: routed experts contribute nothing, nothing is read
    int                  moe_preload     = 0;          // oracle-all-hit: install every expert of moe_schedule at load
    int                  moe_verify      = 0;          // check each expert read against its checksum (when it has one)
    std::string          moe_trace;                    // append one JSONL record per routed layer call here ("" = off)
    std::string          moe_prefetch       = "none";  // none | router-lookahead | oracle (needs moe_schedule)
    int                  moe_prefetch_ranks = 0;       // router-lookahead: read each token's top ranks only; 0 = all k
    std::vector<int32_t> moe_schedule;                 // a replayed trace: layer, n, n expert ids, layer, n, ...
};

// The configuration in the spec file at path; throws std::runtime_error naming the file and the problem (unreadable,
// not JSON, another spec version or patch series, edited by hand, a value out of range).
config read_spec(const std::string & path);

// Records why the C API refused something (llama_flashflex_last_error) and returns -1.
int32_t refuse(const std::string & why);

}  // namespace flashflex
