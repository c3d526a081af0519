// flashflex: shared I/O (see llama-flashflex-io.h).

#include "llama-flashflex-io.h"

#include "llama-impl.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace flashflex {

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

uint64_t expert_checksum(const void * data, size_t n) {
    const uint8_t * p    = (const uint8_t *) data;
    const size_t    full = n / 8;
    uint64_t        sum  = 0;
    for (size_t i = 0; i < full; ++i) {
        uint64_t w;
        memcpy(&w, p + 8 * i, 8);
        sum += w * (2 * (uint64_t) i + 1);
    }
    if (n % 8) {
        uint64_t w = 0;
        memcpy(&w, p + 8 * full, n % 8);
        sum += w * (2 * (uint64_t) full + 1);
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
