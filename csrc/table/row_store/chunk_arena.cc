// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/row_store/chunk_arena.h"

#include <cassert>
#include <new>

#include "util/huge_pages.h"
#include "util/round_up.h"

namespace psembed {

namespace {
constexpr size_t kAlign = 64;  // a cache line: a 32-byte record never straddles two
}  // namespace

ChunkArena::~ChunkArena() {
  MutexLock l(&mu_);
  ReleaseAllLocked();
}

void* ChunkArena::Allocate(size_t bytes) {
  assert(bytes > 0);
  const size_t size = RoundUp(bytes, kAlign);
  MutexLock l(&mu_);
  FreeList* list = nullptr;
  for (FreeList& f : free_) {
    if (f.size == size) {
      list = &f;
      break;
    }
  }
  if (list == nullptr) {
    // The first block of this size: its list entry now, so that freeing it never allocates. (If the
    // mapping below fails, the empty entry stays, harmless; ReleaseAllLocked drops it.)
    free_.push_back(FreeList{size, nullptr});
  } else if (list->head != nullptr) {
    void* p = list->head;
    list->head = *static_cast<void**>(p);
    in_use_ += size;
    return p;
  }
  if (size > kSegmentBytes) {
    // A chunk larger than a segment (1024 records of over 32 KiB: dim ~2700+ with Adam or FTRL, ~4093+
    // with StdAdaGrad) gets a mapping of its own; carving it from a segment ran past the segment's end.
    // Freed, it is reused for a chunk of the same size, as any block.
    segments_.reserve(segments_.size() + 1);
    char* own = static_cast<char*>(HugePageAlloc(size));
    segments_.emplace_back(own, size);
    in_use_ += size;
    return own;
  }
  if (left_ < size) {
    segments_.reserve(segments_.size() + 1);  // so the push_back below cannot throw after the map
    char* seg = static_cast<char*>(HugePageAlloc(kSegmentBytes));
    segments_.emplace_back(seg, kSegmentBytes);
    next_ = seg;
    left_ = kSegmentBytes;
  }
  void* p = next_;
  next_ += size;
  left_ -= size;
  in_use_ += size;
  return p;
}

void ChunkArena::Free(void* p, size_t bytes) noexcept {
  const size_t size = RoundUp(bytes, kAlign);
  MutexLock l(&mu_);
  assert(in_use_ >= size);
  in_use_ -= size;
  if (in_use_ == 0) {  // the whole table is gone (Clear): give everything back
    ReleaseAllLocked();
    return;
  }
  for (FreeList& f : free_) {
    if (f.size == size) {  // present: Allocate(size) made it (see free_)
      *static_cast<void**>(p) = f.head;  // a block is >= 64 bytes and 64-byte aligned
      f.head = p;
      return;
    }
  }
  assert(false && "ChunkArena::Free: a size never allocated");
}

size_t ChunkArena::bytes_in_use() const {
  MutexLock l(&mu_);
  return in_use_;
}

// Allocates nothing (Free calls it): the vectors' memory goes by swap, not shrink_to_fit.
void ChunkArena::ReleaseAllLocked() {
  for (const auto& [seg, bytes] : segments_) HugePageFree(seg, bytes);
  std::vector<std::pair<char*, size_t>>().swap(segments_);
  free_.clear();  // every block was in a segment; the heads of the sizes come back with Allocate
  next_ = nullptr;
  left_ = 0;
}

}  // namespace psembed
