// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/push_merge.h"

#include <algorithm>
#include <cfloat>

#include "util/hash.h"
#include "util/prefetch.h"
#include "util/saturate.h"

namespace psembed {

namespace {
constexpr uint64_t kEmptySlot = ~uint64_t{0};

size_t NextPow2(size_t x) {
  size_t p = 1;
  while (p < x) p <<= 1;
  return p;
}
}  // namespace

PushMerger& ThreadPushMerger() {
  thread_local PushMerger merger;
  return merger;
}

void PushMerger::Reset(size_t n, size_t gw) {
  if (items_.size() < n) {
    items_.resize(n);
    sum_row_.resize(n);
  }
  num_ = 0;
  gw_ = gw;
  sums_.clear();
}

void PushMerger::AddDuplicate(size_t k, size_t p, const PushRows& rows) {
  MergedPush& it = items_[k];
  if (sum_row_[k] < 0) {
    sum_row_[k] = static_cast<int32_t>(sums_.size() / gw_);
    sums_.insert(sums_.end(), it.grad, it.grad + gw_);
  }
  float* acc = sums_.data() + static_cast<size_t>(sum_row_[k]) * gw_;
  const float* g = rows.grads + p * gw_;
  // Plain float sums; one that passes float32's range stays +-inf (adding finite values never leaves inf)
  // until PointItemsAtSums saturates it: once per merged key, not per duplicate (a clamp per element
  // here made Zipf pushes ~4% slower, paired two-build runs, session 24).
  for (size_t d = 0; d < gw_; ++d) acc[d] += g[d];
  it.show += rows.shows[p];
  it.click += rows.clicks[p];
  if (rows.slots != nullptr) it.slot = rows.slots[p];
}

void PushMerger::PointItemsAtSums() {
  for (size_t k = 0; k < num_; ++k) {
    if (sum_row_[k] < 0) continue;
    float* acc = sums_.data() + static_cast<size_t>(sum_row_[k]) * gw_;
    // The rules require a finite gradient, and finite inputs can add up to an inf: saturated sums.
    SaturateSums(acc, gw_, &items_[k].show, &items_[k].click);
    items_[k].grad = acc;
  }
}

size_t PushMerger::MergeRun(const uint64_t* keys, const uint32_t* pos, size_t cnt, const PushRows& rows) {
  Reset(cnt, rows.gw);
  const size_t cap = NextPow2(cnt * 2);
  const size_t mask = cap - 1;
  run_keys_.resize(cap);
  run_items_.assign(cap, -1);
  uint64_t* tkeys = run_keys_.data();
  int32_t* tidx = run_items_.data();
  MergedPush* items = items_.data();
  int32_t* sum_row = sum_row_.data();
  size_t num = 0;
  constexpr size_t kAhead = 8;
  for (size_t j = 0; j < cnt; ++j) {
    if (j + kAhead < cnt) {  // every line of the gradient row (at dim 8 its 36 bytes straddle two lines half the time)
      const uint32_t pa = pos[j + kAhead];
      PrefetchBytes(rows.grads + static_cast<size_t>(pa) * rows.gw, rows.gw * sizeof(float));
      // A shard's run reads shows and clicks at positions ~64 apart, a new line each time. A timing build
      // alternating calls with and without these on one table: the merge of a uniform push 45-73 -> 44-62
      // cycles a key (1-11 less), of a Zipf push 0.2-3 less (docs/benchmarks.md, "Table", session 12).
      __builtin_prefetch(rows.shows + pa);
      __builtin_prefetch(rows.clicks + pa);
    }
    const uint32_t p = pos[j];
    const uint64_t key = keys[j];
    const uint64_t hash = TableHash(key);  // recomputed, not scattered by the partition (SparseTable::Partition)
    size_t i = (hash >> 20) & mask;
    while (tidx[i] != -1 && tkeys[i] != key) i = (i + 1) & mask;
    if (tidx[i] == -1) {
      tidx[i] = static_cast<int32_t>(num);
      tkeys[i] = key;
      AddFirst(items, sum_row, num++, key, hash, p, rows);
    } else {
      AddDuplicate(static_cast<size_t>(tidx[i]), p, rows);
    }
  }
  num_ = num;
  PointItemsAtSums();
  return num_;
}

void PushMerger::MergeCall(const uint64_t* keys, size_t n, const uint8_t* skip, const PushRows& rows,
                           uint32_t num_shards) {
  Reset(n, rows.gw);
  // Each shard's count of merged keys, for SortByShard: shard_begin_[s + 1] counts shard s.
  shard_begin_.assign(num_shards + 1, 0);
  uint32_t* count = shard_begin_.data() + 1;
  const size_t mask = NextPow2(n * 2) - 1;
  call_slots_.assign(mask + 1, kEmptySlot);
  uint64_t* table = call_slots_.data();
  MergedPush* items = items_.data();
  int32_t* sum_row = sum_row_.data();
  size_t num = 0;
  // The table does not fit L2 for a big call: each key's slot is prefetched kAhead keys before its probe,
  // its hash kept in a ring until then. (Gradient rows are read in order: the hardware prefetcher's.)
  constexpr size_t kAhead = 16;
  uint64_t ahead[kAhead];
  for (size_t j = 0; j < kAhead && j < n; ++j) ahead[j] = TableHash(keys[j]);
  for (size_t p = 0; p < n; ++p) {
    const uint64_t hash = ahead[p % kAhead];
    if (p + kAhead < n) {
      const uint64_t next = TableHash(keys[p + kAhead]);
      ahead[p % kAhead] = next;
      __builtin_prefetch(table + ((next >> 20) & mask));
    }
    if (skip != nullptr && skip[p]) continue;
    const uint64_t key = keys[p];
    const uint32_t tag = static_cast<uint32_t>(hash);
    size_t i = (hash >> 20) & mask;
    for (;;) {
      const uint64_t slot = table[i];
      if (slot == kEmptySlot) {
        table[i] = (static_cast<uint64_t>(num) << 32) | tag;
        AddFirst(items, sum_row, num++, key, hash, p, rows);
        ++count[ShardOf(hash, num_shards)];
        break;
      }
      const size_t k = static_cast<size_t>(slot >> 32);
      if (static_cast<uint32_t>(slot) == tag && items[k].key == key) {
        AddDuplicate(k, p, rows);
        break;
      }
      i = (i + 1) & mask;
    }
  }
  num_ = num;
  PointItemsAtSums();
}

void PushMerger::SortByShard(uint32_t num_shards) {
  // A stable counting sort by shard (MergeCall counted): each shard's keys keep their order of first
  // occurrence.
  const size_t num = num_;
  const MergedPush* items = items_.data();
  uint32_t* begin = shard_begin_.data();
  for (uint32_t s = 0; s < num_shards; ++s) begin[s + 1] += begin[s];
  shard_next_.assign(shard_begin_.begin(), shard_begin_.end() - 1);
  uint32_t* next = shard_next_.data();
  if (sorted_.size() < num) sorted_.resize(num);
  MergedPush* sorted = sorted_.data();
  for (size_t k = 0; k < num; ++k) sorted[next[ShardOf(items[k].hash, num_shards)]++] = items[k];
}

void PushMerger::Trim() {
  const size_t bytes = (items_.capacity() + sorted_.capacity()) * sizeof(MergedPush) +
                       (sum_row_.capacity() + sums_.capacity() + run_items_.capacity()) * 4 +
                       (run_keys_.capacity() + call_slots_.capacity()) * 8;
  if (bytes > kKeepBytes) *this = PushMerger();
}

}  // namespace psembed
