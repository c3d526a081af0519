// flashflex dense streaming: the ring layout (see llama-flashflex-ring.h). Pure: no ggml, no threads.

#include "llama-flashflex-ring.h"

#include <algorithm>
#include <utility>

using namespace flashflex;

void ring_layout::place() {
    std::vector<size_t> pos(ring_size.size(), 0);
    for (auto & h : homes) {
        const size_t size = ring_size[h.ring];
        h.overlaps.clear();
        if (!h.placed) {
            h.off = 0;
            continue;
        }
        if (is_mirrored(h.ring)) {
            h.off       = pos[h.ring];
            pos[h.ring] = size ? (h.off + h.len) % size : 0;
        } else {
            if (pos[h.ring] + h.len > size) {
                pos[h.ring] = 0;
            }
            h.off = pos[h.ring];
            pos[h.ring] += h.len;
        }
    }
    for (size_t a = 0; a < homes.size(); ++a) {
        for (size_t b = a + 1; b < homes.size(); ++b) {
            if (share_bytes(homes[a], homes[b])) {
                homes[a].overlaps.push_back((int) b);
                homes[b].overlaps.push_back((int) a);
            }
        }
    }
}

bool ring_layout::share_bytes(const ring_home & x, const ring_home & y) const {
    auto meet = [](size_t a, size_t la, size_t b, size_t lb) {
        return a < b + lb && b < a + la;
    };
    if (x.ring != y.ring || !x.placed || !y.placed) {
        return false;
    }
    if (!is_mirrored(x.ring)) {
        return meet(x.off, x.len, y.off, y.len);
    }
    // both offsets are in [0, size) and no home is longer than its ring: one copy of each period suffices
    const size_t size = ring_size[x.ring];
    return meet(x.off, x.len, y.off, y.len) || meet(x.off + size, x.len, y.off, y.len) ||
           meet(x.off, x.len, y.off + size, y.len);
}

bool ring_layout::learn_order(const std::vector<int> & seq, std::vector<int> & order, std::vector<int> & n_uses) const {
    n_uses.assign(homes.size(), 0);
    for (int k : seq) {
        n_uses[k]++;
    }
    std::vector<std::vector<int>> by_layer(layers.size());
    for (int k : seq) {
        if (n_uses[k] == 1) {
            by_layer[homes[k].li].push_back(k);
        }
    }
    order.clear();
    order.reserve(homes.size());
    for (size_t li = 0; li < layers.size(); ++li) {
        const ring_layer & L = layers[li];
        for (int k = L.first; k < L.first + L.count; ++k) {
            if (n_uses[k] != 1) {
                order.push_back(k);
            }
        }
        order.insert(order.end(), by_layer[li].begin(), by_layer[li].end());
    }
    bool same = true;
    for (size_t i = 0; i < order.size() && same; ++i) {
        same = order[i] == (int) i && homes[i].by_use == (n_uses[i] == 1);
    }
    return !same;
}

void ring_layout::reorder(const std::vector<int> & order, const std::vector<int> & n_uses) {
    std::vector<ring_home> moved;
    moved.reserve(homes.size());
    for (int k : order) {
        moved.push_back(std::move(homes[k]));
        moved.back().by_use = n_uses[k] == 1;
    }
    homes = std::move(moved);
    place();
}

bool ring_layout::conflict(int & k, int & j) const {
    for (size_t a = 0; a < homes.size(); ++a) {
        if (homes[a].by_use) {
            continue;
        }
        for (int b : homes[a].overlaps) {
            if (homes[b].li == homes[a].li) {
                k = (int) a;
                j = b;
                return true;
            }
        }
    }
    return false;
}

ring_sizing flashflex::ring_sizes(const ring_layout & layout,
                                  size_t              n_rings,
                                  size_t              asked,
                                  int                 window,
                                  size_t              page,
                                  bool                mirrored) {
    std::vector<size_t> total(n_rings, 0), largest(n_rings, 0), layer_max(n_rings, 0);
    for (const auto & L : layout.layers) {
        std::vector<size_t> in_layer(n_rings, 0);
        for (int k = L.first; k < L.first + L.count; ++k) {
            const ring_home & h = layout.homes[k];
            in_layer[h.ring] += h.len;
            total[h.ring] += h.len;
            largest[h.ring] = std::max(largest[h.ring], h.len);
        }
        for (size_t r = 0; r < n_rings; ++r) {
            layer_max[r] = std::max(layer_max[r], in_layer[r]);
        }
    }
    ring_sizing out;
    out.streams      = total;
    size_t total_all = 0;
    for (size_t r = 0; r < n_rings; ++r) {
        out.need += largest[r];
        total_all += total[r];
    }
    for (size_t r = 0; r < n_rings; ++r) {
        size_t size;
        if (asked > 0) {
            const size_t extra = asked > out.need ? asked - out.need : 0;
            size               = largest[r] + (size_t) ((double) extra * total[r] / std::max<size_t>(total_all, 1));
        } else {
            size = (size_t) std::max(1, window) * layer_max[r] + (mirrored ? 0 : largest[r]);
        }
        size = std::min(size, total[r]);  // a ring that holds everything never wraps
        out.size.push_back((size + page - 1) / page * page);
    }
    return out;
}
