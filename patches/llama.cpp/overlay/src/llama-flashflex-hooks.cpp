// flashflex call sites: the functions upstream files call (llama-flashflex-internal.h). Each hands the model to
// the execution paths its configuration asks for (dense streaming, MoE slot banks). A model loaded without a
// configuration never reaches either path: every call site is then a no-op, so the stock path stays stock.

#include "ggml.h"
#include "llama-flashflex-config.h"
#include "llama-flashflex-draft.h"
#include "llama-flashflex-internal.h"
#include "llama-flashflex-io.h"
#include "llama-flashflex-runtime.h"
#include "llama-flashflex.h"
#include "llama-graph.h"
#include "llama-impl.h"
#include "llama-model-loader.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

using namespace flashflex;

namespace {

thread_local std::string g_model_error;

// The scheduler and CPU backend of the graph being built on this thread (llama_flashflex_graph_scope).
thread_local ggml_backend_sched_t g_sched       = nullptr;
thread_local ggml_backend_t       g_backend_cpu = nullptr;

// Process-wide, like the signal it stands for: set from Python when SIGINT arrives during llama_decode (a
// watcher thread runs while the decode holds no GIL), cleared before the next run.
std::atomic<bool> g_interrupt{ false };

// The context each streamed or banked model serves. Their runtime state (ring slots, bank slots, LRU, replay
// position) belongs to the model and is changed by decoding, so a second context decoding on the same model
// would evict what the first is computing with: it is refused.
std::mutex                                           g_contexts_mutex;
std::map<const llama_model *, const llama_context *> g_context_of;
std::map<const llama_context *, output_rows>         g_output_rows;     // of those contexts
std::map<const llama_model *, bool>                  g_draft_adaptive;  // each planned model's spec: draft_adaptive
std::set<const llama_model *>                        g_prompt_lookup;   // planned models whose spec: prompt_lookup 1
std::map<const llama_model *, int>                   g_gather_ms;       // planned models' spec: gather_ms > 0

// The draft length of each of those contexts (llama_flashflex_draft_*): asked and told by the thread that decodes,
// read by a server's stats route.
std::mutex                                    g_draft_mutex;
std::map<const llama_context *, draft_length> g_draft;

bool runs_flashflex(const llama_model * model) {
    return stream_active(model) || bank_active(model);
}

// A spec belongs to one model file: a load of another (a spec kept after the model was replaced, or handed to
// another model) is refused before anything is read. Each streamed and banked tensor is checked again by its setup.
void check_model(const config & cfg, const llama_model_loader & ml, const char * spec_path) {
    const uint64_t size = ml.files.empty() ? 0 : (uint64_t) ml.files[0]->size();
    if (size != cfg.model_bytes) {
        throw std::runtime_error(
            format("flashflex: the spec %s was planned for %s (%llu bytes), and this model has "
                   "%llu bytes: plan this model (flashflex exec / flashflex run plan it)",
                   spec_path, cfg.model_path.c_str(), (unsigned long long) cfg.model_bytes, (unsigned long long) size));
    }
}

// The weights the spec of the load in progress keeps in the file's layout (llama_flashflex_weight_buft): read once
// per load, when its first tensor is created; forgotten when the load places its tensors.
std::mutex                 g_layout_mutex;
const llama_model_loader * g_layout_loader = nullptr;
std::string                g_layout_spec;
std::set<std::string>      g_layout_names;

}  // namespace

bool flashflex::interrupt_requested() {
    return g_interrupt.load(std::memory_order_relaxed);
}

const char * llama_flashflex_model_error(const llama_model * model) {
    std::string err;
    if (!stream_failed(model, &err) && !bank_failed(model, &err)) {
        return nullptr;
    }
    g_model_error = err;
    return g_model_error.c_str();
}

void llama_flashflex_interrupt(bool on) {
    g_interrupt.store(on, std::memory_order_relaxed);
}

