// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Most of hash.h is inline (it sits on the pull/push fast path); the dedups live here.

#include "util/hash.h"

#include <algorithm>
#include <vector>

#include "util/thread_scratch.h"

namespace psembed {
namespace {
static_assert(sizeof(uint64_t) == 8, "feasigns are 64-bit");

}  // namespace

size_t Dedup(const uint64_t* keys, size_t n, uint64_t* unique, int64_t* inverse) {
  if (n == 0) return 0;
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  const size_t mask = cap - 1;
  // Open addressing on Mix64(key); slot value = 1 + position in unique (0 = empty), so any key,
  // 0 included, can be stored.
  // Per-thread slot arrays (util/thread_scratch.h): only the positions are cleared per call; a slot's
  // key is read only once its position is set.
  thread_local std::vector<uint32_t> tls_pos;
  thread_local std::vector<uint64_t> tls_key;
  ScratchBuffer<uint32_t> slot_pos(&tls_pos, cap);
  ScratchBuffer<uint64_t> slot_key(&tls_key, cap);
  uint32_t* pos = slot_pos.data();
  uint64_t* skey = slot_key.data();
  std::fill_n(pos, cap, 0u);
  size_t u = 0;
  constexpr size_t kAhead = 8;
  for (size_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      const size_t ahead = Mix64(keys[i + kAhead]) & mask;
      __builtin_prefetch(pos + ahead);
      __builtin_prefetch(skey + ahead);
    }
    const uint64_t k = keys[i];
    size_t j = Mix64(k) & mask;
    while (pos[j] != 0 && skey[j] != k) j = (j + 1) & mask;
    if (pos[j] == 0) {
      skey[j] = k;
      unique[u] = k;
      pos[j] = static_cast<uint32_t>(++u);
    }
    inverse[i] = static_cast<int64_t>(pos[j]) - 1;
  }
  return u;
}

void GroupByInverse(const int64_t* inverse, size_t n, size_t u, int64_t* order, int64_t* starts) {
  for (size_t j = 0; j < u; ++j) starts[j] = 0;
  for (size_t i = 0; i < n; ++i) ++starts[inverse[i]];
  int64_t sum = 0;
  for (size_t j = 0; j < u; ++j) {  // counts -> exclusive prefix sums
    const int64_t c = starts[j];
    starts[j] = sum;
    sum += c;
  }
  // Fill with a cursor per group; starts[] doubles as the cursor and is shifted back afterwards.
  for (size_t i = 0; i < n; ++i) order[starts[inverse[i]]++] = static_cast<int64_t>(i);
  for (size_t j = u; j-- > 1;) starts[j] = starts[j - 1];
  if (u > 0) starts[0] = 0;
}

size_t DedupByOwner(const uint64_t* keys, size_t n, uint32_t num_parts, uint64_t* unique, int64_t* inverse,
                    int64_t* starts) {
  for (uint32_t p = 0; p <= num_parts; ++p) starts[p] = 0;
  if (num_parts == 1) {
    const size_t u = Dedup(keys, n, unique, inverse);
    starts[1] = static_cast<int64_t>(u);
    return u;
  }
  // The distinct keys in first-occurrence order, before grouping, and where each lands (per-thread
  // scratch, util/thread_scratch.h).
  thread_local std::vector<uint64_t> tls_first;
  thread_local std::vector<int64_t> tls_moved;
  ScratchBuffer<uint64_t> first_buf(&tls_first, n);
  uint64_t* first = first_buf.data();
  const size_t u = Dedup(keys, n, first, inverse);
  ScratchBuffer<int64_t> moved_buf(&tls_moved, u);
  int64_t* moved = moved_buf.data();
  // moved[j] first holds the owner of first[j], then (a stable counting sort) where first[j] lands.
  for (size_t j = 0; j < u; ++j) {
    const uint32_t owner = Route(first[j], num_parts);
    moved[j] = owner;
    ++starts[owner + 1];
  }
  for (uint32_t p = 0; p < num_parts; ++p) starts[p + 1] += starts[p];  // counts -> slice bounds
  std::vector<int64_t> cursor(starts, starts + num_parts);
  for (size_t j = 0; j < u; ++j) {
    const int64_t to = cursor[static_cast<size_t>(moved[j])]++;
    moved[j] = to;
    unique[to] = first[j];
  }
  for (size_t i = 0; i < n; ++i) inverse[i] = moved[static_cast<size_t>(inverse[i])];
  return u;
}

}  // namespace psembed
