// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// PullInOrder: a pull that walks its keys in input order across all shards, for a caller that holds
// every shard's lock (SparseTable::Pull, when no writer holds or waits for any of them).
//
// Why: the pull by shard (Shard::Pull after the key partition) pays for a counting sort of the keys
// and then writes each shard's rows scattered over the whole output. Walking the keys in input order
// needs neither: two passes over the call, all index probes (each key's slot prefetched kAhead keys
// ahead), then all rows (each record prefetched kAhead keys ahead), written one after another. Paired
// runs at 10M keys, 100k a call: 1.08x-1.21x as fast on 1 thread, 1.11x-1.15x on 2; calls of 64-2,048
// keys 1.5x-3.7x (docs/benchmarks.md, "Table", session 21). A pull that walked the keys in one rolling
// pipeline instead of two passes was no faster (session 14).

#ifndef PSEMBED_TABLE_IN_ORDER_PULL_H_
#define PSEMBED_TABLE_IN_ORDER_PULL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "table/shard.h"

namespace psembed {

// Writes the row of keys[j] to out + j * width for j in [0, n) (width = layout.pull_width(with_stats);
// RowLayout::WritePullRow's rows, zeros for an absent key), the shard of a key being ShardOf(TableHash(key), shards.size()).
// Returns the number of absent keys (the caller counts them in stats()'s pull_misses). REQUIRES: every shard's mu() held by the call (shared is enough) for the
// whole of it; several threads may run it at once on different ranges.
uint64_t PullInOrder(const std::vector<std::unique_ptr<Shard>>& shards, const RowLayout& layout, const uint64_t* keys,
                     size_t n, bool with_stats, float* out);

}  // namespace psembed

#endif  // PSEMBED_TABLE_IN_ORDER_PULL_H_
