// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ChunkArena and HugePageAlloc: alignment, zeroed fresh memory, exact-size reuse, release on empty,
// and blocks that never overlap (each block is filled with its own pattern and re-checked), with
// several threads allocating at once as the shards of one table do.

#include "table/row_store/chunk_arena.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "util/huge_pages.h"
#include "util/testharness.h"

namespace psembed {
namespace {

void TestHugePageAllocIsZeroedAndAligned() {
  for (bool prefault : {false, true}) {
    for (size_t bytes : {size_t{24}, size_t{1} << 20, kHugePageBytes, 3 * kHugePageBytes + 12, size_t{12} << 20}) {
      auto* p = static_cast<unsigned char*>(HugePageAlloc(bytes, prefault));
      CHECK_EQ(reinterpret_cast<uintptr_t>(p) % 16, 0u);
      if (bytes >= kHugePageBytes) CHECK_EQ(reinterpret_cast<uintptr_t>(p) % kHugePageBytes, 0u);
      if (prefault && bytes >= kHugePageBytes) {  // a mapping of its own: every page resident already
        const size_t pages = (bytes + 4095) / 4096;
        std::vector<unsigned char> resident(pages);
        CHECK_EQ(mincore(p, bytes, resident.data()), 0);
        for (size_t i = 0; i < pages; ++i) CHECK_EQ(resident[i] & 1, 1);
      }
      for (size_t i = 0; i < bytes; i += 4093) CHECK_EQ(p[i], 0);
      CHECK_EQ(p[bytes - 1], 0);
      std::memset(p, 0xab, bytes);  // the whole range is writable
      HugePageFree(p, bytes);
    }
  }
}

void TestArenaAlignsReusesAndReleases() {
  ChunkArena arena;
  std::vector<void*> a, b;
  for (int i = 0; i < 300; ++i) {  // 300 x 36 KiB: more than one segment
    a.push_back(arena.Allocate(36 * 1024));
    b.push_back(arena.Allocate(32 * 1024 + 4));
  }
  for (void* p : a) CHECK_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
  for (void* p : b) CHECK_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u);
  CHECK_EQ(arena.bytes_in_use(), 300u * (36 * 1024 + 32 * 1024 + 64));
  void* freed = a[7];
  arena.Free(freed, 36 * 1024);
  CHECK_EQ(arena.Allocate(36 * 1024), freed);  // exact-size reuse first
  for (void* p : a) arena.Free(p, 36 * 1024);
  for (void* p : b) arena.Free(p, 32 * 1024 + 4);
  CHECK_EQ(arena.bytes_in_use(), 0u);
  // Everything was released; the arena still works afterwards.
  auto* p = static_cast<uint32_t*>(arena.Allocate(4096));
  p[1023] = 5;
  arena.Free(p, 4096);
}

// A block larger than a segment (a chunk of 1024 records of over 32 KiB: dim 4096 with Adam) was carved
// from one segment and ran past its end, and every later block came from outside any mapping (a
// segfault with two keys). Such a block gets a mapping of its own; every byte of every block is writable
// and no two blocks overlap.
void TestBlocksLargerThanASegment() {
  ChunkArena arena;
  const size_t big = ChunkArena::kSegmentBytes + 4096 + 64;
  std::vector<std::pair<char*, size_t>> blocks;
  for (int i = 0; i < 3; ++i) {
    blocks.emplace_back(static_cast<char*>(arena.Allocate(big)), big);
    blocks.emplace_back(static_cast<char*>(arena.Allocate(4096)), 4096);
  }
  for (size_t i = 0; i < blocks.size(); ++i) std::memset(blocks[i].first, static_cast<int>(i + 1), blocks[i].second);
  for (size_t i = 0; i < blocks.size(); ++i) {
    CHECK_EQ(reinterpret_cast<uintptr_t>(blocks[i].first) % 64, 0u);
    CHECK_EQ(blocks[i].first[0], static_cast<char>(i + 1));
    CHECK_EQ(blocks[i].first[blocks[i].second - 1], static_cast<char>(i + 1));  // nothing wrote over it
  }
  CHECK_EQ(arena.bytes_in_use(), 3 * (big + 4096));
  arena.Free(blocks[2].first, big);
  CHECK_EQ(arena.Allocate(big), blocks[2].first);  // reused for the same size, as any block
  for (auto& [p, n] : blocks) arena.Free(p, n);
  CHECK_EQ(arena.bytes_in_use(), 0u);
}

void TestConcurrentBlocksNeverOverlap() {
  ChunkArena arena;
  constexpr int kThreads = 4;
  constexpr int kBlocks = 200;
  constexpr size_t kBytes = 36 * 1024;
  std::vector<std::vector<uint32_t*>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kBlocks; ++i) {
        auto* p = static_cast<uint32_t*>(arena.Allocate(kBytes));
        const uint32_t tag = static_cast<uint32_t>(t * kBlocks + i);
        for (size_t w = 0; w < kBytes / 4; ++w) p[w] = tag;
        got[t].push_back(p);
        if (i % 3 == 2) {  // free one now and then, so reuse races with fresh allocation
          arena.Free(got[t].front(), kBytes);
          got[t].erase(got[t].begin());
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) {
    for (uint32_t* p : got[t]) {
      const uint32_t tag = p[0];
      for (size_t w = 0; w < kBytes / 4; ++w) CHECK_EQ(p[w], tag);
    }
  }
  for (auto& v : got) {
    for (uint32_t* p : v) arena.Free(p, kBytes);
  }
  CHECK_EQ(arena.bytes_in_use(), 0u);
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestHugePageAllocIsZeroedAndAligned);
  RUN_TEST(psembed::TestArenaAlignsReusesAndReleases);
  RUN_TEST(psembed::TestBlocksLargerThanASegment);
  RUN_TEST(psembed::TestConcurrentBlocksNeverOverlap);
  return 0;
}
