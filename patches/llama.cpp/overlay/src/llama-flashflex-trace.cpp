// flashflex: the routing trace writer (see llama-flashflex-trace.h).

#include "llama-flashflex-trace.h"

#include "llama-flashflex-io.h"
#include "llama-flashflex-json.h"
#include "llama-impl.h"

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace flashflex {

void trace_writer::open(const std::string & path) {
    file = fopen(path.c_str(), "ab");
    if (!file) {
        throw std::runtime_error(
            format("flashflex: cannot open the routing trace %s: %s", path.c_str(), strerror(errno)));
    }
    setvbuf(file, nullptr, _IOFBF, 1 << 20);
}

void trace_writer::flush() {
    if (file) {
        fflush(file);
    }
}

void trace_writer::close() {
    if (file) {
        fclose(file);
        file = nullptr;
    }
}

bool trace_writer::write(uint64_t                     ubatch,
                         int                          layer,
                         int64_t                      tokens,
                         int64_t                      k,
                         const std::vector<int32_t> & ids,
                         const std::vector<int32_t> & slots,
                         const std::vector<uint8_t> & hit) {
    const int64_t              t0 = now_ns();
    const std::vector<int32_t> hit32(hit.begin(), hit.end());
    json_object                rec;
    rec.add("seq", seq++)
        .add("ubatch", ubatch)
        .add("layer", layer)
        .add("tokens", tokens)
        .add("k", k)
        .add_ints("ids", ids.data(), ids.size())
        .add_ints("slots", slots.data(), slots.size())
        .add_ints("hit", hit32.data(), hit32.size());
    const std::string line = rec.str() + "\n";
    const bool        ok   = fwrite(line.data(), 1, line.size(), file) == line.size();
    ns.fetch_add(now_ns() - t0);
    return ok;
}

}  // namespace flashflex
