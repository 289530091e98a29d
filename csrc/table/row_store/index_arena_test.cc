// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// IndexArena: arrays of one size side by side in one huge-page region, zeroed (also when an owner's
// slot in a region is used again), the whole huge pages of a freed array given back, the region
// unmapped with its last array, fallbacks for small arrays and a second array of one size; and
// several owners' HashIndexes growing at once through the shared regions (run under TSan and ASan by
// scripts/sanitize.sh).

#include "table/row_store/index_arena.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "table/row_store/hash_index.h"
#include "util/huge_pages.h"
#include "util/testharness.h"

namespace psembed {
namespace {

bool AllZero(const unsigned char* p, size_t bytes) {
  for (size_t i = 0; i < bytes; ++i) {
    if (p[i] != 0) return false;
  }
  return true;
}

// Resident 4 KiB pages of [p, p + bytes), p page-aligned.
size_t ResidentPages(const void* p, size_t bytes) {
  const size_t pages = (bytes + 4095) / 4096;
  std::vector<unsigned char> v(pages);
  CHECK_EQ(mincore(const_cast<void*>(p), bytes, v.data()), 0);
  size_t n = 0;
  for (unsigned char c : v) n += c & 1;
  return n;
}

void TestArraysOfOneSizeShareARegion() {
  constexpr uint32_t kOwners = 5;
  constexpr size_t kBytes = 3 * kHugePageBytes + 1000;  // not a multiple of a huge page (nor of 64)
  const size_t stride = (kBytes + 63) / 64 * 64;
  IndexArena arena(kOwners);
  std::vector<unsigned char*> p(kOwners);
  for (uint32_t o = 0; o < kOwners; ++o) p[o] = static_cast<unsigned char*>(arena.Allocate(kBytes, o));
  CHECK_EQ(arena.regions(), 1u);
  CHECK_EQ(reinterpret_cast<uintptr_t>(p[0]) % kHugePageBytes, 0u);
  for (uint32_t o = 0; o < kOwners; ++o) {
    CHECK_EQ(p[o], p[0] + o * stride);  // side by side: neighbours share the huge page between them
    CHECK(AllZero(p[o], kBytes));
    std::memset(p[o], static_cast<int>(0x10 + o), kBytes);
  }
  for (uint32_t o = 0; o < kOwners; ++o) {  // no array wrote into another
    for (size_t i = 0; i < kBytes; i += 999) CHECK_EQ(p[o][i], 0x10 + o);
    CHECK_EQ(p[o][kBytes - 1], 0x10 + o);
  }

  // A freed array gives back the whole huge pages inside it; its neighbours keep their bytes.
  arena.Free(p[2], kBytes, 2);
  const uintptr_t inner = (reinterpret_cast<uintptr_t>(p[2]) + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  CHECK_EQ(ResidentPages(reinterpret_cast<void*>(inner), 2 * kHugePageBytes), 0u);
  CHECK_EQ(p[1][kBytes - 1], 0x11);
  CHECK_EQ(p[3][0], 0x13);
  // The same owner's next array of that size: the same place, all zero again (its end pages kept old bytes).
  auto* again = static_cast<unsigned char*>(arena.Allocate(kBytes, 2));
  CHECK_EQ(again, p[2]);
  CHECK(AllZero(again, kBytes));
  CHECK_EQ(p[1][kBytes - 1], 0x11);
  CHECK_EQ(p[3][0], 0x13);

  for (uint32_t o = 0; o < kOwners; ++o) arena.Free(p[o], kBytes, o);
  CHECK_EQ(arena.regions(), 0u);  // unmapped with its last array
}

void TestFallbacks() {
  IndexArena arena(2);
  // Below 2 MiB: calloc, no region.
  auto* small = static_cast<unsigned char*>(arena.Allocate(1 << 20, 0));
  CHECK_EQ(arena.regions(), 0u);
  CHECK(AllZero(small, 1 << 20));
  // A second array of one size for one owner (not something HashIndex does): a mapping of its own.
  constexpr size_t kBytes = kHugePageBytes * 2 + 12;
  auto* a = static_cast<unsigned char*>(arena.Allocate(kBytes, 1));
  auto* b = static_cast<unsigned char*>(arena.Allocate(kBytes, 1));
  CHECK_EQ(arena.regions(), 1u);
  CHECK(b + kBytes <= a || a + kBytes <= b);
  CHECK(AllZero(b, kBytes));
  std::memset(a, 1, kBytes);
  std::memset(b, 2, kBytes);
  CHECK_EQ(a[kBytes - 1], 1);
  arena.Free(b, kBytes, 1);
  CHECK_EQ(arena.regions(), 1u);  // b was not the region's
  arena.Free(a, kBytes, 1);
  arena.Free(small, 1 << 20, 0);
  CHECK_EQ(arena.regions(), 0u);
}

// Owners growing their indexes at once, as the shards of one table do on the pool's threads: every
// rehash allocates from and frees to the shared regions while the neighbours prefault and zero theirs.
void TestConcurrentIndexesGrowThroughSharedRegions() {
  constexpr uint32_t kOwners = 4;
  constexpr uint64_t kKeys = 300000;  // up to ~5 MiB of slots: several sizes past 2 MiB
  IndexArena arena(kOwners);
  std::vector<std::thread> threads;
  for (uint32_t o = 0; o < kOwners; ++o) {
    threads.emplace_back([&arena, o] {
      for (int round = 0; round < 2; ++round) {  // the second round reuses the owner's region slots
        HashIndex index(&arena, o);
        for (uint64_t i = 1; i <= kKeys; ++i) {
          const uint64_t k = (i * kOwners + o) * 0x9E3779B97F4A7C15ULL;
          index.Insert(k, TableHash(k), static_cast<uint32_t>(i));
        }
        CHECK_LE(size_t{2} << 20, index.bytes());
        for (uint64_t i = 1; i <= kKeys; ++i) {
          const uint64_t k = (i * kOwners + o) * 0x9E3779B97F4A7C15ULL;
          CHECK_EQ(index.Find(k, TableHash(k)), static_cast<uint32_t>(i));
        }
        size_t seen = 0;
        index.ForEach([&](uint64_t, uint32_t) { ++seen; });
        CHECK_EQ(seen, kKeys);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK_EQ(arena.regions(), 0u);  // every index was destroyed, so every region went back
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestArraysOfOneSizeShareARegion);
  RUN_TEST(psembed::TestFallbacks);
  RUN_TEST(psembed::TestConcurrentIndexesGrowThroughSharedRegions);
  return 0;
}
