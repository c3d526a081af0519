// flashflex: shared I/O (see llama-flashflex-io.h).

#include "llama-flashflex-io.h"

#include "llama-impl.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace flashflex {

bool map_mirrored(void * at, size_t size) {
#if defined(__linux__) && defined(MFD_CLOEXEC)
    const int fd = memfd_create("flashflex-ring", MFD_CLOEXEC);
    if (fd < 0) {
        return false;
    }
    bool ok = ftruncate(fd, (off_t) size) == 0;
    for (int half = 0; half < 2 && ok; ++half) {
        void * want = (uint8_t *) at + half * size;
        ok          = mmap(want, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0) == want;
    }
    close(fd);  // the mappings keep the memory
    if (!ok) {
        unmap_mirrored(at, size);
    }
    return ok;
#else
    (void) at;
    (void) size;
    return false;
#endif
}

void unmap_mirrored(void * at, size_t size) {
    if (mmap(at, 2 * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != at) {
        // the range would alias itself if freed and reused: no safe way on
        LLAMA_LOG_ERROR("flashflex: cannot unmap the mirrored streaming ring: %s\n", strerror(errno));
        abort();
    }
}

uint8_t * map_pages(size_t size) {
    void * p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : (uint8_t *) p;
}

void unmap_pages(uint8_t * at, size_t size) {
    munmap(at, size);
}

size_t release_pages(void * begin, void * end) {
    const size_t b = align_up((size_t) begin, k_page);
    const size_t e = (size_t) end / k_page * k_page;
    if (e <= b) {
        return 0;
    }
#if defined(MADV_DONTNEED)
    return madvise((void *) b, e - b, MADV_DONTNEED) == 0 ? e - b : 0;
#else
    return 0;
#endif
}

std::vector<open_file> open_files(const std::vector<std::string> & paths, int direct_io, bool & direct) {
    direct = direct_io > 0;
    std::vector<open_file> files;
    void *                 probe = nullptr;
    if (posix_memalign(&probe, k_page, k_page) != 0) {
        throw std::runtime_error("flashflex: out of memory");
    }
    auto fail = [&](const std::string & msg) {
        free(probe);
        close_files(files);
        throw std::runtime_error(msg);
    };
    for (const auto & path : paths) {
        open_file fh;
        fh.path = path;
#ifdef O_DIRECT
        if (direct) {
            fh.fd = open(path.c_str(), O_RDONLY | O_DIRECT);
            if (fh.fd >= 0 && pread(fh.fd, probe, k_page, 0) < 0) {
                close(fh.fd);
                fh.fd = -1;
            }
            if (fh.fd < 0 && errno != ENOENT) {
                if (direct_io >= 2) {
                    fail(
                        format("flashflex: direct I/O is not available for %s (%s) and strict direct I/O was "
                               "requested",
                               path.c_str(), strerror(errno)));
                }
                LLAMA_LOG_WARN("flashflex: direct I/O unavailable for %s (%s); using buffered reads\n", path.c_str(),
                               strerror(errno));
                direct = false;
            }
        }
#else
        if (direct && direct_io >= 2) {
            fail("flashflex: direct I/O is not supported on this platform");
        }
        direct = false;
#endif
        if (fh.fd < 0) {
            fh.fd = open(path.c_str(), O_RDONLY);
            if (fh.fd < 0) {
                fail(format("flashflex: cannot open %s: %s", path.c_str(), strerror(errno)));
            }
        }
        files.push_back(fh);
    }
    free(probe);
    if (!direct) {
        // a file opened with O_DIRECT before a later one fell back: reopen everything buffered
        for (auto & fh : files) {
            close(fh.fd);
            fh.fd = open(fh.path.c_str(), O_RDONLY);
            if (fh.fd < 0) {
                const std::string msg = format("flashflex: cannot open %s: %s", fh.path.c_str(), strerror(errno));
                close_files(files);
                throw std::runtime_error(msg);
            }
        }
    }
    return files;
}

void close_files(std::vector<open_file> & files) {
    for (auto & f : files) {
        if (f.fd >= 0) {
            close(f.fd);
            f.fd = -1;
        }
    }
}

long long pread_full(int fd, void * dst, size_t len, uint64_t offset) {
    size_t done = 0;
    while (done < len) {
        const ssize_t n = pread(fd, (uint8_t *) dst + done, len - done, (off_t) (offset + done));
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (n == 0) {
            break;
        }
        done += (size_t) n;
    }
    return (long long) done;
}

// Computed without a multiply per word, so it vectorises on any CPU (SSE2, NEON) and runs well above memory
// speed on a freshly read expert. With the words in lanes l = i mod 8 and blocks m = i / 8,
// sum_i w_i * i = sum_l (8 * sum_m m * w_{8m+l} + l * S_l), and sum_m m * w_{8m+l} = (blocks - 1) * S_l - R_l,
// where S_l is the lane's sum and R_l the sum of its running sums before each block: two additions per word.
uint64_t expert_checksum(const void * data, size_t n) {
    const uint8_t * p      = (const uint8_t *) data;
    const size_t    words  = n / 8;
    const size_t    blocks = words / 8;
    uint64_t        S[8];
    uint64_t        R[8];
#if defined(__GNUC__) || defined(__clang__)
    typedef uint64_t u64x2 __attribute__((vector_size(16)));
    u64x2            s0 = {}, s1 = {}, s2 = {}, s3 = {}, r0 = {}, r1 = {}, r2 = {}, r3 = {};
    for (size_t m = 0; m < blocks; ++m) {
        u64x2 w0, w1, w2, w3;
        memcpy(&w0, p + 64 * m, 16);
        memcpy(&w1, p + 64 * m + 16, 16);
        memcpy(&w2, p + 64 * m + 32, 16);
        memcpy(&w3, p + 64 * m + 48, 16);
        r0 += s0;
        r1 += s1;
        r2 += s2;
        r3 += s3;
        s0 += w0;
        s1 += w1;
        s2 += w2;
        s3 += w3;
    }
    memcpy(S, &s0, 16);
    memcpy(S + 2, &s1, 16);
    memcpy(S + 4, &s2, 16);
    memcpy(S + 6, &s3, 16);
    memcpy(R, &r0, 16);
    memcpy(R + 2, &r1, 16);
    memcpy(R + 4, &r2, 16);
    memcpy(R + 6, &r3, 16);
#else
    memset(S, 0, sizeof(S));
    memset(R, 0, sizeof(R));
    for (size_t m = 0; m < blocks; ++m) {
        for (int l = 0; l < 8; ++l) {
            uint64_t w;
            memcpy(&w, p + 64 * m + 8 * l, 8);
            R[l] += S[l];
            S[l] += w;
        }
    }
#endif
    uint64_t sum = 0;
    for (int l = 0; l < 8; ++l) {
        const uint64_t lane_mw = (blocks ? (uint64_t) blocks - 1 : 0) * S[l] - R[l];
        sum += 2 * (8 * lane_mw + (uint64_t) l * S[l]) + S[l];
    }
    for (size_t i = blocks * 8; i < words; ++i) {
        uint64_t w;
        memcpy(&w, p + 8 * i, 8);
        sum += w * (2 * (uint64_t) i + 1);
    }
    if (n % 8) {
        uint64_t w = 0;
        memcpy(&w, p + 8 * words, n % 8);
        sum += w * (2 * (uint64_t) words + 1);
    }
    return sum;
}

bool weights_in_host_memory(ggml_backend_buffer_type_t buft) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    return !dev || ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU || ggml_backend_buft_is_host(buft);
}

