// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Most of hash.h is inline (it sits on the pull/push fast path); the dedups live here.

#include "util/hash.h"

#include <memory>
#include <vector>

namespace psembed {
namespace {
static_assert(sizeof(uint64_t) == 8, "feasigns are 64-bit");

// The slot arrays of Dedup, kept per thread between calls. Fresh arrays cost more than the dedup itself:
// at n = 106k they are 3 MB, and first-touching them page-faulted ~770 times per call (1-4 ms on a VM,
// against ~1 ms for the probing). Reused, only the positions are cleared (a memset of 4 bytes a slot).
struct DedupSlots {
  std::vector<uint32_t> pos;          // 1 + position in unique; 0 = empty
  std::unique_ptr<uint64_t[]> key;    // read only where pos != 0
  size_t key_cap = 0;

  // Slot arrays beyond this many slots (a call of more than 2^19 keys) are freed after the call, so
  // one huge call does not pin them in its thread.
  static constexpr size_t kKeepSlots = size_t{1} << 20;

  void Prepare(size_t cap) {
    pos.assign(cap, 0);
    if (key_cap < cap) {
      key.reset(new uint64_t[cap]);  // uninitialized: see above
      key_cap = cap;
    }
  }
  void Trim() {
    if (key_cap > kKeepSlots) *this = DedupSlots();
  }
};
}  // namespace

size_t Dedup(const uint64_t* keys, size_t n, uint64_t* unique, int64_t* inverse) {
  if (n == 0) return 0;
  size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  const size_t mask = cap - 1;
  // Open addressing on Mix64(key); slot value = 1 + position in unique (0 = empty), so any key,
  // 0 included, can be stored.
  thread_local DedupSlots tls_slots;
  DedupSlots& slots = tls_slots;
  slots.Prepare(cap);
  uint32_t* pos = slots.pos.data();
  uint64_t* skey = slots.key.get();
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
  slots.Trim();
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
  // The distinct keys in first-occurrence order, before grouping, and where each lands; per-thread
  // scratch for the reason given at DedupSlots.
  thread_local std::vector<uint64_t> tls_first;
  thread_local std::vector<int64_t> tls_moved;
  std::vector<uint64_t>& first = tls_first;
  std::vector<int64_t>& moved = tls_moved;
  if (first.size() < n) first.resize(n);
  const size_t u = Dedup(keys, n, first.data(), inverse);
  if (moved.size() < u) moved.resize(u);
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
  if (first.size() > DedupSlots::kKeepSlots) {  // as DedupSlots::Trim
    first = std::vector<uint64_t>();
    moved = std::vector<int64_t>();
  }
  return u;
}

}  // namespace psembed
