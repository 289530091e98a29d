// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ChunkArena: the memory behind one table's slab chunks (slab_pool.h), carved from large segments
// on transparent huge pages (util/huge_pages.h).
//
// Why not malloc per chunk: a chunk is ~32-36 KiB, so malloc puts it on 4 KiB pages and a random
// row read pays a TLB miss on top of its cache miss. Why one arena per table rather than one per
// pool: a huge page is populated whole on first touch, so every bump region may hold up to 2 MiB of
// untouched-but-resident tail; one region per table bounds that to 2 MiB, where 64 shards x 2 pools
// of regions could waste up to 256 MiB.
//
// Contract: Allocate(bytes) returns a 64-byte-aligned block of unspecified contents (fresh memory
// reads zero; a recycled block keeps old bytes, but for its first 8). Free(p, bytes) puts it on a free
// list of that exact size, reused first, and never fails. When the last block is freed every segment
// is unmapped, so clearing a table gives its memory back to the system.
//
// Why Free cannot fail: it runs inside SlabPool::Clear and ~SlabPool, where a std::bad_alloc would
// leave a block counted as free but still owned by its pool (a retried Clear freed it twice, and the
// arena unmapped memory in use) or reach std::terminate. So Free allocates nothing: a free list is
// threaded through its blocks (a block's first word points to the next), and the list head of a size
// is created by the first Allocate of that size, which may throw before it hands anything out. The
// heads are few: one per distinct chunk size, i.e. per record stride (a table has two).
//
// Thread safety: every method locks mu_ (a chunk is allocated once per 1024 records, so the lock is
// cold). The arena must outlive every pool that uses it.

#ifndef PSEMBED_TABLE_ROW_STORE_CHUNK_ARENA_H_
#define PSEMBED_TABLE_ROW_STORE_CHUNK_ARENA_H_

#include <cstddef>
#include <utility>
#include <vector>

#include "util/mutex.h"

namespace psembed {

class ChunkArena {
 public:
  // Address space is reserved this much at a time; only touched pages cost memory.
  static constexpr size_t kSegmentBytes = size_t{32} << 20;

  ChunkArena() = default;
  ~ChunkArena();
  ChunkArena(const ChunkArena&) = delete;
  ChunkArena& operator=(const ChunkArena&) = delete;

  // REQUIRES: bytes > 0 (a request over kSegmentBytes gets a mapping of its own). Throws std::bad_alloc.
  void* Allocate(size_t bytes) LOCKS_EXCLUDED(mu_);
  // REQUIRES: p came from Allocate(bytes) with the same bytes and was not freed since.
  void Free(void* p, size_t bytes) noexcept LOCKS_EXCLUDED(mu_);

  // Bytes handed out and not freed (what stats() counts as held by the slabs).
  size_t bytes_in_use() const LOCKS_EXCLUDED(mu_);

 private:
  void ReleaseAllLocked() EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable Mutex mu_;
  std::vector<std::pair<char*, size_t>> segments_ GUARDED_BY(mu_);  // (mapping, its bytes), from HugePageAlloc
  char* next_ GUARDED_BY(mu_) = nullptr;         // bump pointer in the last segment
  size_t left_ GUARDED_BY(mu_) = 0;              // bytes after next_ in the last segment
  // Freed blocks of one (rounded) size, a list through the blocks' first words. Invariant: every block
  // handed out and not freed has the entry of its size here (Allocate adds it, and only
  // ReleaseAllLocked, with nothing in use, removes entries), so Free only ever links into one.
  struct FreeList {
    size_t size;
    void* head;  // nullptr: none free
  };
  std::vector<FreeList> free_ GUARDED_BY(mu_);
  size_t in_use_ GUARDED_BY(mu_) = 0;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_ROW_STORE_CHUNK_ARENA_H_
