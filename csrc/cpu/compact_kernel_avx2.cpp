// The compact_indices kernel for the AVX2 CPU capability: setup.py compiles this file with
// -mavx2 -mfma.
#include "capability.h"
#ifdef ADAPTAU_CPU_X86
#define ADAPTAU_CPU_CAPABILITY AVX2
#define ADAPTAU_CPU_CAPABILITY_AVX2 1
#include "compact_kernel_impl.h"
#endif  // ADAPTAU_CPU_X86
