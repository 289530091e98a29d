// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Saturating float32 stores. The table keeps every value it stores finite: a checkpoint refuses
// non-finite values (a NaN or an inf there is the sign of a damaged file), and an inf in a row's state
// turns into a NaN at the next update (inf / inf, inf * 0). So a sum or an update that passes float32's
// range stores -FLT_MAX or +FLT_MAX, the nearest finite value, instead of an infinity.

#ifndef PSEMBED_UTIL_SATURATE_H_
#define PSEMBED_UTIL_SATURATE_H_

#include <algorithm>
#include <cfloat>
#include <cstddef>

namespace psembed {

// x clamped to [-FLT_MAX, FLT_MAX] (infinities included). REQUIRES: x is not NaN (a NaN passes through).
inline float SaturateFloat(float x) { return std::min(std::max(x, -FLT_MAX), FLT_MAX); }

// A merged push's sums of one key saturated in place: the gradient row g[0..n), its show and its click
// (the table's own merge, PushMerger, and the sharded trainer's, _C.merge_push). NaNs pass.
inline void SaturateSums(float* g, size_t n, float* show, float* click) {
  for (size_t i = 0; i < n; ++i) g[i] = SaturateFloat(g[i]);
  *show = SaturateFloat(*show);
  *click = SaturateFloat(*click);
}

// x rounded to float32, clamped to [-FLT_MAX, FLT_MAX] first. REQUIRES: x is not NaN.
inline float SaturateToFloat(double x) {
  return static_cast<float>(std::min(std::max(x, -double{FLT_MAX}), double{FLT_MAX}));
}

}  // namespace psembed

#endif  // PSEMBED_UTIL_SATURATE_H_
