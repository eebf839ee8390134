// The CPU kernels' runtime (see runtime.h): compiled once, with the baseline flags.
#include "runtime.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include <sys/mman.h>

namespace adaptau {
namespace cpu {

int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return fallback;
  char* end = nullptr;
  long long v = std::strtoll(s, &end, 10);
  return (end != s && v > 0) ? static_cast<int64_t>(v) : fallback;
}

const Tuning& tuning() {
  static const Tuning t{
      env_int("ADAPTAU_CPU_CHUNK_BYTES", 256 << 10),
      env_int("ADAPTAU_CPU_SORT_ROWS", 64),
      env_int("ADAPTAU_CPU_GROUPS", 8),
      env_int("ADAPTAU_CPU_PARTIAL_BYTES", 32 << 20),
      env_int("ADAPTAU_CPU_ROW_BLOCK", 64),
      env_int("ADAPTAU_CPU_COL_BLOCK", 256),
      env_int("ADAPTAU_CPU_MAX_PAIRS", int64_t(1) << 23),
      env_int("ADAPTAU_CPU_SAVED_SCORES_BYTES", int64_t(32) << 20),
  };
  return t;
}

PhaseTimer::PhaseTimer()
    : on_(env_int("ADAPTAU_CPU_PROFILE", 0) > 0), t_(std::chrono::steady_clock::now()), c_(std::clock()) {}

void PhaseTimer::mark(const char* what) {
  if (!on_) return;
  auto now = std::chrono::steady_clock::now();
  std::clock_t cn = std::clock();
  std::fprintf(stderr, "[adaptau cpu] %-16s wall %8.3f ms  cpu %8.3f ms\n", what,
               std::chrono::duration<double, std::milli>(now - t_).count(),
               1000.0 * double(cn - c_) / CLOCKS_PER_SEC);
  t_ = now;
  c_ = cn;
}

Pool& Pool::get() {
  static Pool* pool = new Pool();  // never destroyed (may be used at exit)
  return *pool;
}

Pool::Pool() {
  const char* e = std::getenv("ADAPTAU_CPU_POOL");
  enabled_ = !(e != nullptr && std::string(e) == "0");
}

void* Pool::acquire(size_t bytes, size_t& got) {
  // Blocks of at least kHugeMin bytes are whole 2 MiB transparent huge pages: the
  // per-row passes touch every row's slots, 4·M bytes apart, and with 4 KiB pages each
  // run would cost a TLB miss.
  const bool huge = bytes >= kHugeMin;
  const size_t size =
      huge ? (bytes + kHuge - 1) / kHuge * kHuge : (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  if (enabled_ && size >= kMinPooled) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = free_.lower_bound(size);
    if (it != free_.end() && it->first <= 2 * size) {
      got = it->first;
      void* p = it->second;
      idle_ -= got;
      free_.erase(it);
      return p;
    }
  }
  got = size;
  void* p = std::aligned_alloc(huge ? kHuge : 64, size);
  TORCH_CHECK(p != nullptr, "adaptau cpu: out of memory allocating ", bytes, " bytes of scratch");
#ifdef MADV_HUGEPAGE
  if (huge) madvise(p, size, MADV_HUGEPAGE);
#endif
  return p;
}

void Pool::release(void* p, size_t bytes) {
  if (p == nullptr) return;
  if (enabled_ && bytes >= kMinPooled) {
    std::lock_guard<std::mutex> lock(mu_);
    if (idle_ + bytes <= kPoolCap) {
      free_.emplace(bytes, p);
      idle_ += bytes;
      return;
    }
  }
  std::free(p);
}

at::Tensor pooled_empty(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(rows * cols, 1)) * opts.dtype().itemsize();
  size_t got = 0;
  void* p = Pool::get().acquire(bytes, got);
  return at::from_blob(p, {rows, cols}, [got](void* q) { Pool::get().release(q, got); }, opts);
}

SavedCache& SavedCache::get() {
  static SavedCache* cache = new SavedCache();
  return *cache;
}

SavedCache::SavedCache() {
  const char* e = std::getenv("ADAPTAU_CPU_PLAN_CACHE");
  enabled_ = !(e != nullptr && std::string(e) == "0");
}

void SavedCache::put(const SavedKey& key, std::shared_ptr<void> value) {
  if (!accepts(key)) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = entries_.begin(); it != entries_.end(); ++it)
    if (it->first == key) {
      entries_.erase(it);
      break;
    }
  entries_.emplace_back(key, std::move(value));
  while (entries_.size() > 2) entries_.erase(entries_.begin());
}

std::shared_ptr<void> SavedCache::take(const SavedKey& key) {
  if (!accepts(key)) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = entries_.begin(); it != entries_.end(); ++it)
    if (it->first == key) {
      std::shared_ptr<void> p = std::move(it->second);
      entries_.erase(it);
      return p;
    }
  return nullptr;
}

}  // namespace cpu
}  // namespace adaptau