bool llama_flashflex_abort_callback(void * model) {
    if (g_interrupt.load(std::memory_order_relaxed)) {
        return true;
    }
    const auto * m = (const llama_model *) model;
    return m != nullptr && (stream_failed(m, nullptr) || bank_failed(m, nullptr));
}

// -------------------------------------------------------------------------------------------------------------
// Call sites (llama-flashflex-internal.h)

// What stream and bank setup take over at load (llama-flashflex-runtime.h).
flashflex::loader_tensor_map flashflex::loader_tensors(llama_model_loader & ml) {
    loader_tensor_map out;
    for (auto & [key, ctx_ptr] : ml.ctx_map) {
        for (ggml_tensor * t = ggml_get_first_tensor(ctx_ptr.get()); t; t = ggml_get_next_tensor(ctx_ptr.get(), t)) {
            out[ggml_get_name(t)] = { t, key.buft };
        }
    }
    return out;
}

ggml_backend_buffer_type_t llama_flashflex_weight_buft(const llama_model_loader & ml,
                                                       const char *               name,
                                                       ggml_backend_buffer_type_t buft) {
    auto ov = ml.kv_overrides.find(LLAMA_FLASHFLEX_SPEC_KEY);
    if (ov == ml.kv_overrides.end() || ov->second.tag != LLAMA_KV_OVERRIDE_TYPE_STR) {
        return buft;  // stock path (a bad override is refused by llama_flashflex_on_tensors_created)
    }
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    if (buft == ggml_backend_cpu_buffer_type() || dev == nullptr ||
        ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
        return buft;  // already the file's layout, or another device's type (a GPU's, its pinned host memory)
    }
    std::lock_guard<std::mutex> lk(g_layout_mutex);
    if (g_layout_loader != &ml || g_layout_spec != ov->second.val_str) {
        g_layout_loader = &ml;
        g_layout_spec   = ov->second.val_str;
        g_layout_names.clear();
        try {
            const config cfg = read_spec(g_layout_spec);
            g_layout_names.insert(cfg.file_layout.begin(), cfg.file_layout.end());
        } catch (const std::exception &) {
            // refused with its reason once every tensor is created (llama_flashflex_on_tensors_created)
        }
    }
    return g_layout_names.count(name) ? ggml_backend_cpu_buffer_type() : buft;
}

void llama_flashflex_on_tensors_created(const llama_model & model, llama_model_loader & ml) {
    {
        std::lock_guard<std::mutex> lk(g_layout_mutex);
        g_layout_loader = nullptr;
        g_layout_spec.clear();
        g_layout_names.clear();
    }
    auto ov = ml.kv_overrides.find(LLAMA_FLASHFLEX_SPEC_KEY);
    if (ov == ml.kv_overrides.end()) {
        return;  // stock path
    }
    try {
        if (ov->second.tag != LLAMA_KV_OVERRIDE_TYPE_STR) {
            throw std::runtime_error("flashflex: the " LLAMA_FLASHFLEX_SPEC_KEY
                                     " override must be a string (str:PATH of a spec file)");
        }
        const config cfg = read_spec(ov->second.val_str);
        check_model(cfg, ml, ov->second.val_str);
        const loader_tensor_map tensors = loader_tensors(ml);
        for (const auto & name : cfg.file_layout) {
            if (!tensors.count(name)) {
                throw std::runtime_error(
                    format("flashflex: the spec keeps %s in the file's layout, which this model "
                           "does not have (a plan made for another model?)",
                           name.c_str()));
            }
        }
        if (ml.use_mmap && (!cfg.tensors.empty() || !cfg.banks.empty())) {
            throw std::runtime_error(
                "flashflex: a flashflex spec needs the model loaded without mmap "
                "(use_mmap=False; --no-mmap for llama.cpp's programs, which flashflex exec adds)");
        }
        if (!cfg.tensors.empty()) {
            stream_setup(model, ml, cfg);
        }
        if (!cfg.banks.empty()) {
            bank_setup(model, ml, cfg);
        }
        std::lock_guard<std::mutex> lk(g_contexts_mutex);
        g_draft_adaptive[&model] = cfg.draft_adaptive != 0;
        if (cfg.prompt_lookup != 0) {
            g_prompt_lookup.insert(&model);
        }
        if (cfg.gather_ms > 0) {
            g_gather_ms[&model] = cfg.gather_ms;
        }
    } catch (const std::exception & e) {
        stream_free(&model);
        bank_free(&model);
        refuse(e.what());
        throw;
    }
}

