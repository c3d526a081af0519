// flashflex: the draft length of a program that drafts for several sequences at once (see llama-flashflex-draft.h).
//
// Why per pass and per number of sequences: under a streaming plan a pass reads the streamed weights once whatever
// it computes, so while one sequence generates, the rows of a draft ride along nearly free (the pass waits for its
// reads anyway), and a draft the model keeps saves a whole pass. With several sequences in the pass it already
// computes a row for each, the reads no longer hide the compute, and every drafted row costs time: four of
// llama-server's slots drafting 7 tokens each gave 0.78x the undrafted aggregate (docs/benchmarks.md, "Drafting
// inside llama-server's slots"). What a row costs follows the machine, the model and the plan, so it is measured:
// for each number of sequences n, the seconds of its passes by rows (the median of the last few, so one pass slowed
// by another process does not decide), and each sequence's acceptance (a slot copying a document keeps its drafts
// long beside one whose text does not repeat).
//
// The cost model is the one flashflex's Python drafter uses for a single sequence (orchestrator/speculative.py,
// DraftLength), with a pass of n sequences in place of its single-token step, and two rates per sequence: a draft's
// first token is kept with probability f, each token after a kept one with p, so a draft of k gives
// 1 + f (1 + p + ... + p^(k-1)) tokens per pass (prompt lookup's weak drafts, shorter n-grams where the text does
// not repeat, are seldom right at their first token, but a copy that starts tends to go on; one rate for both
// counted such a sequence's long drafts as failing and its one-token drafts as better than they are); a pass
// of R rows costs t(R), the median measured for R = n (a plain pass) and, beyond it, a line through the medians of
// the sizes measured, each weighing its passes (the slope pulled toward a prior of 10% of a plain pass per sequence
// and row; with one size measured, the slope from the plain pass to it).
//
// The choice is made once the drafts are made: m of the n sequences have one (prompt lookup drafts where the context
// repeats, and weakly, by shorter n-grams, elsewhere), and each keeps some tokens of it. Every sequence in the pass
// waits for the pass, so a draft's rows slow every other sequence: no sequence may expect less than 0.97x its plain
// rate (drafts use what the pass computes while it waits for its reads, and what the drafting sequences gain back:
// a user whose text does not repeat keeps 0.97x of the undrafted speed, one whose drafts are kept now and then pays
// for no more rows than they win). Within that, the lengths maximise the sum over the n sequences of the logarithm
// of each one's tokens per second, sum_i log(1 + f_i (1 + p_i + ... + p_i^(k_i-1))) - n log(t(n + sum_i k_i) / t(n)),
// f_i and p_i each sequence's rates (draft_pass_costs::allocate), and must raise the rates by 3% on average; with one sequence
// that is its own throughput. (Measured with SmolLM2 under 110 MiB, four requests at once: maximising the total
// tokens per pass let the copying slots draft 4 tokens each, passes took 2-3 times a plain one meanwhile, and the
// free-text request finished last, 0.82x the undrafted aggregate; the sum of logarithms alone still let them draft
// 2-5 tokens, the others took 13-15% longer and finished last, 0.88-1.16x across three runs; with each slot's own
// acceptance and a floor only for slots without a draft, the copying slots' long drafts slowed the weakly drafting
// ones and four requests finished at 0.77x.)
//
// A plain pass is measured before any draft goes out at that n, and again after every 32 passes with drafts (the
// median of the last 5: this host's speed drifts by the hour); the first draft is one token. Where the drafts are
// cut to 0, a one-token probe goes out after a gap of such passes that doubles while probes fail (up to 64), and is
// never so short that probes cost more than 1% of the time. A new request measures itself first (one-token drafts,
// then, once one is kept, one as long as would pay were every token kept): measure_new_requests.
//
// Where the program gives its drafts' tokens and the tokens each sequence takes (llama-server does), a draft cut to
// nothing is not lost: it is the sequence's shadow, judged token by token as the sequence takes its next tokens, as
// a sent draft would have been (the draft was made before the cut either way: prompt lookup's scan, or a draft
// model's pass). Both rates then follow the text at every token, so no probe goes out and no request measures
// itself with drafts that fail, and where a text turns to copying its drafts start at the next pass rather than at
// the next probe (as `flashflex run`'s controller does, orchestrator/speculative.py). Shadows judge free text's
// drafts all the time, and the phrases it repeats now and then lift its rates for a few tokens: a lone sequence's
// draft after a plain pass must promise 25% more tokens a second (k_entry_gain; going on, 3%), as in `run`, whose
// Gemma stories and letters drafted up to 171 tokens (5-18% kept) after lucky shadows without that margin.

