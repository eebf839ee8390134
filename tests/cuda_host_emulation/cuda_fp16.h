// Host emulation of cuda_fp16.h (tests/test_cuda_build.py): __half and its conversions.
#pragma once
#include <cstdint>
#include <cstring>
struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return (float)f;
}
inline __half __float2half_rn(float x) {
  _Float16 f = (_Float16)x;
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
