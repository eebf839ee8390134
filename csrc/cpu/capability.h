// CPU capabilities: which instruction-set level of the CPU kernels runs.
//
// The hot kernels are compiled once per capability (csrc/cpu/*_kernel_<capability>.cpp,
// each with its own compiler flags and its own namespace adaptau::cpu::<CAPABILITY>, the
// scheme of ATen's CPU_CAPABILITY); the rest of the extension is compiled once with the
// baseline flags. The first call that needs a kernel resolves the capability (see
// active_capability) and every call after it uses the same one.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// The x86-64 capabilities are compiled only for x86-64 targets; elsewhere the build has
// the DEFAULT kernels only.
#if defined(__x86_64__) || defined(_M_X64)
#define ADAPTAU_CPU_X86 1
#endif

namespace adaptau {
namespace cpu {

enum class Capability : int { kDefault = 0, kAVX2 = 1, kAVX512 = 2 };

// "default", "avx2", "avx512".
const char* capability_name(Capability c);

// The highest capability that this CPU (and its operating system) supports and this build
// contains. ADAPTAU_TEST_CPU_MAX=default|avx2 lowers it, for tests that need a CPU
// without the higher levels.
Capability supported_capability();

// The capability the kernels use. Resolved on the first call: ADAPTAU_CPU_CAPABILITY
// (default|avx2|avx512) when set, else supported_capability(). A value that is not a
// capability name, or one above supported_capability(), raises ValueError (and raises
// again on every later call, until set_capability chooses a valid one).
Capability active_capability();

// Ops (registered in registration.cpp): the active capability's name; the names of the
// supported capabilities, lowest first; and _set_cpu_capability(name), which switches the
// active capability for the rest of the process (tests) and returns the previous name.
std::string cpu_capability_op();
std::vector<std::string> cpu_capabilities_op();
std::string set_cpu_capability_op(const std::string& name);

}  // namespace cpu
}  // namespace adaptau

// Calls NS::f(args...) for the namespace of the active capability: DEFAULT, AVX2 or AVX512.
// Use it only where every capability's namespace declares f.
#ifdef ADAPTAU_CPU_X86
#define ADAPTAU_CPU_DISPATCH(f, ...)                    \
  [&]() -> decltype(auto) {                             \
    switch (::adaptau::cpu::active_capability()) {      \
      case ::adaptau::cpu::Capability::kAVX512:         \
        return ::adaptau::cpu::AVX512::f(__VA_ARGS__);  \
      case ::adaptau::cpu::Capability::kAVX2:           \
        return ::adaptau::cpu::AVX2::f(__VA_ARGS__);    \
      default:                                          \
        return ::adaptau::cpu::DEFAULT::f(__VA_ARGS__); \
    }                                                   \
  }()
// Declares its arguments (declarations) in each capability's namespace.
#define ADAPTAU_CPU_DECLARE(...) \
  namespace DEFAULT {            \
  __VA_ARGS__;                   \
  }                              \
  namespace AVX2 {               \
  __VA_ARGS__;                   \
  }                              \
  namespace AVX512 {             \
  __VA_ARGS__;                   \
  }
#else
#define ADAPTAU_CPU_DISPATCH(f, ...)                \
  [&]() -> decltype(auto) {                         \
    (void)::adaptau::cpu::active_capability();      \
    return ::adaptau::cpu::DEFAULT::f(__VA_ARGS__); \
  }()
#define ADAPTAU_CPU_DECLARE(...) \
  namespace DEFAULT {            \
  __VA_ARGS__;                   \
  }
#endif
