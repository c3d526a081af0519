// A driver for the runtime's draft length (llama-flashflex-draft.h), compiled with it alone by
// tests/test_draft_length.py. One command per line on stdin, one JSON answer per line on stdout:
//   new ADAPTIVE                  a controller (1 adaptive, 0 fixed)             -> {"ok": true}
//   propose N N_MAX NOW L0 L1 ... what sequences 0, 1, ... of the N in the pass
//                                 keep of drafts of L0, L1, ... tokens           -> {"lengths": [K0, K1, ...]}
//   drafts N N_MAX NOW D0 D1 ...  as propose, with each draft's tokens: Di is     -> {"lengths": [K0, K1, ...]}
//                                 "t,t,t" ("-": none), so a draft cut to nothing is judged unsent (a shadow)
//   taken SEQ TOKEN               sequence SEQ took TOKEN without a sent draft   -> {"ok": true}
//   verified SEQ DRAFTED KEPT     a verification's outcome                       -> {"ok": true}
//   pass ROWS GENERATION_ONLY NOW the pass asked for last ended at NOW           -> {"ok": true}
//   ended SEQ                     sequence SEQ ended its request                 -> {"ok": true}
//   state                         the controller's JSON                          -> {...}

#include "llama-flashflex-draft.h"

#include <cstdio>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

int main() {
    std::unique_ptr<flashflex::draft_length> d;
    std::string                              line;
    while (std::getline(std::cin, line)) {
        std::istringstream in(line);
        std::string        cmd;
        in >> cmd;
        if (cmd == "new") {
            int adaptive = 1;
            in >> adaptive;
            d = std::make_unique<flashflex::draft_length>(adaptive != 0);
            std::puts("{\"ok\": true}");
        } else if (!d) {
            std::puts("{\"error\": \"no controller: new first\"}");
        } else if (cmd == "propose" || cmd == "drafts") {
            int                               n = 0, n_max = 0;
            double                            now = 0;
            std::vector<int>                  seq, lengths;
            std::vector<std::vector<int32_t>> tokens;
            in >> n >> n_max >> now;
            for (std::string word; in >> word;) {
                seq.push_back((int) seq.size());
                if (cmd == "propose") {
                    lengths.push_back(std::stoi(word));
                    continue;
                }
                tokens.emplace_back();
                std::istringstream list(word == "-" ? "" : word);
                for (std::string t; std::getline(list, t, ',');) {
                    tokens.back().push_back((int32_t) std::stol(t));
                }
                lengths.push_back((int) tokens.back().size());
            }
            std::vector<const int32_t *> drafts;
            for (const auto & t : tokens) {
                drafts.push_back(t.data());
            }
            d->propose(n, n_max, seq.data(), lengths.data(), (int) seq.size(), now,
                       cmd == "drafts" ? drafts.data() : nullptr);
            std::string out = "{\"lengths\": [";
            for (size_t i = 0; i < lengths.size(); ++i) {
                out += (i ? ", " : "") + std::to_string(lengths[i]);
            }
            std::puts((out + "]}").c_str());
        } else if (cmd == "taken") {
            int     seq   = 0;
            int32_t token = 0;
            in >> seq >> token;
            d->taken(seq, token);
            std::puts("{\"ok\": true}");
        } else if (cmd == "verified") {
            int seq = 0, drafted = 0, kept = 0;
            in >> seq >> drafted >> kept;
            d->verified(seq, drafted, kept);
            std::puts("{\"ok\": true}");
        } else if (cmd == "pass") {
            int    rows = 0, generation_only = 1;
            double now = 0;
            in >> rows >> generation_only >> now;
            d->passed(rows, generation_only != 0, now);
            std::puts("{\"ok\": true}");
        } else if (cmd == "ended") {
            int seq = 0;
            in >> seq;
            d->ended(seq);
            std::puts("{\"ok\": true}");
        } else if (cmd == "state") {
            std::puts(d->json().c_str());
        } else {
            std::printf("{\"error\": \"unknown command %s\"}\n", cmd.c_str());
        }
        std::fflush(stdout);
    }
    return 0;
}
