// flashflex dense streaming: the ring layout — where each streamed tensor's home lies in the ring of bytes of
// its buffer type. Pure bookkeeping (no ggml, no threads, no I/O), so it is unit-tested on its own
// (tests/test_ring_layout.py); llama-flashflex-stream.cpp puts the tensors' data pointers at these homes.
//
// Homes follow one another in the order compute uses the tensors (layer by layer), so a home shares bytes only
// with homes far enough away in the cycle. A flat ring wraps a home to its start when it would run past the end
// (the tail it skips is wasted: the ring needs a largest home of slack); a mirrored ring is mapped twice back to
// back in virtual memory, so a home just runs on past the end into the second mapping (no slack).

#pragma once

#include <cstddef>
#include <vector>

namespace flashflex {

// One streamed tensor as the layout sees it.
struct ring_home {
    int              ring   = 0;      // which ring (buffer type) holds it
    size_t           len    = 0;      // bytes of its home
    int              li     = 0;      // streamed-layer index
    bool             by_use = false;  // waited for and released by its use node, not with its layer
    bool             placed = true;   // has a home in the ring (false: the tensor is kept elsewhere for now)
    size_t           off    = 0;      // the home's offset in its ring (place)
    std::vector<int> overlaps;        // the other homes that share bytes with this one (place)
};

// A streamed layer: its homes are [first, first + count) of ring_layout::homes.
struct ring_layer {
    int layer;  // model layer
    int first;
    int count;
};

// What ring_sizes chooses for the rings.
struct ring_sizing {
    std::vector<size_t> size;      // per ring, a multiple of the page size
    size_t              need = 0;  // the least the rings need together (each its largest home)
    std::vector<size_t> streams;   // per ring, the bytes of its homes (a ring at least this large never wraps)
};

struct ring_layout {
    std::vector<size_t>     ring_size;  // bytes of each ring
    std::vector<bool>       mirrored;   // per ring (missing: flat): mapped twice back to back, so homes never wrap
    std::vector<ring_home>  homes;      // in the order compute uses them, layer by layer
    std::vector<ring_layer> layers;     // streamed layers in order

    // Homes in the current order, consecutive, wrapping to the ring's start (flat) or running on across its end
    // (mirrored: a home's bytes are then [off, ring) and [0, off + len - ring)); and which homes share bytes. A home
    // not `placed` takes no ring bytes and shares none.
    void place();

    bool is_mirrored(int ring) const { return (size_t) ring < mirrored.size() && mirrored[ring]; }

    // Whether two homes share bytes (on a mirrored ring, modulo its size).
    bool share_bytes(const ring_home & x, const ring_home & y) const;

    // The order in which a graph uses the streamed tensors, from `seq`: the tensor of each of its use nodes, in
    // node order. In each layer, the tensors without exactly one use come first (held with their layer), then the
    // others in use order (held by their use). Returns whether that differs from the current order (or from
    // which tensors are held by their use); `order` (new position -> current index) and `n_uses` are filled
    // either way.
    bool learn_order(const std::vector<int> & seq, std::vector<int> & order, std::vector<int> & n_uses) const;

    // The homes in `order` (from learn_order), each held by its use when it has exactly one, then placed anew.
    void reorder(const std::vector<int> & order, const std::vector<int> & n_uses);

    // A home held for its whole layer must not share bytes with another home of the layer (one held by its use
    // only shares with homes used before it, released by then). Returns false, with the first such pair (k, j),
    // when the rings are too small for that.
    bool conflict(int & k, int & j) const;
};

// Ring sizes for `n_rings` rings: each holds at least its largest home (a use node holds one tensor at a time);
// what `asked` bytes give beyond that is read-ahead, shared by the rings in proportion to the bytes they stream.
// With asked == 0, `window` layers' worth, plus the largest home (the wrap) unless `mirrored`. A ring never
// exceeds what it streams (then it never wraps). Sizes are rounded up to `page`.
ring_sizing ring_sizes(const ring_layout & layout,
                       size_t              n_rings,
                       size_t              asked,
                       int                 window,
                       size_t              page,
                       bool                mirrored = false);

}  // namespace flashflex