#include "llama-flashflex-draft.h"

#include "llama-flashflex-json.h"

#include <algorithm>
#include <cmath>
#include <iterator>

namespace flashflex {

namespace {

constexpr size_t k_window         = 9;     // passes per size whose median is its cost ...
constexpr size_t k_plain_window   = 5;     // ... and per plain pass, which every drafted size is priced against
constexpr int    k_plain_refresh  = 32;    // passes with drafts before a plain one is measured again
constexpr int    k_drafted_expiry = 64;    // plain passes in a row after which what drafted ones cost is forgotten
constexpr double k_decay          = 0.97;  // of the acceptance's counts (a memory of ~30; see advance, judge_token)
constexpr double k_prior_accept   = 0.5;   // the acceptance before any draft was judged ...
constexpr double k_prior_weight   = 2.0;   // ... weighing as much as this many judged tokens
constexpr double k_prior_slope    = 0.1;   // a row beyond a plain pass: this share of the plain pass per sequence
constexpr double k_prior_points   = 4.0;   // the prior slope weighs as much as this many passes one row apart
constexpr double k_min_gain       = 0.03;  // a draft must beat none by this much ...
constexpr double k_entry_gain     = 0.25;  // ... or, judged by shadows, a lone sequence's first after a plain pass
constexpr double k_max_slowdown   = 0.03;  // what drafts may slow a pass for the sequences without one
constexpr int    k_min_probe_gap  = 4;
constexpr int    k_max_probe_gap  = 64;
constexpr double k_probe_budget   = 0.01;  // share of the time probes may cost
constexpr int    k_measure_tries  = 3;     // one-token drafts a new request measures its text with, at most

double median(std::deque<double> v) {
    std::sort(v.begin(), v.end());
    const size_t m = v.size() / 2;
    return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// The index just past the most recent occurrence of pat[0, len) inside hay[0, n_hay), or -1.
int64_t last_occurrence(const int32_t * hay, int64_t n_hay, const int32_t * pat, int64_t len) {
    if (len <= 0 || n_hay < len) {
        return -1;
    }
    for (int64_t s = n_hay - len; s >= 0; --s) {
        if (std::equal(pat, pat + len, hay + s)) {
            return s + len;
        }
    }
    return -1;
}

}  // namespace

// Each match must end before the last token, so a draft starts at the last token at the latest (a repeated token
// drafts itself again).
int prompt_lookup(const int32_t * ids, int64_t n_ids, int ngram, int k, int32_t * out) {
    if (ngram < 1 || k < 1 || n_ids < 2) {
        return 0;
    }
    int64_t start = n_ids > ngram ? last_occurrence(ids, n_ids - 1, ids + n_ids - ngram, ngram) : -1;
    if (start < 0 && n_ids > ngram + 1) {
        // the context before the last token, seen before with a different token after it: resume after that token
        const int64_t hit = last_occurrence(ids, n_ids - 2, ids + n_ids - 1 - ngram, ngram);
        start             = hit >= 0 ? hit + 1 : -1;
    }
    for (int64_t n = std::min<int64_t>(ngram - 1, n_ids - 1); start < 0 && n > 0; --n) {
        start = last_occurrence(ids, n_ids - 1, ids + n_ids - n, n);
    }
    if (start < 0) {
        return 0;
    }
    const int64_t len = std::min<int64_t>(k, n_ids - start);
    std::copy(ids + start, ids + start + len, out);
    return (int) len;
}

draft_pass_costs::draft_pass_costs(int n) : n(n), gap(k_min_probe_gap) {}

bool draft_pass_costs::has_plain() const {
    return seconds.count(n) > 0;
}

double draft_pass_costs::plain() const {
    return median(seconds.at(n));
}

// (rows, median) of the passes with drafts, each weighing as many passes as it has measured (a size seen once,
// perhaps while another process held the CPU, bends the line less than one seen nine times)
std::vector<std::pair<int, double>> draft_pass_costs::drafted_sizes(std::vector<double> * weights) const {
    std::vector<std::pair<int, double>> out;
    for (const auto & [rows, q] : seconds) {
        if (rows > n) {
            out.emplace_back(rows, median(q));
            if (weights) {
                weights->push_back((double) q.size());
            }
        }
    }
    return out;
}

double draft_pass_costs::pass_seconds(int rows) const {
    const double t_n = plain();
    if (rows <= n) {
        return t_n;
    }
    const double        prior = k_prior_slope * t_n / n;  // seconds per row beyond a plain pass
    std::vector<double> w;
    const auto          sizes = drafted_sizes(&w);
    double              t;
    if (sizes.size() >= 2) {
        double sw = 0, mx = 0, my = 0;
        for (size_t i = 0; i < sizes.size(); ++i) {
            sw += w[i];
            mx += w[i] * sizes[i].first;
            my += w[i] * sizes[i].second;
        }
        mx /= sw;
        my /= sw;
        double sxx = 0, sxy = 0;
        for (size_t i = 0; i < sizes.size(); ++i) {
            sxx += w[i] * (sizes[i].first - mx) * (sizes[i].first - mx);
            sxy += w[i] * (sizes[i].first - mx) * (sizes[i].second - my);
        }
        const double b = std::max(0.0, (sxy + k_prior_points * prior) / (sxx + k_prior_points));
        t              = my + b * (rows - mx);
    } else if (sizes.size() == 1) {
        // one size m measured: beyond it each row costs the mean slope from the plain pass to m; from a single row
        // at most the prior slope (on a CPU a second row switches matrix kernels and costs more than each row after
        // it; a pass of several sequences has switched already)
        const auto [m, t_m] = sizes[0];
        const double slope  = std::max(0.0, t_m - t_n) / (m - n);
        t                   = t_m + (n == 1 ? std::min(prior, slope) : slope) * (rows - m);
    } else {
        t = t_n + prior * (rows - n);
    }
    return std::min(std::max(t, t_n), t_n * rows / n);  // never cheaper than a plain pass, nor dearer than k of them
}

// m of the n sequences have a draft; sequence i may keep up to offered[i] tokens of its own, each kept with
// probability p[i] given the ones before it were, so keeping k gives it E = 1 + p + ... + p^k tokens per pass, at
// t(n) / t(R) of a plain pass's rate for a pass of R rows. No sequence may expect less than 1 - k_max_slowdown of its
// plain rate: E t(n) / t(R) >= 0.97 for each (E = 1 for one that keeps nothing, or has no draft), so drafts that pay
// a slot little cannot slow the others by much. Within that, the lengths maximise the sum over the n sequences of
// the logarithms of their rates (relative to a plain pass's). Tokens are added one at a time where they add the most
// to their sequence's logarithm (those gains shrink with each token a sequence keeps), or, where that would break
// the floor, to the sequence expecting the least (which lifts the floor); the best of the choices on the way wins.
std::vector<int> draft_pass_costs::allocate(int                         m,
                                            const std::vector<double> & first,
                                            const std::vector<double> & p,
                                            const std::vector<int> &    offered,
                                            double                      min_gain) const {
    const size_t        count = p.size();
    std::vector<int>    k(count, 0), k_best(count, 0);
    std::vector<double> expected(count, 1.0), next(first);  // 1 + f (1 + p + ... + p^(k-1)), and f p^k
    const double        t_n  = plain();
    double              gain = 0, s_best = 0;               // the score of keeping nothing is 0
    // the least any sequence expects per pass: 1 where some have no draft, else the least of the drafting ones'
    const auto          floor_of = [&](const std::vector<double> & e) {
        return m < n ? 1.0 : *std::min_element(e.begin(), e.end());
    };
    const auto fits = [&](const std::vector<double> & e, double t) {
        return floor_of(e) * t_n >= (1.0 - k_max_slowdown) * t;
    };
    for (int rows = n + 1;; ++rows) {
        int    most = -1, least = -1;  // the next token where it adds the most, and the sequence expecting the least
        double d_most = 0;
        for (size_t i = 0; i < count; ++i) {
            if (k[i] >= offered[i]) {
                continue;
            }
            const double d = std::log1p(next[i] / expected[i]);
            if (most < 0 || d > d_most) {
                most   = (int) i;
                d_most = d;
            }
            if (least < 0 || expected[i] < expected[least]) {
                least = (int) i;
            }
        }
        if (most < 0) {
            break;  // every draft kept whole
        }
        const double        t    = pass_seconds(rows);
        std::vector<double> with = expected;
        with[most] += next[most];
        const int at = fits(with, t) ? most : least;  // below the floor: lift the sequence expecting the least
        gain += std::log1p(next[at] / expected[at]);
        k[at]++;
        expected[at] += next[at];
        next[at] *= p[at];
        if (!fits(expected, t)) {
            if (m < n) {
                break;  // the sequences without a draft hold the floor at a plain pass's rate: no more rows fit
            }
            continue;   // a later token may lift the floor
        }
        const double s = gain - n * std::log(t / t_n);
        if (s > s_best) {
            s_best = s;
            k_best = k;
        }
    }
    if (s_best < n * std::log1p(min_gain)) {  // every sequence's rate up min_gain on average, or nothing
        std::fill(k_best.begin(), k_best.end(), 0);
    }
    return k_best;
}

// Passes with drafts cut to 0 before a probe: the backed-off gap, and never so short that probes cost more than
// k_probe_budget of the time.
int draft_pass_costs::probe_gap(int m) const {
    const double cost = pass_seconds(n + m) / plain() - 1.0;
    return std::max(gap, std::min(k_max_probe_gap, (int) std::ceil(cost / k_probe_budget)));
}

draft_acceptance::draft_acceptance() :
    kept_first(k_prior_accept * k_prior_weight),
    judged_first(k_prior_weight),
    kept(k_prior_accept * k_prior_weight),
    judged(k_prior_weight),
    gap(k_min_probe_gap) {}

double draft_acceptance::first() const {
    return judged_first > 0 ? kept_first / judged_first : 0.0;
}

// A draft's first token is remembered for some thirty of the sequence's passes, not of its drafts: where the text
// does not repeat a shadow is judged at every pass, while in a copy one covers up to n_max plain passes, and a memory
// of thirty drafts held a text that turned to copying at its free text's rate for some 200 tokens (Gemma 3 270M, a
// copy-edit under llama-server: 56-82 of 128 tokens drafted, against 80-107 when probes measured it). A sent draft
// is one pass, as before shadows (a memory per token taken made a copying slot's long drafts forget within four
// verifications, and a failure or two cut them short beside a weak slot: the weak sequence priced apart, in
// tests/test_draft_length.py). Each token after a kept one is remembered per judged token (judge_token).
void draft_acceptance::advance() {
    kept_first *= k_decay;
    judged_first *= k_decay;
}

double draft_acceptance::p() const {
    return judged > 0 ? kept / judged : 0.0;
}

// A sent draft judged token by token: its first, then each after a kept one up to the first rejected (the tokens
// after that one say nothing: the model never saw them follow a kept token).
void draft_acceptance::judge(int drafted, int kept_now) {
    for (int i = 0; i < drafted && i <= kept_now; ++i) {
        judge_token((size_t) i, i < kept_now);
    }
}

void draft_acceptance::judge_token(size_t index, bool kept_now) {
    if (index == 0) {
        kept_first += kept_now ? 1 : 0;  // decayed per pass of the sequence (advance)
        judged_first += 1;
    } else {
        kept   = k_decay * kept + (kept_now ? 1 : 0);
        judged = k_decay * judged + 1;
    }
}

draft_length::draft_length(bool adaptive) : adaptive(adaptive) {}

const draft_acceptance & draft_length::acceptance(int seq) const {
    static const draft_acceptance prior;
    auto                          it = by_seq.find(seq);
    return it == by_seq.end() ? prior : it->second;
}

draft_pass_costs & draft_length::costs(int n) {
    return by_n.try_emplace(n, n).first->second;
}

void draft_length::propose(int                     n,
                           int                     n_max_now,
                           const int *             seq,
                           int *                   lengths,
                           int                     count,
                           double                  now,
                           const int32_t * const * drafts) {
    shadowed = shadowed || (drafts != nullptr && adaptive);
    std::vector<int> made(lengths, lengths + std::max(0, count));
    n_max     = std::max(0, n_max_now);
    pending_n = std::max(0, n);
    pending_t = now;
    choose(n, seq, lengths, count);
    drafted_last = false;
    for (int i = 0; i < count; ++i) {
        draft_acceptance & a = by_seq[seq[i]];
        if (lengths[i] > 0) {
            drafted_last = true;
            a.shadow.clear();  // a sent draft is judged by its verification
            a.seen = 0;
        } else if (shadowed && drafts != nullptr && drafts[i] != nullptr && a.shadow.empty()) {
            const int k = std::min(std::max(made[i], 0), n_max);
            a.shadow.assign(drafts[i], drafts[i] + k);
        }
    }
}

void draft_length::taken(int seq, int32_t token) {
    auto it = by_seq.find(seq);
    if (it == by_seq.end()) {
        return;
    }
    draft_acceptance & a = it->second;
    a.advance();
    if (a.shadow.empty()) {
        return;
    }
    const bool kept_now = a.shadow[a.seen] == token;
    a.judge_token(a.seen, kept_now);
    shadow_judged++;
    shadow_kept += kept_now ? 1 : 0;
    if (kept_now && ++a.seen < a.shadow.size()) {
        return;        // judged on at the next token
    }
    a.shadow.clear();  // rejected, or taken whole
    a.seen = 0;
}

void draft_length::choose(int n, const int * seq, int * lengths, int count) {
    std::vector<int> offered(std::max(0, count));
    int              m        = 0;
    // Where shadows judge the drafts, starting to draft after a plain pass of a lone sequence must promise
    // k_entry_gain: such a start takes the rows' memory back from streamed weights and the passes after it lend it
    // again (what `flashflex run`'s controller measured on Gemma 3 270M at 215 MiB: about a plain step more in all),
    // and shadows that a phrase repeated now and then keeps judging on free text would start drafts that fail.
    const double     min_gain = shadowed && n == 1 && !drafted_last ? k_entry_gain : k_min_gain;
    for (int i = 0; i < count; ++i) {
        offered[i] = std::min(std::max(lengths[i], 0), n_max);
        m += offered[i] > 0;
        lengths[i] = 0;
    }
    m = std::min(m, pending_n);
    if (m <= 0) {
        return;  // no draft to cut
    }
    if (!adaptive) {
        std::copy(offered.begin(), offered.end(), lengths);
        return;
    }
    draft_pass_costs & c = costs(n);
    if (!c.has_plain() || c.since_plain >= k_plain_refresh) {
        // a plain pass first, and again now and then: every draft is priced against it, and where every pass
        // drafts, the plain passes measured would otherwise date from another hour of this machine
        return;
    }
    if (c.since_drafted >= k_drafted_expiry) {
        // what drafted passes cost, measured long ago: forgotten, priced by the prior again until a draft measures
        // it (one slow pass, perhaps while another process held the CPU, would otherwise price drafts out for good
        // where shadows send no probe)
        for (auto it = c.seconds.begin(); it != c.seconds.end();) {
            it = it->first > n ? c.seconds.erase(it) : std::next(it);
        }
    }
    std::vector<double> f(offered.size()), p(offered.size());
    for (int i = 0; i < count; ++i) {
        f[i] = acceptance(seq[i]).first();
        p[i] = acceptance(seq[i]).p();
    }
    const std::vector<int> k     = c.allocate(m, f, p, offered, min_gain);
    const bool             first = c.drafted_sizes(nullptr).empty();  // the first draft is one token: a row priced
    bool                   any   = false;
    for (int i = 0; i < count; ++i) {
        lengths[i] = first ? std::min(k[i], 1) : k[i];
        any        = any || k[i] > 0;
    }
    if (shadowed) {
        return;  // shadows judge every draft cut to nothing: no request measures itself, no probe goes out
    }
    measure_new_requests(c, m, f, p, seq, offered, lengths, count, first);
    if (any) {
        c.idle    = 0;
        c.probing = false;
        // A sequence passed over would never be judged again (a long request's text may start repeating): after a
        // gap of such passes, doubling while its probes fail, it drafts one token.
        for (int i = 0; i < count; ++i) {
            draft_acceptance & a = by_seq[seq[i]];
            if (k[i] > 0 || lengths[i] > 0) {  // drafting, or measuring its request (measure_new_requests)
                a.idle = 0;
            } else if (offered[i] > 0 && ++a.idle > a.gap) {
                a.idle     = 0;
                a.probing  = true;
                lengths[i] = 1;
            }
        }
        return;
    }
    if (++c.idle > c.probe_gap(m)) {  // nothing worth drafting: a one-token probe now and then
        c.idle    = 0;
        c.probing = true;
        for (int i = 0; i < count; ++i) {
            lengths[i] = std::max(lengths[i], std::min(offered[i], 1));  // not shorter than a measurement
        }
    }
}

// Where a drafted row costs about a plain pass (Gemma's 262k-wide logits, a CPU switching to batched kernels), drafts
// priced at the prior acceptance never pay, and the one-token probes that follow judge only a draft's first token:
// a request copying its context (95% kept) was held to rare probes for its whole answer. So a request measures
// itself: a one-token draft at its first pass where none was allotted (again 4 and 20 passes in while they fail) and,
// when one is kept, one as long as would pay were every token kept (none where even that would not, as beside busy
// slots that hold the floor), as after any probe kept; a request whose drafts fail pays three rows. The first draft
// of all stays one token (a row priced).
void draft_length::measure_new_requests(const draft_pass_costs &    c,
                                        int                         m,
                                        const std::vector<double> & f,
                                        const std::vector<double> & p,
                                        const int *                 seq,
                                        const std::vector<int> &    offered,
                                        int *                       lengths,
                                        int                         count,
                                        bool                        first) {
    if (c.n > 1) {
        // measured alone only: beside busy slots the rows slow every other sequence, and with SmolLM2 at four slots
        // the measurements' failed drafts took the aggregate from 1.00-1.01x undrafted to 0.77x
        return;
    }
    for (int i = 0; i < count; ++i) {
        if (offered[i] <= 0) {
            continue;
        }
        draft_acceptance & a = by_seq[seq[i]];
        if (a.measure == draft_acceptance::measure_first) {
            if (lengths[i] > 0) {
                a.measure = draft_acceptance::measured;  // the prices draft for it anyway
            } else if (a.measure_wait > 0) {
                a.measure_wait--;
            } else {
                a.measure = draft_acceptance::measuring_first;
                a.measure_tries++;
                lengths[i] = 1;
            }
        } else if (a.measure == draft_acceptance::measure_whole && !first) {
            std::vector<double> f_best = f, p_best = p;
            f_best[i] = p_best[i] = 1.0;
            const int k           = c.allocate(m, f_best, p_best, offered, k_min_gain)[i];
            a.measure             = k > lengths[i] ? draft_acceptance::measuring_whole : draft_acceptance::measured;
            lengths[i]            = std::max(lengths[i], k);
        }
    }
}

void draft_length::verified(int seq, int drafted, int kept_now) {
    if (drafted <= 0) {
        return;
    }
    kept_now             = std::max(0, std::min(kept_now, drafted));
    draft_acceptance & a = by_seq[seq];
    if (a.measure == draft_acceptance::measuring_first) {
        if (kept_now > 0) {
            a.measure = draft_acceptance::measure_whole;
        } else if (a.measure_tries < k_measure_tries) {
            a.measure      = draft_acceptance::measure_first;   // again after 3, then 15 passes: a copy-edit's first
            a.measure_wait = (1 << (2 * a.measure_tries)) - 1;  // word is often the one it corrects
        } else {
            a.measure = draft_acceptance::measured;
        }
    } else if (a.measure == draft_acceptance::measuring_whole) {
        a.measure = draft_acceptance::measured;
    }
    if (a.probing && kept_now > 0) {
        a         = draft_acceptance();  // a probe kept: the text repeats again, and what failed before says nothing
        a.measure = draft_acceptance::measure_whole;  // of it; it is measured again
    } else if (a.probing) {
        a.gap     = std::min(2 * a.gap, k_max_probe_gap);
        a.probing = false;
    }
    a.advance();
    a.judge(drafted, kept_now);
    drafted_total += drafted;
    kept_total += kept_now;
    auto it = by_n.find(pending_n);
    if (it != by_n.end() && it->second.probing) {
        draft_pass_costs & c = it->second;
        c.gap                = kept_now > 0 ? k_min_probe_gap : std::min(2 * c.gap, k_max_probe_gap);
        c.probing            = false;
        c.probes++;
        if (kept_now > 0 && a.measure == draft_acceptance::measured) {
            a.measure = draft_acceptance::measure_whole;  // a one-token probe judges no token after a kept one
        }
    }
}

void draft_length::ended(int seq) {
    // a server's slot takes another user's request next: a copy-edit's 90% says nothing of a chat that follows (its
    // long drafts then failed for ~30 tokens while the estimate decayed, and slowed the slots beside it)
    by_seq.erase(seq);
}

void draft_length::passed(int rows, bool generation_only, double now) {
    const int n = pending_n;
    pending_n   = 0;
    if (n == 0 || !generation_only || rows < n) {
        return;  // nothing asked, or a prompt's tokens in it: not a pass of n sequences' rows
    }
    draft_pass_costs & c = costs(n);
    auto &             q = c.seconds[rows];
    q.push_back(now - pending_t);
    if (q.size() > (rows == n ? k_plain_window : k_window)) {
        q.pop_front();
    }
    c.since_plain   = rows == n ? 0 : c.since_plain + 1;
    c.since_drafted = rows == n ? c.since_drafted + 1 : 0;
}

std::string draft_length::json() const {
    double                   mean = 0, mean_continued = 0;
    std::vector<std::string> sequences, acceptances;
    for (const auto & [seq, a] : by_seq) {
        mean += a.first() / by_seq.size();
        mean_continued += a.p() / by_seq.size();
        acceptances.push_back(
            json_object().add("sequence", seq).add("estimate", a.first()).add("continued", a.p()).str());
    }
    if (by_seq.empty()) {
        mean           = draft_acceptance().first();
        mean_continued = draft_acceptance().p();
    }
    for (const auto & [n, c] : by_n) {
        std::vector<std::string> passes;
        for (const auto & [rows, q] : c.seconds) {
            passes.push_back(
                json_object().add("rows", rows).add("passes", q.size()).add("median_seconds", median(q)).str());
        }
        json_object o;
        o.add("sequences", n).add("probes", c.probes);
        if (c.has_plain()) {
            // every sequence drafting n_max tokens, each kept as often as the sequences' mean
            const std::vector<int> k =
                adaptive ? c.allocate(n, std::vector<double>(n, mean), std::vector<double>(n, mean_continued),
                                      std::vector<int>(n, n_max), k_min_gain) :
                           std::vector<int>(n, n_max);
            o.add("next_length_all_drafting", *std::max_element(k.begin(), k.end()));
        }
        sequences.push_back(o.add_array("passes_by_rows", passes).str());
    }
    return json_object()
        .add("adaptive", adaptive)
        .add("shadowed", shadowed)
        .add("acceptance_estimate", mean)
        .add("acceptance_continued", mean_continued)
        .add_array("acceptance_by_sequence", acceptances)
        .add("drafted", drafted_total)
        .add("kept", kept_total)
        .add("shadow_judged", shadow_judged)
        .add("shadow_kept", shadow_kept)
        .add_array("by_sequences", sequences)
        .str();
}

}  // namespace flashflex
