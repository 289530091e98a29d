// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/in_order_pull.h"

#include "util/hash.h"
#include "util/prefetch.h"
#include "util/thread_scratch.h"

namespace psembed {

namespace {
constexpr size_t kAhead = 16;  // keys a prefetch runs ahead (as Shard's phases)

thread_local std::vector<uint64_t> tls_hashes;
thread_local std::vector<uint32_t> tls_refs;
thread_local std::vector<const RowHeader*> tls_records;
}  // namespace

uint64_t PullInOrder(const std::vector<std::unique_ptr<Shard>>& shards, const RowLayout& layout, const uint64_t* keys,
                     size_t n, bool with_stats, float* out) {
  const uint32_t num_shards = static_cast<uint32_t>(shards.size());
  const size_t width = layout.pull_width(with_stats);
  ScratchBuffer<uint64_t> hashes_buf(&tls_hashes, n);
  ScratchBuffer<uint32_t> refs_buf(&tls_refs, n);
  ScratchBuffer<const RowHeader*> records_buf(&tls_records, n);
  uint64_t* hashes = hashes_buf.data();
  uint32_t* refs = refs_buf.data();
  const RowHeader** records = records_buf.data();
  for (size_t j = 0; j < n; ++j) hashes[j] = TableHash(keys[j]);
  // Pass 1: every probe.
  auto shard_of = [&](size_t j) { return shards[ShardOf(hashes[j], num_shards)].get(); };
  for (size_t j = 0; j < n && j < kAhead; ++j) shard_of(j)->PrefetchIndexShared(hashes[j]);
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n) shard_of(j + kAhead)->PrefetchIndexShared(hashes[j + kAhead]);
    records[j] = shard_of(j)->FindRowShared(keys[j], hashes[j], &refs[j]);
  }
  // Pass 2: every row, in input order (only the part of a record a pull reads is prefetched).
  // Misses are counted here and returned, not added to a shared atomic per key: with an add per absent
  // key, two threads pulling new ids fought over the counters' cache lines (pulls of 100k absent keys on
  // 2 threads: 1.14x-1.27x faster without; 1 thread within noise; docs/benchmarks.md, "Table", session 22).
  uint64_t misses = 0;
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n && records[j + kAhead] != nullptr) {
      PrefetchBytes(records[j + kAhead], layout.pulled_bytes(RowRef::HasMf(refs[j + kAhead])));
    }
    misses += records[j] == nullptr ? 1 : 0;
    layout.WritePullRow(records[j], RowRef::HasMf(refs[j]), with_stats, out + j * width);
  }
  return misses;
}

}  // namespace psembed
