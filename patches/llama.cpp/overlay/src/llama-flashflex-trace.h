// flashflex: the routing trace writer. A slot-bank run with a trace file appends one JSON line per routed layer
// call (schema: orchestrator/traces.py, docs/traces.md; the caller writes the header line).

#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace flashflex {

class trace_writer {
  public:
    ~trace_writer() { close(); }

    // Opens path for appending. Throws std::runtime_error naming the file.
    void open(const std::string & path);

    bool is_open() const { return file != nullptr; }

    void flush();
    void close();

    // One record: the call's sequence number (counted here), ubatch, layer, tokens, experts per token, expert
    // ids, slot ids and hit per id (token-major). False when the write failed (errno says why).
    bool write(uint64_t                     ubatch,
               int                          layer,
               int64_t                      tokens,
               int64_t                      k,
               const std::vector<int32_t> & ids,
               const std::vector<int32_t> & slots,
               const std::vector<uint8_t> & hit);

    // Time spent formatting and writing records.
    double seconds() const { return ns.load() / 1e9; }

    void reset_seconds() { ns = 0; }

  private:
    FILE *               file = nullptr;
    uint64_t             seq  = 0;
    std::atomic<int64_t> ns{ 0 };
};

}  // namespace flashflex
