// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/row_store/index_arena.h"

#include <cassert>
#include <cstring>
#include <new>

#include "util/huge_pages.h"
#include "util/round_up.h"

namespace psembed {

namespace {
constexpr size_t kAlign = 64;  // arrays start on a cache line (a 12-byte slot then straddles one in 16)
}  // namespace

IndexArena::~IndexArena() {
  MutexLock l(&mu_);
  for (Region& r : regions_) HugePageFree(r.base, region_bytes(r));
}

size_t IndexArena::region_bytes(const Region& r) const { return RoundUp(r.stride * owners_, kHugePageBytes); }

void* IndexArena::Allocate(size_t bytes, uint32_t owner) {
  assert(bytes > 0 && owner < owners_);
  if (bytes < kHugePageBytes) return HugePageAlloc(bytes, /*prefault=*/true);
  char* p = nullptr;
  bool zero = false;
  {
    MutexLock l(&mu_);
    Region* region = nullptr;
    for (Region& r : regions_) {
      if (r.bytes == bytes) region = &r;
    }
    if (region == nullptr) {
      const size_t stride = RoundUp(bytes, kAlign);
      regions_.reserve(regions_.size() + 1);  // so the push_back below cannot throw after the map
      Region r{bytes, stride, nullptr, 0, std::vector<uint8_t>(owners_, 0), std::vector<uint8_t>(owners_, 0)};
      r.base = static_cast<char*>(HugePageReserve(region_bytes(r)));
      if (r.base != nullptr) {
        regions_.push_back(std::move(r));
        region = &regions_.back();
      }
    }
    if (region != nullptr && !region->in_use[owner]) {
      region->in_use[owner] = 1;
      ++region->live;
      zero = region->used_once[owner] != 0;
      region->used_once[owner] = 1;
      p = region->base + owner * region->stride;
    }
  }
  if (p == nullptr) return HugePageAlloc(bytes, /*prefault=*/true);  // see the header's contract
  // Outside mu_: these bytes are this owner's alone until it frees them. An earlier array of this owner
  // left old slots in its end pages, so a reused one is zeroed (which also makes it resident); fresh
  // ones read zero and are prefaulted. The huge pages at either end may be a neighbour's too: the
  // prefault makes them resident without changing a byte of theirs.
  if (zero) {
    std::memset(p, 0, bytes);
  } else {
    HugePagePrefault(p, bytes);
  }
  return p;
}

void IndexArena::Free(void* p, size_t bytes, uint32_t owner) {
  if (p == nullptr) return;
  if (bytes >= kHugePageBytes) {
    MutexLock l(&mu_);
    for (size_t i = 0; i < regions_.size(); ++i) {
      Region& r = regions_[i];
      if (r.bytes != bytes || p != r.base + owner * r.stride || !r.in_use[owner]) continue;
      r.in_use[owner] = 0;
      if (--r.live == 0) {
        HugePageFree(r.base, region_bytes(r));
        regions_.erase(regions_.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        HugePageRelease(p, bytes);  // under mu_: the region cannot be unmapped meanwhile
      }
      return;
    }
  }
  HugePageFree(p, bytes);  // a mapping of its own (or calloc below 2 MiB)
}

size_t IndexArena::regions() const {
  MutexLock l(&mu_);
  return regions_.size();
}

}  // namespace psembed