bool llama_flashflex_ctx_is_placed(const llama_model & model, ggml_context * ctx) {
    if (!runs_flashflex(&model)) {
        return false;
    }
    // placed = flashflex already gave every tensor of the context its memory
    ggml_tensor * t = ggml_get_first_tensor(ctx);
    if (!t) {
        return false;
    }
    for (; t; t = ggml_get_next_tensor(ctx, t)) {
        if (t->data == nullptr) {
            return false;
        }
    }
    return true;
}

void llama_flashflex_on_model_free(const llama_model * model) {
    stream_free(model);
    bank_free(model);
    std::lock_guard<std::mutex> lk(g_contexts_mutex);
    g_context_of.erase(model);
    g_draft_adaptive.erase(model);
    g_prompt_lookup.erase(model);
    g_gather_ms.erase(model);
}

void llama_flashflex_on_context_created(const llama_model & model, const llama_context * ctx) {
    if (!runs_flashflex(&model)) {
        return;
    }
    std::lock_guard<std::mutex> lk(g_contexts_mutex);
    auto                        it = g_context_of.find(&model);
    if (it != g_context_of.end() && it->second != ctx) {
        const std::string why =
            "flashflex: this model already has a context, and a model that streams weights or "
            "banks experts serves one context at a time (free the other context, or load the "
            "model a second time)";
        refuse(why);
        throw std::runtime_error(why);
    }
    g_context_of[&model]                 = ctx;
    auto                        adaptive = g_draft_adaptive.find(&model);
    std::lock_guard<std::mutex> dk(g_draft_mutex);
    g_draft.erase(ctx);
    g_draft.emplace(ctx, draft_length(adaptive == g_draft_adaptive.end() || adaptive->second));
}

void llama_flashflex_on_context_free(const llama_model & model, const llama_context * ctx) {
    std::lock_guard<std::mutex> lk(g_contexts_mutex);
    auto                        it = g_context_of.find(&model);
    if (it != g_context_of.end() && it->second == ctx) {
        g_context_of.erase(it);
        stream_context_free(&model);
    }
    g_output_rows.erase(ctx);
    std::lock_guard<std::mutex> dk(g_draft_mutex);
    g_draft.erase(ctx);
}

void llama_flashflex_on_output_reserved(const llama_context * ctx,
                                        ggml_backend_buffer_t buf,
                                        size_t                logits_bytes,
                                        bool                  shared) {
    std::lock_guard<std::mutex> lk(g_contexts_mutex);
    auto it = std::find_if(g_context_of.begin(), g_context_of.end(), [&](const auto & kv) { return kv.second == ctx; });
    if (it == g_context_of.end()) {
        return;  // a stock context (or one of a model without a flashflex path): nothing to record
    }
    output_rows & o = g_output_rows[ctx];
    if (o.buf != buf) {
        o = output_rows{ buf, 0, false };                     // reallocated: what an earlier buffer held is gone
    }
    o.logits_bytes = std::max(o.logits_bytes, logits_bytes);  // rows a larger batch wrote stay until given back
    o.shared       = o.shared || shared;
}

bool flashflex::output_rows_of(const llama_context * ctx, output_rows & out) {
    std::lock_guard<std::mutex> lk(g_contexts_mutex);
    auto                        it = g_output_rows.find(ctx);
    if (it == g_output_rows.end() || it->second.buf == nullptr) {
        return false;
    }
    out = it->second;
    return true;
}

