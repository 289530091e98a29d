// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// IndexArena: the memory behind one table's hash index slot arrays (hash_index.h), one array per
// owner (a shard), laid out so that every slot is on a huge page and no huge page is wasted.
//
// Why: a shard's slot array is a few MiB (~3.1 MiB at 10M keys in 64 shards). On a mapping of its
// own, only its whole 2 MiB units can be huge pages; the rest stayed on 4 KiB pages, where a third of
// the probes missed the TLB. Rounding each array up to whole huge pages costs up to 2 MiB per shard
// (34 B of index per key instead of 20 at 7.8M keys in 64 shards). Here the arrays of one size sit
// side by side in one region: neighbours share the huge page where one ends and the next begins, so
// a table loses at most the last partial page of each region (and, while its shards grow past one
// size, the pages shared between freed arrays and live ones).
//
// Layout: the shards' capacities follow one sequence (HashIndex::Grow), so arrays come in few sizes.
// For each size of 2 MiB or more there is one region of address space: owners x stride bytes (stride:
// the size rounded up to 64 bytes), 2 MiB aligned, advised huge; owner o's array of that size is at
// base + o * stride. Only touched pages cost memory. Freeing an array gives back the whole huge
// pages inside it at once (the two it shares with neighbours stay until they go too); a region whose
// last array is freed is unmapped.
//
// Contract: Allocate(bytes, owner) returns `bytes` of zeroed, resident memory, 64-byte aligned
// (16-byte aligned below 2 MiB, where it is HugePageAlloc's calloc). An owner holds at most one array
// of each size at a time; a second one, or a region the kernel refuses (strict overcommit), falls back
// to a mapping of its own (HugePageAlloc), as does every array below 2 MiB. Free(p, bytes, owner) takes
// what Allocate returned with the same arguments. Throws std::bad_alloc.
//
// Thread safety: every method is thread-safe (the owners' shards rehash on their own threads). The
// bookkeeping is under mu_ (a rehash is rare); the prefault and zeroing of an owner's array run
// outside it, on bytes no other owner uses. The arena must outlive every HashIndex that uses it.

#ifndef PSEMBED_TABLE_ROW_STORE_INDEX_ARENA_H_
#define PSEMBED_TABLE_ROW_STORE_INDEX_ARENA_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "util/mutex.h"

namespace psembed {

class IndexArena {
 public:
  // REQUIRES: owners >= 1.
  explicit IndexArena(uint32_t owners) : owners_(owners) {}
  ~IndexArena();
  IndexArena(const IndexArena&) = delete;
  IndexArena& operator=(const IndexArena&) = delete;

  // REQUIRES: bytes > 0, owner < owners.
  void* Allocate(size_t bytes, uint32_t owner) LOCKS_EXCLUDED(mu_);
  // REQUIRES: p from Allocate(bytes, owner), not freed since. p == nullptr is a no-op.
  void Free(void* p, size_t bytes, uint32_t owner) LOCKS_EXCLUDED(mu_);

  // Regions mapped now (for tests).
  size_t regions() const LOCKS_EXCLUDED(mu_);

 private:
  struct Region {
    size_t bytes;   // the size of the arrays it holds
    size_t stride;  // bytes rounded up to 64
    char* base;     // owners_ * stride bytes, rounded up to 2 MiB, from HugePageReserve
    uint32_t live;  // arrays handed out and not freed
    std::vector<uint8_t> in_use;     // per owner
    std::vector<uint8_t> used_once;  // per owner: its array's bytes may be old data (zero them)
  };
  size_t region_bytes(const Region& r) const;

  const uint32_t owners_;
  mutable Mutex mu_;
  std::vector<Region> regions_ GUARDED_BY(mu_);  // a handful: the sizes in use, ~2 while a table grows
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_ROW_STORE_INDEX_ARENA_H_
