// flashflex: what both execution paths (dense streaming, MoE slot banks) use to read weights — the model
// files, full preads, the first failure of a runtime, one pool of I/O threads, and the per-model registry
// that finds a model's runtime from the call sites.

#pragma once

#include "ggml-backend.h"

#include <time.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

struct llama_model;

namespace flashflex {

constexpr size_t k_page = 4096;  // O_DIRECT granularity for offsets, lengths and addresses

inline size_t align_up(size_t x, size_t a) {
    return (x + a - 1) / a * a;
}

inline int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

// CPU time of the calling thread: what work on a shared core costs, without the time it waited for the core.
inline int64_t thread_cpu_ns() {
    timespec t{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (int64_t) t.tv_sec * 1000000000 + t.tv_nsec;
}

// The model layer a tensor name belongs to ("blk.N."), or -1.
int layer_of(const std::string & name);

// Whether the weights the loader put in buft can be read from the model files by this process (dense streaming,
// slot banks): a CPU buffer type (plain or repacked) or host memory — such as the pinned host buffer type a GPU
// backend gives the layers left on the host beside it (Vulkan_Host, CUDA_Host). Memory of another device (a
// GPU's own buffer, an RPC worker's) is not.
bool weights_in_host_memory(ggml_backend_buffer_type_t buft);

// Throws std::runtime_error, "flashflex: <name> is placed on <buft>; <path> ... host memory only", unless
// weights_in_host_memory(buft). path: "dense streaming supports", "slot banks support".
void require_host_weights(const std::string & name, ggml_backend_buffer_type_t buft, const char * path);

struct open_file {
    std::string path;
    int         fd = -1;
};

// Opens files for reading; with direct_io > 0 probes O_DIRECT with one aligned read and falls back to
// buffered reads (all files alike) unless direct_io == 2. Throws std::runtime_error naming the file.
std::vector<open_file> open_files(const std::vector<std::string> & paths, int direct_io, bool & direct);
void                   close_files(std::vector<open_file> & files);

// Maps one `size` bytes of shared memory twice, at [at, at + size) and [at + size, at + 2 size), over what is
// mapped there now (`at` page-aligned, `size` a multiple of the page): a ring whose homes run on past its end
// into the second mapping. Returns false (nothing changed) where the platform cannot (Linux's memfd only).
bool map_mirrored(void * at, size_t size);

// Puts fresh private anonymous memory back over [at, at + 2 size) after map_mirrored, so whoever owns the range
// (a ggml buffer's allocation) frees ordinary memory.
void unmap_mirrored(void * at, size_t size);

// Private anonymous memory of `size` bytes (a page multiple), untouched: it takes no RAM until written. nullptr when
// the system refuses.
uint8_t * map_pages(size_t size);
void      unmap_pages(uint8_t * at, size_t size);
// Gives the pages wholly inside [begin, end) back to the system: private anonymous memory reads as zeros afterwards
// and takes RAM again only when written. Returns the bytes given back (0 where the platform cannot).
size_t    release_pages(void * begin, void * end);

// pread until [dst, dst + len) is filled or the file ends; returns bytes read, or -1 with errno set.
long long pread_full(int fd, void * dst, size_t len, uint64_t offset);

// The sidecar's per-expert checksum: the expert's bytes as little-endian 64-bit words w_i (the last one
// zero-padded), sum of w_i * (2i + 1) mod 2^64. Any change of one word changes it (odd weights are invertible),
// it runs faster than memory on any CPU, and numpy computes the same at extraction.
uint64_t expert_checksum(const void * data, size_t n);

// The first error of a model's runtime. Once set, reads stop, call sites stop waiting and the abort callback
// ends the graph, so llama_decode returns an error instead of computing on bad data.
class failure {
  public:
    // Records msg unless an earlier error was recorded; logs it either way.
    void set(const std::string & msg);

    bool is_set() const { return flag.load(std::memory_order_acquire); }

    std::string message() const;

  private:
    std::atomic<bool>  flag{ false };
    mutable std::mutex mtx;
    std::string        msg;
};

// A read for the I/O pool. `wanted` and `done` run under the pool's lock (so they may touch whatever state the
// owner guards with it); `run` runs outside it, with the thread's own page-aligned staging buffer. A job is not
// run when `wanted` says no or the runtime has failed; `done` runs in every case.
struct io_job {
    std::function<bool()>       wanted;  // null: always
    std::function<void(void *)> run;
    std::function<void()>       done;    // null: nothing to record
};

// One pool of I/O threads per runtime. The owner guards its own read bookkeeping with mutex() and waits on
// done_cv(), which is notified after every job and on stop.
class io_pool {
  public:
    ~io_pool() { stop(); }

    // Starts n threads, each with a page-aligned staging buffer of staging_bytes (none when 0). A thread that
    // cannot allocate its buffer fails the runtime.
    void start(int n_threads, size_t staging_bytes, failure & fail);
    // Wakes every waiter, drops queued jobs and joins the threads.
    void stop();

    int threads() const { return (int) workers.size(); }

    std::mutex & mutex() { return mtx; }

    std::condition_variable & done_cv() { return cv_done; }

    bool stopping() const { return stop_requested; }  // under mutex()

    // Under mutex(): queue a job behind (or, urgent, ahead of) the queued ones; then call wake().
    void push(io_job job, bool urgent = false);

    void wake() { cv_jobs.notify_all(); }

  private:
    void worker_main(size_t staging_bytes, failure * fail);

    std::mutex               mtx;
    std::condition_variable  cv_jobs;
    std::condition_variable  cv_done;
    std::deque<io_job>       jobs;
    std::vector<std::thread> workers;
    bool                     stop_requested = false;
};

// The runtimes of one execution path, one per model, found from the call sites by model pointer.
template <typename T> class model_registry {
  public:
    T * find(const llama_model * model) {
        std::lock_guard<std::mutex> lk(mtx);
        auto                        it = map.find(model);
        return it == map.end() ? nullptr : it->second.get();
    }

    void add(const llama_model * model, std::unique_ptr<T> runtime) {
        std::lock_guard<std::mutex> lk(mtx);
        map[model] = std::move(runtime);
    }

    // Removes the model's runtime and hands it to the caller (who stops it outside the registry lock).
    std::unique_ptr<T> take(const llama_model * model) {
        std::lock_guard<std::mutex> lk(mtx);
        auto                        it = map.find(model);
        if (it == map.end()) {
            return nullptr;
        }
        std::unique_ptr<T> out = std::move(it->second);
        map.erase(it);
        return out;
    }

    // Removes the model's runtime and stops it (T::stop(), outside the registry lock); none: nothing to do.
    void remove(const llama_model * model) {
        if (std::unique_ptr<T> runtime = take(model)) {
            runtime->stop();
        }
    }

    // Whether the model has a runtime that failed (T::failed, a failure); its reason into *error when asked.
    bool failed(const llama_model * model, std::string * error) {
        T * runtime = find(model);
        if (!runtime || !runtime->failed.is_set()) {
            return false;
        }
        if (error) {
            *error = runtime->failed.message();
        }
        return true;
    }

  private:
    std::mutex                                                  mtx;
    std::unordered_map<const llama_model *, std::unique_ptr<T>> map;
};

}  // namespace flashflex
