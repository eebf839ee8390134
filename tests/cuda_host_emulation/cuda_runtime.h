// Host emulation of the few CUDA runtime/device features adaptau's kernels use, for
// tests/test_cuda_build.py: csrc/cuda/softmax_loss_kernels.cu compiled as host C++ with this
// directory first on the include path. The threads of a block are cooperative ucontext
// fibers, __syncthreads and warp shuffles are barriers between them, blocks run one after
// another, and atomics are plain adds.
#pragma once
#include <math.h>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // blocks run one after another: static storage = one block's smem

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef void* cudaStream_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#include <functional>
#include <ucontext.h>
namespace emu {
// Cooperative fibers (ucontext): one per CUDA thread of the running block; barriers and warp
// shuffles yield to a round-robin scheduler. Blocks run one after another.
struct Fiber {
  ucontext_t uc;
  std::vector<char> stack;
  bool done = false;
  unsigned tid = 0;
};
struct Bar {
  unsigned arrived = 0, gen = 0, size = 0;
};
inline std::vector<Fiber> fibers;
inline ucontext_t sched;
inline int current = 0;
inline dim3 cur_block, cur_dim;
inline Bar block_bar;
inline std::vector<Bar> warp_bars;
inline std::vector<double> warp_slots;
inline std::vector<double> dyn_smem;
inline std::function<void()> body;
inline int launches = 0;

inline void yield() { swapcontext(&fibers[current].uc, &sched); }
inline void wait(Bar& b) {
  const unsigned my = b.gen;
  if (++b.arrived == b.size) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == my) yield();
}
inline void entry() {
  body();
  fibers[current].done = true;
}

template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) {
    ++launches;
    const unsigned n = block.x;
    dyn_smem.assign(smem / sizeof(double) + 1, 0.0);
    body = [&]() { kernel(args...); };
    for (unsigned b = 0; b < grid.x; ++b) {
      cur_block = dim3(b);
      cur_dim = block;
      block_bar = Bar{0, 0, n};
      warp_bars.assign((n + 31) / 32, Bar{0, 0, 32});
      warp_slots.assign(n, 0.0);
      fibers = std::vector<Fiber>(n);
      for (unsigned t = 0; t < n; ++t) {
        Fiber& f = fibers[t];
        f.tid = t;
        f.stack.resize(256 * 1024);
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = f.stack.data();
        f.uc.uc_stack.ss_size = f.stack.size();
        f.uc.uc_link = &sched;
        makecontext(&f.uc, entry, 0);
      }
      bool left = true;
      while (left) {
        left = false;
        for (unsigned t = 0; t < n; ++t) {
          if (fibers[t].done) continue;
          current = static_cast<int>(t);
          swapcontext(&sched, &fibers[t].uc);
          left = left || !fibers[t].done;
        }
      }
    }
  }
};
template <typename Kernel>
Launch<Kernel> launch(Kernel k, dim3 g, dim3 b, size_t s) {
  return Launch<Kernel>{k, g, b, s};
}
}  // namespace emu

#define threadIdx (dim3(emu::fibers[emu::current].tid))
#define blockIdx (emu::cur_block)
#define blockDim (emu::cur_dim)
#define ADAPTAU_DYNAMIC_SMEM(name) \
  unsigned char* name = reinterpret_cast<unsigned char*>(emu::dyn_smem.data())
#define ADAPTAU_LAUNCH(kernel, grid, block, smem, stream) emu::launch(kernel, grid, block, smem)

inline void __syncthreads() { emu::wait(emu::block_bar); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int o) {
  const unsigned t = threadIdx.x, w = t / 32, base = w * 32;
  emu::warp_slots[t] = static_cast<double>(v);
  emu::wait(emu::warp_bars[w]);
  T r = static_cast<T>(emu::warp_slots[base + ((t - base) ^ o)]);
  emu::wait(emu::warp_bars[w]);
  return r;
}
inline float atomicAdd(float* p, float v) {
  float o = *p;
  *p = o + v;
  return o;
}
inline double atomicAdd(double* p, double v) {
  double o = *p;
  *p = o + v;
  return o;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __int_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline double __longlong_as_double(unsigned long long i) {
  double d;
  std::memcpy(&d, &i, 8);
  return d;
}
inline cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
