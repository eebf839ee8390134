// The operator contract's constants for C++ and CUDA: the one place the kernels read them.
// adaptau/loss/_contract.py states the same values for Python; tests/test_layout.py checks
// that the two agree (through adaptau::contract_constants, registered in registration.cpp).
#pragma once

#include <cstdint>

namespace adaptau {

// neg_mode: how `neg` lists each row's negatives.
constexpr int64_t kNegPerRow = 0;   // neg [B, M]: row b's own negatives
constexpr int64_t kNegShared = 1;   // neg [M]: the same negatives for every row
constexpr int64_t kNegInBatch = 2;  // neg empty: row b's negatives are pos[j], j != b

// L2 normalization divides by max(||x||, kNormEps), as F.normalize does.
constexpr double kNormEps = 1e-12;

// Largest |inverse temperature| (pos_scale, neg_scale) the operator accepts: a float32
// logit of 1e9 still carries the cosine to ~1e-7 relative; larger scales are rejected.
constexpr double kMaxInverseTemperature = 1e8;

}  // namespace adaptau
