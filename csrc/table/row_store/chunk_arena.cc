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
  assert(bytes > 0 && bytes <= kSegmentBytes);
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
  if (left_ < size) {
    segments_.reserve(segments_.size() + 1);  // so the push_back below cannot throw after the map
    char* seg = static_cast<char*>(HugePageAlloc(kSegmentBytes));
    segments_.push_back(seg);
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
  for (char* seg : segments_) HugePageFree(seg, kSegmentBytes);
  segments_.clear();
  segments_.shrink_to_fit();
  free_.clear();
  next_ = nullptr;
  left_ = 0;
}

}  // namespace psembed
