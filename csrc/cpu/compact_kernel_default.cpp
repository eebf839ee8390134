// The compact_indices kernel for the DEFAULT CPU capability: setup.py compiles this file with
// the baseline flags (x86-64 without AVX, or any other architecture).
#define ADAPTAU_CPU_CAPABILITY DEFAULT
#define ADAPTAU_CPU_CAPABILITY_DEFAULT 1
#include "compact_kernel_impl.h"
