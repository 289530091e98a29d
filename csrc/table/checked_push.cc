// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/checked_push.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "table/row_store/feature_value.h"
#include "util/float_string.h"

namespace psembed {
namespace {

// The tests on a float's bits, branch-free so that the passes below vectorize (an early-exit loop stays
// scalar: FirstBadCount alone was ~1.6% of a 1-thread Zipf push in a profile).
inline uint32_t FloatBits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}
// Inf or NaN: an exponent of all ones.
inline uint32_t NotFinite(uint32_t bits) { return static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u); }
// Not a valid show or click: not finite, or < 0 (a sign bit on anything but -0.0, which is >= 0).
inline uint32_t BadCount(uint32_t bits) { return static_cast<uint32_t>(bits > 0x80000000u) | NotFinite(bits); }

// The first index of v[0, n) that is not a valid show/click, or n.
size_t FirstBadCount(const float* v, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (BadCount(FloatBits(v[i]))) return i;
  }
  return n;
}

// FirstBadCount(v, n) == n, in one vectorized pass: the common push only pays this.
bool AllCountsValid(const float* v, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad |= BadCount(FloatBits(v[i]));
  return bad == 0;
}

// The first index of slots[0, n) outside [0, kSlotLimit), or n. One unsigned compare covers both ends.
size_t FirstBadSlot(const int32_t* slots, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad |= static_cast<uint32_t>(static_cast<uint32_t>(slots[i]) >= kSlotLimit);
  if (bad == 0) return n;  // the common push: one vectorized pass
  for (size_t i = 0; i < n; ++i) {
    if (static_cast<uint32_t>(slots[i]) >= kSlotLimit) return i;
  }
  return n;
}

}  // namespace

// An OR over exponent bits that the compiler vectorizes, so the common all-finite push pays one
// streaming pass instead of a per-row check.
bool AllFinite(const float* v, size_t n) {
  uint32_t bad = 0;
  for (size_t i = 0; i < n; ++i) bad |= NotFinite(FloatBits(v[i]));
  return bad == 0;
}

Status CheckedPush(SparseTable* table, const PushArgs& a, size_t* skipped) {
  const size_t n = a.n;
  const size_t gw = 1 + static_cast<size_t>(table->options().dim);
  const bool nan_skip = table->options().nan_skip;
  *skipped = 0;
  // The first bad index of all = the least of the chunks' (each chunk reports its own first, or n).
  const size_t chunks = table->Chunks(n);
  std::vector<size_t> first_show(chunks, n), first_click(chunks, n);
  std::vector<uint8_t> finite(chunks, 1);
  table->ForEachChunk(n, chunks, [&](size_t ch, size_t begin, size_t end) {
    const size_t len = end - begin;
    const size_t bs = AllCountsValid(a.shows + begin, len) ? len : FirstBadCount(a.shows + begin, len);
    const size_t bc = AllCountsValid(a.clicks + begin, len) ? len : FirstBadCount(a.clicks + begin, len);
    if (bs < len) first_show[ch] = begin + bs;
    if (bc < len) first_click[ch] = begin + bc;
    finite[ch] = AllFinite(a.grads + begin * gw, len * gw) ? 1 : 0;
  });
  const size_t bad_show = *std::min_element(first_show.begin(), first_show.end());
  if (bad_show < n) {
    return Status::InvalidArgument("shows must be finite and >= 0, got shows[" + std::to_string(bad_show) +
                                   "] = " + FloatString(a.shows[bad_show]));
  }
  const size_t bad_click = *std::min_element(first_click.begin(), first_click.end());
  if (bad_click < n) {
    return Status::InvalidArgument("clicks must be finite and >= 0, got clicks[" + std::to_string(bad_click) +
                                   "] = " + FloatString(a.clicks[bad_click]));
  }
  const size_t bad_slot = a.slots != nullptr ? FirstBadSlot(a.slots, n) : n;
  if (bad_slot < n) {
    return Status::InvalidArgument("slots must be in [0, " + std::to_string(kSlotLimit) + ") (a checkpoint stores " +
                                   "them as float32, exact up to 2^24), got slots[" + std::to_string(bad_slot) +
                                   "] = " + std::to_string(a.slots[bad_slot]));
  }
  std::vector<uint8_t> skip;
  const bool all_finite = std::all_of(finite.begin(), finite.end(), [](uint8_t f) { return f != 0; });
  for (size_t i = 0; i < n && !all_finite; ++i) {  // rows are searched only if a value is bad
    if (AllFinite(a.grads + i * gw, gw)) continue;
    if (!nan_skip) {
      return Status::InvalidArgument(
          "grads has NaN/Inf in row " + std::to_string(i) + " (key " +
          std::to_string(static_cast<int64_t>(a.keys[i])) +
          "); nan_policy='raise' rejected the whole push (use nan_policy='skip' to drop such rows)");
    }
    if (skip.empty()) skip.assign(n, 0);
    skip[i] = 1;
    ++*skipped;
  }
  table->Push(a.keys, n, a.grads, a.shows, a.clicks, a.slots, skip.empty() ? nullptr : skip.data(), a.push_id);
  return Status::OK();
}

}  // namespace psembed
