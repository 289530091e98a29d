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
  for (auto& [s, blocks] : free_) {
    if (s == size && !blocks.empty()) {
      void* p = blocks.back();
      blocks.pop_back();
      in_use_ += size;
      return p;
    }
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

void ChunkArena::Free(void* p, size_t bytes) {
  const size_t size = RoundUp(bytes, kAlign);
  MutexLock l(&mu_);
  in_use_ -= size;
  if (in_use_ == 0) {  // the whole table is gone (Clear): give everything back
    ReleaseAllLocked();
    return;
  }
  for (auto& [s, blocks] : free_) {
    if (s == size) {
      blocks.push_back(p);
      return;
    }
  }
  free_.emplace_back(size, std::vector<void*>{p});
}

size_t ChunkArena::bytes_in_use() const {
  MutexLock l(&mu_);
  return in_use_;
}

void ChunkArena::ReleaseAllLocked() {
  for (const auto& [seg, bytes] : segments_) HugePageFree(seg, bytes);
  segments_.clear();
  segments_.shrink_to_fit();
  free_.clear();
  next_ = nullptr;
  left_ = 0;
}

}  // namespace psembed