llama_flashflex_graph_scope::llama_flashflex_graph_scope(const llama_model *  model,
                                                         ggml_backend_sched_t sched,
                                                         ggml_backend_t       backend_cpu,
                                                         llm_graph_result *   res) :
    res(res) {
    g_sched       = sched;
    g_backend_cpu = backend_cpu;
    stream_graph_begin(model);
    bank_graph_begin(model);
}

llama_flashflex_graph_scope::~llama_flashflex_graph_scope() {
    stream_graph_end(res != nullptr ? res->get_gf() : nullptr);
    bank_graph_end();
    g_sched       = nullptr;
    g_backend_cpu = nullptr;
}

ggml_tensor * flashflex::pin_to_cpu(ggml_tensor * t) {
    if (t != nullptr && g_sched != nullptr && g_backend_cpu != nullptr) {
        ggml_backend_sched_set_tensor_backend(g_sched, t, g_backend_cpu);
    }
    return t;
}

ggml_tensor * llama_flashflex_layer_boundary(ggml_context * ctx, ggml_tensor * cur, int il_done) {
    return bank_boundary(ctx, stream_boundary(ctx, cur, il_done), il_done);
}

ggml_tensor * llama_flashflex_weight_use(ggml_context * ctx, ggml_tensor * w, ggml_tensor * cur) {
    return stream_weight_use(ctx, w, cur);
}

ggml_tensor * llama_flashflex_mul_mat_id(ggml_context * ctx, ggml_tensor * as, ggml_tensor * b, ggml_tensor * ids) {
    return bank_mul_mat_id(ctx, as, b, ids);
}

uint32_t llama_flashflex_graph_nodes(const llama_model & model, uint32_t n_tokens) {
    return stream_graph_nodes(&model) + bank_graph_nodes(&model, n_tokens);
}

// -------------------------------------------------------------------------------------------------------------
// Drafting's length (llama-flashflex-draft.h): one per context of a planned model; a stock context keeps the
// program's own length.

void llama_flashflex_draft_lengths(llama_context *      ctx,
                                   int32_t              n_sequences,
                                   int32_t              n_max,
                                   const llama_seq_id * seq_ids,
                                   int32_t *            lengths,
                                   int32_t              n_drafting) {
    llama_flashflex_draft_lengths_with_tokens(ctx, n_sequences, n_max, seq_ids, nullptr, lengths, n_drafting);
}

void llama_flashflex_draft_lengths_with_tokens(llama_context *             ctx,
                                               int32_t                     n_sequences,
                                               int32_t                     n_max,
                                               const llama_seq_id *        seq_ids,
                                               const llama_token * const * drafts,
                                               int32_t *                   lengths,
                                               int32_t                     n_drafting) {
    static_assert(sizeof(llama_seq_id) == sizeof(int) && sizeof(int32_t) == sizeof(int), "32-bit ids and lengths");
    static_assert(sizeof(llama_token) == sizeof(int32_t), "llama_token is a 32-bit token id");
    const bool valid = n_drafting >= 0 && (n_drafting == 0 || (seq_ids != nullptr && lengths != nullptr));
    {
        std::lock_guard<std::mutex> lk(g_draft_mutex);
        auto                        it = g_draft.find(ctx);
        if (it != g_draft.end() && valid) {
            it->second.propose(n_sequences, n_max, seq_ids, lengths, n_drafting, now_ns() / 1e9, drafts);
        }
    }
    if (!valid) {
        return;
    }
    // the pass about to be decoded asks for a row per drafted token beyond each sequence's own: where the plan lends
    // those rows' memory to streamed weights, they take it back now, or lend it again at a pass without drafts of at
    // most one sequence (a refusal, -1, leaves nothing lent: the rows then keep their memory, as without a lending
    // plan). Not at a plain pass of several: with several sequences most passes draft, and each lend and take-back
    // moves tensors between the ring and the lent memory (reads in flight drained, homes placed again): lent again
    // at every plain pass between drafted ones, four requests at once ran at 0.66-1.00x undrafted against 0.94-1.06x
    // with the rows kept (SmolLM2 under 110 MiB, docs/benchmarks.md)
    int32_t n_rows = 0;
    for (int32_t i = 0; i < n_drafting; ++i) {
        n_rows += std::max(0, lengths[i]);
    }
    const llama_model * model = llama_get_model(ctx);
    if (llama_model_is_recurrent(model) || llama_model_is_hybrid(model)) {
        // such a memory cannot drop the rejected part of a draft: llama-server replays the kept part in a pass no
        // draft announces here, whose rows would find their memory lent; the rows keep it
        n_rows = std::numeric_limits<int32_t>::max();
    }
    if ((n_rows > 0 || n_sequences <= 1) && llama_flashflex_lend_rows(ctx, n_rows) < 0) {
        static std::atomic<bool> said{ false };  // the same refusal at every pass: said once
        if (!said.exchange(true)) {
            LLAMA_LOG_WARN("%s (the rows keep their memory)\n", llama_flashflex_last_error());
        }
    }
}