void require_host_weights(const std::string & name, ggml_backend_buffer_type_t buft, const char * path) {
    if (!weights_in_host_memory(buft)) {
        throw std::runtime_error(
            format("flashflex: %s is placed on %s; %s weights in host memory only (CPU, or a "
                   "GPU's host buffer), not on a device",
                   name.c_str(), ggml_backend_buft_name(buft), path));
    }
}

int layer_of(const std::string & name) {
    int il = -1;
    if (sscanf(name.c_str(), "blk.%d.", &il) != 1) {
        return -1;
    }
    return il;
}

void failure::set(const std::string & m) {
    {
        std::lock_guard<std::mutex> lk(mtx);
        if (msg.empty()) {
            msg = m;
        }
    }
    flag.store(true, std::memory_order_release);
    LLAMA_LOG_ERROR("flashflex: %s\n", m.c_str());
}

std::string failure::message() const {
    std::lock_guard<std::mutex> lk(mtx);
    return msg;
}

void io_pool::start(int n_threads, size_t staging_bytes, failure & fail) {
    for (int i = 0; i < n_threads; ++i) {
        workers.emplace_back([this, staging_bytes, &fail] { worker_main(staging_bytes, &fail); });
    }
}

void io_pool::stop() {
    {
        std::lock_guard<std::mutex> lk(mtx);
        stop_requested = true;
        jobs.clear();
    }
    cv_jobs.notify_all();
    cv_done.notify_all();
    for (auto & w : workers) {
        if (w.joinable()) {
            w.join();
        }
    }
    workers.clear();
}

void io_pool::push(io_job job, bool urgent) {
    if (urgent) {
        jobs.push_front(std::move(job));
    } else {
        jobs.push_back(std::move(job));
    }
}

void io_pool::worker_main(size_t staging_bytes, failure * fail) {
    void * staging = nullptr;
    if (staging_bytes > 0 && posix_memalign(&staging, k_page, staging_bytes) != 0) {
        fail->set("out of memory for an I/O staging buffer");
        staging = nullptr;
    }
    std::unique_lock<std::mutex> lk(mtx);
    while (true) {
        cv_jobs.wait(lk, [&] { return stop_requested || !jobs.empty(); });
        if (stop_requested) {
            break;
        }
        io_job job = std::move(jobs.front());
        jobs.pop_front();
        if ((!job.wanted || job.wanted()) && !fail->is_set()) {
            lk.unlock();
            job.run(staging);
            lk.lock();
        }
        if (job.done) {
            job.done();
        }
        cv_done.notify_all();
    }
    lk.unlock();
    free(staging);
}

}  // namespace flashflex
