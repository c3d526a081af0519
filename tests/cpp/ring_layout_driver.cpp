// Test driver for the dense-streaming ring layout (patches/llama.cpp/overlay/src/llama-flashflex-ring.*), built
// by tests/test_ring_layout.py with g++ against those two files only: they must not need ggml or llama.cpp.
//
// Reads a scenario from stdin, one command per line, and answers each with one JSON line on stdout:
//   rings S0 S1 ...             ring sizes in bytes                          -> {"ok": true}
//   mirror M0 M1 ...            which rings are mirrored (0 or 1 each)       -> {"ok": true}
//   home RING LEN LI BY_USE     append a home (BY_USE 0 or 1)                -> {"ok": true}
//   layer LAYER FIRST COUNT     append a streamed layer                      -> {"ok": true}
//   place                       ring_layout::place                           -> {"homes": [...]}
//   unplace K0 K1 ...           those homes take no ring bytes (kept elsewhere) -> {"ok": true}
//   learn K0 K1 ...             learn_order on a use sequence, then reorder  -> {"changed", "order", "n_uses", "homes"}
//   conflict                    ring_layout::conflict                        -> {"conflict": [k, j] | null}
//   sizes N_RINGS ASKED WINDOW PAGE [MIRRORED]  ring_sizes                  -> {"size": [...], "need": n}

#include "llama-flashflex-ring.h"

#include <iostream>
#include <sstream>
#include <string>
#include <vector>

using namespace flashflex;

namespace {

void print_list(const std::vector<int> & v) {
    std::cout << "[";
    for (size_t i = 0; i < v.size(); ++i) {
        std::cout << (i ? ", " : "") << v[i];
    }
    std::cout << "]";
}

void print_homes(const ring_layout & layout) {
    std::cout << "\"homes\": [";
    for (size_t k = 0; k < layout.homes.size(); ++k) {
        const ring_home & h = layout.homes[k];
        std::cout << (k ? ", " : "") << "{\"ring\": " << h.ring << ", \"len\": " << h.len << ", \"li\": " << h.li
                  << ", \"by_use\": " << (h.by_use ? "true" : "false") << ", \"off\": " << h.off << ", \"overlaps\": ";
        print_list(h.overlaps);
        std::cout << "}";
    }
    std::cout << "]";
}

}  // namespace

int main() {
    ring_layout layout;
    std::string line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string        cmd;
        if (!(in >> cmd)) {
            continue;
        }
        if (cmd == "rings") {
            size_t s;
            while (in >> s) {
                layout.ring_size.push_back(s);
            }
            std::cout << "{\"ok\": true}\n";
        } else if (cmd == "mirror") {
            int m;
            while (in >> m) {
                layout.mirrored.push_back(m != 0);
            }
            std::cout << "{\"ok\": true}\n";
        } else if (cmd == "home") {
            ring_home h;
            int       by_use = 0;
            in >> h.ring >> h.len >> h.li >> by_use;
            h.by_use = by_use != 0;
            layout.homes.push_back(h);
            std::cout << "{\"ok\": true}\n";
        } else if (cmd == "layer") {
            ring_layer L{};
            in >> L.layer >> L.first >> L.count;
            layout.layers.push_back(L);
            std::cout << "{\"ok\": true}\n";
        } else if (cmd == "unplace") {
            int k;
            while (in >> k) {
                layout.homes[k].placed = false;
            }
            std::cout << "{\"ok\": true}\n";
        } else if (cmd == "place") {
            layout.place();
            std::cout << "{";
            print_homes(layout);
            std::cout << "}\n";
        } else if (cmd == "learn") {
            std::vector<int> seq, order, n_uses;
            int              k;
            while (in >> k) {
                seq.push_back(k);
            }
            const bool changed = layout.learn_order(seq, order, n_uses);
            if (changed) {
                layout.reorder(order, n_uses);
            }
            std::cout << "{\"changed\": " << (changed ? "true" : "false") << ", \"order\": ";
            print_list(order);
            std::cout << ", \"n_uses\": ";
            print_list(n_uses);
            std::cout << ", ";
            print_homes(layout);
            std::cout << "}\n";
        } else if (cmd == "conflict") {
            int k = -1, j = -1;
            if (layout.conflict(k, j)) {
                std::cout << "{\"conflict\": [" << k << ", " << j << "]}\n";
            } else {
                std::cout << "{\"conflict\": null}\n";
            }
        } else if (cmd == "sizes") {
            size_t n_rings = 0, asked = 0, page = 1;
            int    window = 0, mirrored = 0;
            in >> n_rings >> asked >> window >> page;
            in >> mirrored;  // optional: stays 0 when absent
            const ring_sizing sz = ring_sizes(layout, n_rings, asked, window, page, mirrored != 0);
            std::cout << "{\"size\": [";
            for (size_t r = 0; r < sz.size.size(); ++r) {
                std::cout << (r ? ", " : "") << sz.size[r];
            }
            std::cout << "], \"need\": " << sz.need << "}\n";
        } else {
            std::cout << "{\"error\": \"unknown command " << cmd << "\"}\n";
        }
    }
    return 0;
}