void llama_flashflex_draft_verified(llama_context * ctx, llama_seq_id seq_id, int32_t n_drafted, int32_t n_kept) {
    std::lock_guard<std::mutex> lk(g_draft_mutex);
    auto                        it = g_draft.find(ctx);
    if (it != g_draft.end()) {
        it->second.verified(seq_id, n_drafted, n_kept);
    }
}

void llama_flashflex_draft_taken(llama_context * ctx, llama_seq_id seq_id, llama_token token) {
    std::lock_guard<std::mutex> lk(g_draft_mutex);
    auto                        it = g_draft.find(ctx);
    if (it != g_draft.end()) {
        it->second.taken(seq_id, token);
    }
}

void llama_flashflex_draft_end(llama_context * ctx, llama_seq_id seq_id) {
    std::lock_guard<std::mutex> lk(g_draft_mutex);
    auto                        it = g_draft.find(ctx);
    if (it != g_draft.end()) {
        it->second.ended(seq_id);
    }
}

void llama_flashflex_draft_pass(llama_context * ctx, int32_t n_rows, bool generation_only) {
    std::lock_guard<std::mutex> lk(g_draft_mutex);
    auto                        it = g_draft.find(ctx);
    if (it != g_draft.end()) {
        it->second.passed(n_rows, generation_only, now_ns() / 1e9);
    }
}

int32_t llama_flashflex_draft_stats(const llama_context * ctx, char * buf, size_t buf_size) {
    std::lock_guard<std::mutex> lk(g_draft_mutex);
    auto                        it = g_draft.find(ctx);
    return it == g_draft.end() ? -1 : write_c_string(it->second.json(), buf, buf_size);
}

int32_t llama_flashflex_prompt_lookup(const llama_token * context,
                                      int32_t             n_context,
                                      int32_t             ngram,
                                      int32_t             n_max,
                                      llama_token *       draft) {
    static_assert(sizeof(llama_token) == sizeof(int32_t), "llama_token is a 32-bit token id");
    if (context == nullptr || draft == nullptr || n_context < 0) {
        return 0;
    }
    return prompt_lookup(context, n_context, ngram, n_max, draft);
}

// Process-wide because llama.cpp's drafters see tokens, not the context they decode for: a program runs one plan.
bool llama_flashflex_prompt_lookup_planned(void) {
    std::lock_guard<std::mutex> lk(g_contexts_mutex);
    return !g_prompt_lookup.empty();
}

// Process-wide too: a server's task queue knows no model. Under a streaming plan a pass costs a whole read of the
// streamed weights, however few prompts it carries: requests sent together that reach an idle server a few
// milliseconds apart would otherwise go through in two passes, the first carrying the first request alone (seen with
// eight requests at once: one prompt launched, the other seven a pass later).
int32_t llama_flashflex_gather(void) {
    int ms = 0;
    {
        std::lock_guard<std::mutex> lk(g_contexts_mutex);
        for (const auto & [model, v] : g_gather_ms) {
            ms = std::max(ms, v);
        }
    }
    if (ms > 0) {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    }
    return ms;
}
