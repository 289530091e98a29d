// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// CheckedPush: a push's value checks, then SparseTable::Push. The Python binding and the network
// server (net/data_server.h) both push through it, so a bad push is refused with the same message
// whichever way it arrives.

#ifndef PSEMBED_TABLE_CHECKED_PUSH_H_
#define PSEMBED_TABLE_CHECKED_PUSH_H_

#include <cstddef>
#include <cstdint>

#include "table/sparse_table.h"
#include "util/status.h"

namespace psembed {

// One push's buffers: keys[n], grads[n x (1 + dim)], shows[n], clicks[n], slots[n] or nullptr.
struct PushArgs {
  const uint64_t* keys = nullptr;
  size_t n = 0;
  const float* grads = nullptr;
  const float* shows = nullptr;
  const float* clicks = nullptr;
  const int32_t* slots = nullptr;
  uint64_t push_id = SparseTable::kOwnPushId;
};

// Shows and clicks must be finite and >= 0, slots in [0, kSlotLimit) (feature_value.h); a row of grads
// with NaN/Inf refuses the whole push, or under the table's nan_policy="skip" is skipped and counted
// (*skipped, and stats().rejected). A bad value is InvalidArgument naming its index (the first one in
// input order) and nothing changes. The checks run on the table's pool in chunks, like its own passes
// over the keys.
// REQUIRES: the buffers hold the shapes above with dim = table->options().dim; n <= SparseTable::kMaxKeysPerCall.
Status CheckedPush(SparseTable* table, const PushArgs& args, size_t* skipped);

// Whether every float of v[0..n) is finite (one vectorized pass).
bool AllFinite(const float* v, size_t n);

}  // namespace psembed

#endif  // PSEMBED_TABLE_CHECKED_PUSH_H_
