// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// SlabPool: fixed-size records in fixed-size chunks, addressed by a uint32 index, with an intrusive
// free list. No per-record heap allocation; growing never moves records (unlike a doubling vector),
// so growth costs one chunk allocation and never a copy of the table. Chunks come from the table's
// ChunkArena (huge pages, chunk_arena.h) and start on a cache line.
//
// Thread safety: none; the owning shard's mutex protects it (the arena locks itself).

#ifndef PSEMBED_TABLE_ROW_STORE_SLAB_POOL_H_
#define PSEMBED_TABLE_ROW_STORE_SLAB_POOL_H_

#include <algorithm>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "table/row_store/chunk_arena.h"

namespace psembed {

class SlabPool {
 public:
  static constexpr int kChunkShift = 10;  // 1024 records per chunk
  static constexpr uint32_t kChunkRecords = 1u << kChunkShift;
  static constexpr uint32_t kNone = 0xffffffffu;
  // Indexes stay below 2^31 - 1, so a caller may use the top bit of an index as a tag (RowRef).
  static constexpr uint32_t kMaxRecords = 0x7fffffffu;

  // REQUIRES: stride_bytes >= 4 and a multiple of 4; arena outlives the pool.
  SlabPool(size_t stride_bytes, ChunkArena* arena) : stride_(stride_bytes), arena_(arena) {
    assert(stride_ >= 4 && stride_ % 4 == 0 && arena_ != nullptr);
  }
  ~SlabPool() { Clear(); }
  SlabPool(const SlabPool&) = delete;
  SlabPool& operator=(const SlabPool&) = delete;

  // A record index (< kMaxRecords); its bytes are unspecified. Throws std::bad_alloc (also when the
  // pool already holds kMaxRecords records).
  uint32_t Allocate() {
    if (free_head_ != kNone) {
      const uint32_t idx = free_head_;
      free_head_ = *reinterpret_cast<uint32_t*>(At(idx));
      ++live_;
      return idx;
    }
    if (next_ == kMaxRecords) throw std::bad_alloc();
    if ((next_ >> kChunkShift) >= chunks_.size()) {
      // Grow the directory first, so push_back cannot throw with the chunk in hand.
      if (chunks_.size() == chunks_.capacity()) chunks_.reserve(2 * chunks_.size() + 1);
      chunks_.push_back(static_cast<char*>(arena_->Allocate(chunk_bytes())));
    }
    ++live_;
    return next_++;
  }

  // Makes room for n more records: the next n Allocate() calls take no chunk and cannot throw (Free()s
  // between them only add room). Throws std::bad_alloc (also when n would pass kMaxRecords); chunks it
  // added before failing stay in the pool, as room.
  void Reserve(size_t n) {
    const size_t free_listed = next_ - live_;  // every index below next_ is live or on the free list
    if (n <= free_listed) return;
    const size_t fresh = n - free_listed;  // records taken from next_ on
    if (fresh > kMaxRecords - next_) throw std::bad_alloc();
    const size_t chunks = (next_ + fresh + kChunkRecords - 1) >> kChunkShift;
    if (chunks <= chunks_.size()) return;
    // First, so push_back cannot throw with a chunk in hand; at least doubling, as Allocate grows it.
    chunks_.reserve(std::max(chunks, 2 * chunks_.size() + 1));
    while (chunks_.size() < chunks) chunks_.push_back(static_cast<char*>(arena_->Allocate(chunk_bytes())));
  }

  // REQUIRES: idx came from Allocate() and was not freed since.
  void Free(uint32_t idx) {
    *reinterpret_cast<uint32_t*>(At(idx)) = free_head_;
    free_head_ = idx;
    --live_;
  }

  char* At(uint32_t idx) const { return chunks_[idx >> kChunkShift] + (idx & (kChunkRecords - 1)) * stride_; }

  // Frees every record and gives the chunks back to the arena. Cannot fail (a shard's Clear and
  // destructor run it): the pool is emptied first, so each chunk is given back once whatever happens,
  // and the arena's Free allocates nothing.
  void Clear() noexcept {
    std::vector<char*> chunks;
    chunks.swap(chunks_);  // the directory's memory goes with it (no shrink_to_fit, which may allocate)
    next_ = 0;
    free_head_ = kNone;
    live_ = 0;
    for (char* c : chunks) arena_->Free(c, chunk_bytes());
  }

  size_t live() const { return live_; }
  // Bytes held (capacity): the chunks and the chunk directory.
  size_t bytes() const { return chunks_.size() * chunk_bytes() + chunks_.capacity() * sizeof(char*); }

 private:
  size_t chunk_bytes() const { return stride_ * kChunkRecords; }

  const size_t stride_;
  ChunkArena* const arena_;    // not owned
  std::vector<char*> chunks_;  // owned (from arena_)
  uint32_t next_ = 0;          // records ever handed out from the chunks (high-water mark)
  uint32_t free_head_ = kNone; // intrusive list through the first 4 bytes of freed records
  size_t live_ = 0;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_ROW_STORE_SLAB_POOL_H_
