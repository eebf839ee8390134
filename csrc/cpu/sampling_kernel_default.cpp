// The sampling kernels for the DEFAULT CPU capability: setup.py compiles this file with
// the baseline flags (x86-64 without AVX, or any other architecture).
#define ADAPTAU_CPU_CAPABILITY DEFAULT
#define ADAPTAU_CPU_CAPABILITY_DEFAULT 1
#include "sampling_kernel_impl.h"
