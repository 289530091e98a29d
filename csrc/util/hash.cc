// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Most of hash.h is inline (it sits on the pull/push fast path); the dedups live here.

#include "util/hash.h"

#include <memory>
#include <vector>

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
  std::vector<uint32_t> slot_pos(cap, 0);
  // Left uninitialized (a slot's key is read only once its pos is set): zeroing it cost ~0.2 ms at n = 106k.
  std::unique_ptr<uint64_t[]> slot_key(new uint64_t[cap]);
  uint32_t* pos = slot_pos.data();
  uint64_t* skey = slot_key.get();
  size_t u = 0;
  constexpr size_t kAhead = 8;
  for (size_t i = 0; i < n; ++i) {
    if (i + kAhead < n) __builtin_prefetch(pos + (Mix64(keys[i + kAhead]) & mask));
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
  // the distinct keys in first-occurrence order, before grouping (uninitialized: Dedup writes u of them)
  std::unique_ptr<uint64_t[]> first(new uint64_t[n]);
  const size_t u = Dedup(keys, n, first.get(), inverse);
  std::vector<uint32_t> owner(u);
  for (size_t j = 0; j < u; ++j) {
    owner[j] = Route(first[j], num_parts);
    ++starts[owner[j] + 1];
  }
  for (uint32_t p = 0; p < num_parts; ++p) starts[p + 1] += starts[p];  // counts -> slice bounds
  // A stable counting sort by owner: moved[j] is where first[j] lands.
  std::vector<int64_t> cursor(starts, starts + num_parts);
  std::vector<int64_t> moved(u);
  for (size_t j = 0; j < u; ++j) {
    const int64_t to = cursor[owner[j]]++;
    moved[j] = to;
    unique[to] = first[j];
  }
  for (size_t i = 0; i < n; ++i) inverse[i] = moved[static_cast<size_t>(inverse[i])];
  return u;
}

}  // namespace psembed
