// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ChunkArena and HugePageAlloc: alignment, zeroed fresh memory, exact-size reuse, release on empty,
// and blocks that never overlap (each block is filled with its own pattern and re-checked), with
// several threads allocating at once as the shards of one table do. ChunkArena::Free and
// SlabPool::Clear never allocate: with every heap allocation failing they still free everything once
// (this binary's operator new fails on request).

#include "table/row_store/chunk_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <utility>
#include <vector>

#include "table/row_store/slab_pool.h"
#include "util/huge_pages.h"
#include "util/failing_new_for_test.h"
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

using FailAllocations = failing_new::FailAll;  // every heap allocation fails for its lifetime

// Free used to lower in_use_ and then allocate a free-list entry (the first block of a size, or a
// vector growing); a std::bad_alloc there left the block counted as free but on no list, and a Clear
// that retried freed it twice. Free now never allocates: with every allocation failing it frees
// blocks of several sizes (a segment's and one of its own mapping), and each comes back, once.
static_assert(noexcept(std::declval<ChunkArena&>().Free(nullptr, 64)), "Free is called where it must not fail");
static_assert(noexcept(std::declval<SlabPool&>().Clear()), "a shard's Clear and destructor run it");

void TestFreeNeverAllocates() {
  ChunkArena arena;
  const size_t sizes[] = {36 * 1024, 32 * 1024 + 4, ChunkArena::kSegmentBytes + 4096};
  std::vector<std::vector<void*>> blocks(3);
  for (int i = 0; i < 40; ++i) {
    for (int s = 0; s < 3; ++s) {
      if (s < 2 || i < 2) blocks[s].push_back(arena.Allocate(sizes[s]));
    }
  }
  void* keep = arena.Allocate(4096);  // still in use: the frees below do not empty the arena
  bool threw = false;
  {
    FailAllocations fail;
    for (int s = 0; s < 3; ++s) {
      for (void* p : blocks[s]) {
        try {
          arena.Free(p, sizes[s]);
        } catch (const std::bad_alloc&) {
          threw = true;
        }
      }
    }
  }
  CHECK(!threw);
  CHECK_EQ(arena.bytes_in_use(), 4096u);
  for (int s = 0; s < 3; ++s) {  // every freed block is reused for its size, and none twice
    std::vector<void*> again;
    for (size_t i = 0; i < blocks[s].size(); ++i) again.push_back(arena.Allocate(sizes[s]));
    std::sort(again.begin(), again.end());
    std::sort(blocks[s].begin(), blocks[s].end());
    CHECK(again == blocks[s]);
  }
  for (int s = 0; s < 3; ++s) {
    for (void* p : blocks[s]) arena.Free(p, sizes[s]);
  }
  arena.Free(keep, 4096);
  CHECK_EQ(arena.bytes_in_use(), 0u);
}

