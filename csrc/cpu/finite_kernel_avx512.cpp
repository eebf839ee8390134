// The all_finite scan for the AVX512 CPU capability: setup.py compiles this file with
// -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx2 -mfma.
#include "capability.h"
#ifdef ADAPTAU_CPU_X86
#define ADAPTAU_CPU_CAPABILITY AVX512
#define ADAPTAU_CPU_CAPABILITY_AVX512 1
#include "finite_kernel_impl.h"
#endif  // ADAPTAU_CPU_X86
