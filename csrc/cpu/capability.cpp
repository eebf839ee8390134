// The CPU capability dispatcher (see capability.h): detection, the ADAPTAU_CPU_CAPABILITY
// override, and the ops that report and switch it. Compiled once, with the baseline flags.
#include "capability.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <mutex>

namespace adaptau {
namespace cpu {
namespace {

constexpr int kUnresolved = -1;
std::atomic<int> g_active{kUnresolved};
std::mutex g_mu;

bool parse(const std::string& s, Capability& out) {
  if (s == "default") {
    out = Capability::kDefault;
  } else if (s == "avx2") {
    out = Capability::kAVX2;
  } else if (s == "avx512") {
    out = Capability::kAVX512;
  } else {
    return false;
  }
  return true;
}

Capability detect() {
#ifdef ADAPTAU_CPU_X86
  // (__builtin_cpu_supports also checks that the OS saves the wider registers: XGETBV.)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Capability::kAVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::kAVX2;
#endif
  return Capability::kDefault;
}

// `name` checked against what this CPU and build support; ValueError naming `source`.
Capability checked(const std::string& name, const char* source) {
  Capability c;
  TORCH_CHECK_VALUE(parse(name, c), source, "='", name,
                    "' is not a CPU capability; use one of default, avx2, avx512");
  const Capability top = supported_capability();
  TORCH_CHECK_VALUE(static_cast<int>(c) <= static_cast<int>(top), source, "='", name, "' asks for ",
                    capability_name(c), " kernels, but this ",
#ifdef ADAPTAU_CPU_X86
                    "CPU supports at most ",
#else
                    "build (not x86-64) has only ",
#endif
                    capability_name(top), "; use a level at or below it, or unset it");
  return c;
}

}  // namespace

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::kAVX512:
      return "avx512";
    case Capability::kAVX2:
      return "avx2";
    default:
      return "default";
  }
}

Capability supported_capability() {
  static const Capability detected = detect();
  Capability top = detected;
  const char* cap = std::getenv("ADAPTAU_TEST_CPU_MAX");
  Capability lowered;
  if (cap != nullptr && parse(cap, lowered) && static_cast<int>(lowered) < static_cast<int>(top))
    top = lowered;
  return top;
}

Capability active_capability() {
  const int a = g_active.load(std::memory_order_acquire);
  if (a != kUnresolved) return static_cast<Capability>(a);
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_active.load() != kUnresolved) return static_cast<Capability>(g_active.load());
  const char* env = std::getenv("ADAPTAU_CPU_CAPABILITY");
  const Capability c =
      (env != nullptr && *env != '\0') ? checked(env, "ADAPTAU_CPU_CAPABILITY") : supported_capability();
  g_active.store(static_cast<int>(c), std::memory_order_release);
  return c;
}

std::string cpu_capability_op() { return capability_name(active_capability()); }

std::vector<std::string> cpu_capabilities_op() {
  std::vector<std::string> out;
  for (int c = 0; c <= static_cast<int>(supported_capability()); ++c)
    out.emplace_back(capability_name(static_cast<Capability>(c)));
  return out;
}

std::string set_cpu_capability_op(const std::string& name) {
  const Capability c = checked(name, "_set_cpu_capability");
  std::lock_guard<std::mutex> lock(g_mu);
  const int before = g_active.load();
  g_active.store(static_cast<int>(c), std::memory_order_release);
  return before == kUnresolved ? std::string()
                               : std::string(capability_name(static_cast<Capability>(before)));
}

}  // namespace cpu
}  // namespace adaptau
