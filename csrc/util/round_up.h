// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// RoundUp: sizes and addresses rounded up to a multiple (a cache line, a page, a huge page).

#ifndef PSEMBED_UTIL_ROUND_UP_H_
#define PSEMBED_UTIL_ROUND_UP_H_

#include <cstddef>

namespace psembed {

// x rounded up to a multiple of `to`. REQUIRES: to > 0, x + to - 1 does not overflow.
constexpr size_t RoundUp(size_t x, size_t to) { return (x + to - 1) / to * to; }

}  // namespace psembed

#endif  // PSEMBED_UTIL_ROUND_UP_H_
