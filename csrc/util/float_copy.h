// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// CopyFloats: copies a short run of floats (a table row: 1 + dim, typically 9-65) in 16-byte moves.
//
// Why not std::memcpy: with a run-time length it is a library call that costs more than a 36-byte
// copy. Why not a plain loop: GCC keeps it scalar, and a pull's row then takes one store per float;
// when the rows land on lines that are not in L1 (a gather scattered over a multi-MB buffer), those
// stores fill the store buffer and stall the loop (session 11: 89 -> 71 cycles a key for a pull's
// row copy with 16-byte moves).

#ifndef PSEMBED_UTIL_FLOAT_COPY_H_
#define PSEMBED_UTIL_FLOAT_COPY_H_

#include <cstddef>

namespace psembed {

// dst[0, n) = src[0, n). The ranges must not overlap; neither needs more than float alignment.
inline void CopyFloats(float* dst, const float* src, size_t n) {
  size_t i = 0;
  for (; i + 4 <= n; i += 4) __builtin_memcpy(dst + i, src + i, 16);  // one unaligned 16-byte move
  for (; i < n; ++i) dst[i] = src[i];
}

}  // namespace psembed

#endif  // PSEMBED_UTIL_FLOAT_COPY_H_