// A shard's two pools share the table's arena. A std::bad_alloc inside Clear (from the arena's Free)
// left the pool holding chunks the arena counted as free; a second Clear freed them again, the arena
// unmapped every segment while the other pool still used them, and the next allocation wrote to
// unmapped memory. Clear (and ~SlabPool) now cannot fail: with every allocation failing it empties the
// pool, a second Clear is a no-op, and the other pool's records are untouched by the refilled one.
void TestSlabPoolClearUnderBadAlloc() {
  ChunkArena arena;
  SlabPool a(32, &arena);
  SlabPool b(48, &arena);
  constexpr uint32_t kRecords = 5000;  // 5 chunks each
  for (uint32_t i = 0; i < kRecords; ++i) {
    CHECK_EQ(a.Allocate(), i);
    CHECK_EQ(b.Allocate(), i);
    std::memset(b.At(i), 0x5b, 48);
  }
  for (uint32_t i = 0; i < kRecords; i += 3) a.Free(i);  // a free list through the records as well
  const size_t chunks = (kRecords + SlabPool::kChunkRecords - 1) / SlabPool::kChunkRecords;
  const size_t a_bytes = chunks * 32 * SlabPool::kChunkRecords;
  const size_t b_bytes = chunks * 48 * SlabPool::kChunkRecords;
  bool threw = false;
  {
    FailAllocations fail;
    try {
      a.Clear();
    } catch (const std::bad_alloc&) {
      threw = true;
    }
  }
  CHECK(!threw);
  CHECK_EQ(a.live(), 0u);
  CHECK_EQ(a.bytes(), 0u);
  CHECK_EQ(arena.bytes_in_use(), b_bytes);  // only b's chunks are left
  a.Clear();  // nothing left to free: b's chunks stay
  CHECK_EQ(arena.bytes_in_use(), b_bytes);
  for (uint32_t i = 0; i < kRecords; ++i) {
    CHECK_EQ(a.Allocate(), i);
    std::memset(a.At(i), 0xa3, 32);
  }
  for (uint32_t i = 0; i < kRecords; ++i) {
    const auto* r = reinterpret_cast<const unsigned char*>(b.At(i));
    for (int j = 0; j < 48; ++j) CHECK_EQ(r[j], 0x5b);
  }
  // Destroying pools (a shard's destructor) with allocation failing: no std::terminate, all given back.
  auto c = std::make_unique<SlabPool>(64, &arena);
  for (uint32_t i = 0; i < 1500; ++i) c->Allocate();
  {
    FailAllocations fail;
    c.reset();
    b.Clear();
  }
  CHECK_EQ(arena.bytes_in_use(), a_bytes);  // only a's (refilled) chunks are left
}

// Reserve(n) counts the free list and the unused end of the last chunk, adds chunks for the rest, and then
// n Allocate() calls succeed while every heap allocation fails (the chunk directory included).
void TestSlabPoolReserveMakesAllocateInfallible() {
  ChunkArena arena;
  SlabPool p(32, &arena);
  constexpr uint32_t kChunk = SlabPool::kChunkRecords;
  for (uint32_t i = 0; i < kChunk + 10; ++i) p.Allocate();  // two chunks, the second nearly empty
  for (uint32_t i = 0; i < 100; ++i) p.Free(i);             // 100 on the free list
  const size_t two_chunks = 2 * 32 * size_t{kChunk};
  CHECK_EQ(arena.bytes_in_use(), two_chunks);
  p.Reserve(100 + (kChunk - 10));  // exactly the room there is: no chunk added
  CHECK_EQ(arena.bytes_in_use(), two_chunks);
  const size_t want = 100 + (kChunk - 10) + 2 * kChunk + 1;  // three more chunks' worth
  p.Reserve(want);
  CHECK_EQ(arena.bytes_in_use(), two_chunks + 3 * 32 * size_t{kChunk});
  const size_t live = p.live();
  {
    FailAllocations fail;
    for (size_t i = 0; i < want; ++i) p.Allocate();
  }
  CHECK_EQ(p.live(), live + want);
  // Those took the fifth chunk's first record; the rest of it is room too. Past it, a sixth chunk would
  // need the directory to grow, which fails.
  bool threw = false;
  {
    FailAllocations fail;
    for (uint32_t i = 0; i < kChunk - 1; ++i) p.Allocate();
    try {
      p.Allocate();
    } catch (const std::bad_alloc&) {
      threw = true;
    }
  }
  CHECK(threw);
  CHECK_EQ(p.live(), live + want + kChunk - 1);
  threw = false;
  try {
    p.Reserve(size_t{SlabPool::kMaxRecords});  // more than a pool can ever hold
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  CHECK(threw);
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestHugePageAllocIsZeroedAndAligned);
  RUN_TEST(psembed::TestArenaAlignsReusesAndReleases);
  RUN_TEST(psembed::TestBlocksLargerThanASegment);
  RUN_TEST(psembed::TestConcurrentBlocksNeverOverlap);
  RUN_TEST(psembed::TestFreeNeverAllocates);
  RUN_TEST(psembed::TestSlabPoolClearUnderBadAlloc);
  RUN_TEST(psembed::TestSlabPoolReserveMakesAllocateInfallible);
  return 0;
}
