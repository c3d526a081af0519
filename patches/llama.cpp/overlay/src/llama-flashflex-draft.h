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

// What one sequence's drafts kept, as two rates: of a draft's first token, and of each token after a kept one
// (prompt lookup's weak drafts are seldom right at their first token, but a copy that starts tends to go on); counts
// starting from a prior, the first decayed per pass of the sequence, the others per judged token; and, where the
// program gives no drafts' tokens (no shadows), while its drafts are cut to nothing as others draft, when to probe it
// with one token.
struct draft_acceptance {
    double kept_first, judged_first;  // a draft's first token
    double kept, judged;              // the tokens after a kept one
    int    idle    = 0;  // passes that cut its draft to nothing while others drafted, since it last drafted
    int    gap     = 0;
    bool   probing = false;

    // A request's own drafts measure it before the prices decide (draft_length::measure_new_requests): one-token
    // drafts early in it, and when one is kept, one as long as would pay, so the tokens after a kept one are judged.
    enum { measure_first, measuring_first, measure_whole, measuring_whole, measured } measure = measure_first;

    int measure_tries = 0;  // one-token measurements made
    int measure_wait  = 0;  // drafted passes before the next

    // Its draft cut to nothing (its shadow): judged against the tokens the sequence takes, one at a time, as a sent
    // draft would have been (draft_length::taken); `seen` of its tokens were taken as drafted so far.
    std::vector<int32_t> shadow;
    size_t               seen = 0;

    draft_acceptance();
    double first() const;                         // how often a draft's first token is kept
    double p() const;                             // how often a token is kept after a kept one
    void   judge(int drafted, int kept);
    void   judge_token(size_t index, bool kept);  // the draft's token at index, the ones before it kept
    void   advance();                             // a pass of the sequence: a token taken, or a draft verified
};

// The passes decoded for one number of sequences n: their seconds by rows, and when to probe drafting again.
struct draft_pass_costs {
    int                               n;
    std::map<int, std::deque<double>> seconds;      // rows -> the seconds of its last few passes
    int                               gap     = 0;
    int                               idle    = 0;  // passes whose drafts were cut to 0 since one last went out
    bool                              probing = false;
    uint64_t                          probes  = 0;
    int since_plain   = 0;  // passes with drafts since the last plain one (a plain pass is re-measured now and then)
    int since_drafted = 0;  // plain passes since the last one with drafts (drafted sizes measured long ago expire)

    explicit draft_pass_costs(int n);

    bool                                has_plain() const;
    double                              plain() const;  // median seconds of a pass with no draft (rows = n)
    std::vector<std::pair<int, double>> drafted_sizes(std::vector<double> * weights) const;
    double                              pass_seconds(int rows) const;  // estimated
    // How much of its draft each sequence keeps: offered[i] tokens drafted by a sequence whose first drafted token is
    // kept with probability first[i], and each one after a kept one with p[i]; m of the n sequences have a draft;
    // the drafts must raise the sequences' rates by min_gain on average, or none goes out.
    std::vector<int>                    allocate(int                         m,
                                                 const std::vector<double> & first,
                                                 const std::vector<double> & p,
                                                 const std::vector<int> &    offered,
                                                 double                      min_gain) const;
    int                                 probe_gap(int m) const;
};

class draft_length {
  public:
    explicit draft_length(bool adaptive);

    // How many tokens of its draft each of the sequences seq[0..count) keeps in the pass about to be decoded:
    // lengths[i] is the draft it made (0: none) on the way in and what it keeps on the way out (0..n_max); n: the
    // sequences in the pass; asked at time `now` (seconds, any steady clock). With `drafts` (drafts[i]: the
    // lengths[i] tokens of sequence i's draft), a draft cut to nothing is judged unsent by the tokens its sequence
    // then takes (`taken`): acceptance is measured at every token, with no probe and no measuring of new requests,
    // and starting to draft after a plain pass must promise more (see the .cpp).
    void propose(int                     n,
                 int                     n_max,
                 const int *             seq,
                 int *                   lengths,
                 int                     count,
                 double                  now,
                 const int32_t * const * drafts = nullptr);
    // Sequence seq took `token` in a pass where it sent no draft.
    void taken(int seq, int32_t token);
    // A verification of sequence seq judged `drafted` tokens and kept the first `kept`.
    void verified(int seq, int drafted, int kept);
    // The pass asked for last ended at `now` with `rows` rows; `generation_only`: no prompt token in it.
    void passed(int rows, bool generation_only, double now);
    // Sequence seq ended its request: the next starts from the prior acceptance.
    void ended(int seq);

    const draft_acceptance & acceptance(int seq) const;
    std::string              json() const;

  private:
    void               choose(int n, const int * seq, int * lengths, int count);
    draft_pass_costs & costs(int n);
    void               measure_new_requests(const draft_pass_costs &    c,
                                            int                         m,
                                            const std::vector<double> & f,
                                            const std::vector<double> & p,
                                            const int *                 seq,
                                            const std::vector<int> &    offered,
                                            int *                       lengths,
                                            int                         count,
                                            bool                        first);

    bool                            adaptive;
    bool                            shadowed     = false;  // the program gives its drafts' tokens (propose)
    bool                            drafted_last = false;  // the last pass asked for had drafted rows
    std::map<int, draft_acceptance> by_seq;
    uint64_t                        drafted_total = 0, kept_total = 0;
    uint64_t                        shadow_judged = 0, shadow_kept = 0;  // tokens of shadows
    std::map<int, draft_pass_costs> by_n;
    int                             n_max     = 0;                       // the longest draft the program asked for last
    int                             pending_n = 0;  // the sequences of the pass being decoded (0: none asked)
    double                          pending_t = 0;  // when it was asked
};

}  // namespace flashflex
