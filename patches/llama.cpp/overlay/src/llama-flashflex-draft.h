// flashflex: drafting for programs that draft for several sequences decoded together (llama-server's slots): the
// draft length, chosen before each pass from what this context's passes cost and what their drafts kept, and the
// prompt lookup that makes the drafts. Pure (no ggml, no llama.cpp, times given by the caller): llama-flashflex.cpp
// keeps a draft_length per planned context behind the C API (llama_flashflex_draft_*), and exposes prompt_lookup
// (llama_flashflex_prompt_lookup); tests drive both directly (tests/cpp/draft_length_driver.cpp, ctypes).

#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace flashflex {

// Prompt lookup: up to k tokens that followed the most recent earlier occurrence of the context's last `ngram`
// tokens; where there is none, of the `ngram` tokens before the last one followed by any token (the last token taken
// as changed: a corrected word, the next number of a list, and the copy goes on after it); then of the last n tokens
// for n from ngram - 1 down to 1. Writes the draft into out (room for k) and returns its length (0: no match).
int prompt_lookup(const int32_t * ids, int64_t n_ids, int ngram, int k, int32_t * out);

// The passes decoded for one number of sequences n: their seconds by rows, and when to probe drafting again.
struct draft_pass_costs {
    int                               n;
    std::map<int, std::deque<double>> seconds;      // rows -> the seconds of its last few passes
    int                               gap     = 0;
    int                               idle    = 0;  // passes whose drafts were cut to 0 since one last went out
    bool                              probing = false;
    uint64_t                          probes  = 0;

    explicit draft_pass_costs(int n);

    bool                                has_plain() const;
    double                              plain() const;  // median seconds of a pass with no draft (rows = n)
    std::vector<std::pair<int, double>> drafted_sizes(std::vector<double> * weights) const;
    double                              pass_seconds(int rows) const;  // estimated
    double                              score(int m, int k, double p) const;
    int                                 best(int m, int n_max, double p) const;
    int                                 probe_gap(int m) const;
};

class draft_length {
  public:
    explicit draft_length(bool adaptive);

    // How many tokens of their drafts the m of n sequences that have one keep in the pass about to be decoded
    // (0..n_max), asked at time `now` (seconds, any steady clock) with the drafts made.
    int  propose(int n, int m, int n_max, double now);
    // A verification judged `drafted` tokens and kept the first `kept`.
    void verified(int drafted, int kept);
    // The pass asked for last ended at `now` with `rows` rows; `generation_only`: no prompt token in it.
    void passed(int rows, bool generation_only, double now);

    double      acceptance() const;
    std::string json() const;

  private:
    draft_pass_costs & costs(int n);

    bool                            adaptive;
    double                          kept, judged;  // decayed counts behind the acceptance
    uint64_t                        drafted_total = 0, kept_total = 0;
    std::map<int, draft_pass_costs> by_n;
    int                             n_max     = 0;  // the longest draft the program asked for last
    int                             pending_n = 0;  // the sequences of the pass being decoded (0: none asked)
    double                          pending_t = 0;  // when it was asked
};

}  // namespace flashflex
