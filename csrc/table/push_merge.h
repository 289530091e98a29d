// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// PushMerger: merges the duplicate keys of a push into one MergedPush per key (shard.h) before the shards
// apply the rule. Per key: gradients, shows and clicks summed in input order (a left fold, so the bits do
// not depend on how a call is cut up or how many threads run it), the last slot wins; keys come out in
// order of first occurrence.
//
// Two ways through a call, with the same result for every key:
//   - MergeRun: one shard's run of keys, as the key partition left it (SparseTable::Push on several
//     threads: one task per shard, each merging its run). A duplicate's gradient row is read in shard order,
//     a random line of the input.
//   - MergeCall, then SortByShard: the whole call in input order, then the merged keys grouped by shard
//     (SparseTable::Push on one thread, and any push of under 4,096 keys). A duplicate's gradient row is
//     read in input order, a stream the hardware prefetcher follows; the partition sorts the distinct keys
//     only. Paired runs against MergeRun at 10M keys, 100k a call, 1 thread: Zipf pushes (42.9k distinct
//     keys in 100k) 1.08x-1.10x as fast, uniform ones 0.98x-0.99x; calls of 3,000 keys 1.07x Zipf, 1.02x
//     uniform (docs/benchmarks.md, "Table", session 18). It is serial, and cutting a call into groups of
//     shards, one MergeCall each, made a 2-thread push slower (0.91x-1.01x), so several threads keep
//     MergeRun. Its scratch is ~130 bytes a key, so a one-thread call of millions of keys goes by shard too.
//
// Thread safety: none; one merger per thread (ThreadPushMerger), reused across calls so that no call
// allocates once warm. The items point into the push's gradient input or into the merger's own sum rows:
// valid until the next Merge* call on this merger.

#ifndef PSEMBED_TABLE_PUSH_MERGE_H_
#define PSEMBED_TABLE_PUSH_MERGE_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "table/shard.h"

namespace psembed {

// The per-row inputs of one push (SparseTable::Push): row p of the call has gradient grads[p * gw ...],
// show shows[p], click clicks[p] and slot slots[p] (slots may be nullptr).
struct PushRows {
  const float* grads;
  size_t gw;  // 1 + dim
  const float* shows;
  const float* clicks;
  const int32_t* slots;
};

class PushMerger {
 public:
  // Merges keys[j] (the row at input position pos[j]) for j in [0, cnt): one shard's run, in input order.
  // Returns the number of distinct keys, in items()[0, returned).
  size_t MergeRun(const uint64_t* keys, const uint32_t* pos, size_t cnt, const PushRows& rows);

  // Merges the whole call in input order: keys[p] for p in [0, n) not marked in skip (may be nullptr),
  // counting the merged keys of each of num_shards shards as they come.
  // Then SortByShard groups the merged keys by shard, each shard's keys still in order of first
  // occurrence: shard s gets sorted()[begin(s), begin(s + 1)). REQUIRES: n < 2^32 - 1.
  void MergeCall(const uint64_t* keys, size_t n, const uint8_t* skip, const PushRows& rows, uint32_t num_shards);
  void SortByShard(uint32_t num_shards);  // REQUIRES: the num_shards of the MergeCall just before

  const MergedPush* items() const { return items_.data(); }
  const MergedPush* sorted() const { return sorted_.data(); }
  uint32_t begin(uint32_t shard) const { return shard_begin_[shard]; }

  // Frees the scratch once it holds more than kKeepBytes (a call of ~500k keys or more), so that one
  // huge push does not pin ~130 bytes a key in its thread for good.
  void Trim();
  static constexpr size_t kKeepBytes = size_t{64} << 20;

 private:
  // Empties the merger for a call of up to n distinct keys with gw-float gradient rows.
  void Reset(size_t n, size_t gw);
  // A new distinct key from input row p becomes items[num] (its gradient: the input row until a duplicate
  // comes). Local pointers, not members: a store to an item's uint64 key may alias num_ for the compiler,
  // which then reloads it after every store (the 2-thread push ran ~3% slower that way).
  static void AddFirst(MergedPush* items, int32_t* sum_row, size_t num, uint64_t key, uint64_t hash, size_t p,
                       const PushRows& rows) {
    items[num] = MergedPush{key, hash, rows.grads + p * rows.gw, rows.shows[p], rows.clicks[p],
                            rows.slots != nullptr ? rows.slots[p] : -1};
    sum_row[num] = -1;
  }
  // Input row p repeats item k: adds it to k's sums (k's gradient moves to a sum row of its own first).
  void AddDuplicate(size_t k, size_t p, const PushRows& rows);
  // Points the items that have sum rows at them (sums_ may have moved while it grew).
  void PointItemsAtSums();

  std::vector<MergedPush> items_;  // distinct keys in order of first occurrence
  size_t num_ = 0;                 // items_ in use
  size_t gw_ = 0;                  // floats a gradient row, this call
  std::vector<int32_t> sum_row_;   // sums_ row of items_[k], or -1 (its gradient is still the input row)
  std::vector<float> sums_;        // summed gradients of duplicated keys, gw floats a row
  // MergeRun's probe table (a shard's run fits in L1/L2): key and item index, -1 = empty.
  std::vector<uint64_t> run_keys_;
  std::vector<int32_t> run_items_;
  // MergeCall's probe table (a whole call, mostly in L3): one 8-byte slot a key, item index << 32 | the
  // low 32 bits of the key's hash, kEmptySlot = empty; a matching tag is confirmed against items_[k].key.
  // One array, so a probe reads one line, prefetched 16 keys ahead.
  std::vector<uint64_t> call_slots_;
  std::vector<MergedPush> sorted_;     // SortByShard's output
  std::vector<uint32_t> shard_begin_;  // num_shards + 1 bounds into sorted_
  std::vector<uint32_t> shard_next_;   // SortByShard's cursors
};

// The calling thread's merger.
PushMerger& ThreadPushMerger();

}  // namespace psembed

#endif  // PSEMBED_TABLE_PUSH_MERGE_H_
