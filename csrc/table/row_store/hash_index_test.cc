// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// HashIndex against std::unordered_map under random insert/erase/update churn (backward-shift
// deletion must keep every remaining key reachable), plus the out-of-line key 0.

#include "table/row_store/hash_index.h"

#include <random>
#include <unordered_map>
#include <vector>

#include "table/row_store/slab_pool.h"
#include "util/testharness.h"

namespace psembed {
namespace {

void TestChurnAgainstStdMap() {
  HashIndex index;
  std::unordered_map<uint64_t, uint32_t> ref;
  std::mt19937_64 rng(7);
  for (int step = 0; step < 200000; ++step) {
    // Small key space so that clusters form and erase shifts entries.
    const uint64_t key = rng() % 3000 == 0 ? 0 : (rng() % 5000) * 0x10001ULL;
    const uint64_t h = TableHash(key);
    const int op = static_cast<int>(rng() % 3);
    auto it = ref.find(key);
    if (op == 0) {
      if (it == ref.end()) {
        index.Insert(key, h, static_cast<uint32_t>(step));
        ref[key] = static_cast<uint32_t>(step);
      } else {
        CHECK(index.Update(key, h, static_cast<uint32_t>(step)));
        it->second = static_cast<uint32_t>(step);
      }
    } else if (op == 1) {
      const uint32_t v = index.Erase(key, h);
      if (it == ref.end()) {
        CHECK_EQ(v, HashIndex::kNotFound);
      } else {
        CHECK_EQ(v, it->second);
        ref.erase(it);
      }
    } else {
      const uint32_t v = index.Find(key, h);
      CHECK_EQ(v, it == ref.end() ? HashIndex::kNotFound : it->second);
    }
    CHECK_EQ(index.size(), ref.size());
  }
  size_t seen = 0;
  index.ForEach([&](uint64_t k, uint32_t v) {
    CHECK_EQ(ref.at(k), v);
    ++seen;
  });
  CHECK_EQ(seen, ref.size());
  CHECK(index.bytes() == index.capacity() * 12);
  CHECK_LE(index.size() * 5, index.capacity() * 4);
  index.Clear();
  CHECK_EQ(index.size(), 0u);
  CHECK_EQ(index.Find(5, TableHash(5)), HashIndex::kNotFound);
}

// Big enough that the slot array is mapped on huge pages (> 2 MiB) and rehashes several times.
void TestLargeIndexAcrossRehashes() {
  HashIndex index;
  constexpr uint64_t kKeys = 400000;
  for (uint64_t i = 1; i <= kKeys; ++i) {
    const uint64_t k = i * 0x9E3779B97F4A7C15ULL;
    index.Insert(k, TableHash(k), static_cast<uint32_t>(i));
  }
  CHECK_EQ(index.size(), kKeys);
  CHECK_LE(size_t{2} << 20, index.bytes());
  // Growth by 5/4 at load 0.7: right after a growth the load is 0.7 / 1.25 = 0.56 (a little less for the
  // rounding up to 16 slots), never less; never more than 0.7.
  CHECK_EQ(index.capacity() % 16, 0u);
  CHECK_LE(index.capacity() * 55, index.size() * 100);
  CHECK_LE(index.size() * 10, index.capacity() * 7);
  for (uint64_t i = 1; i <= kKeys; i += 2) {
    const uint64_t k = i * 0x9E3779B97F4A7C15ULL;
    CHECK_EQ(index.Erase(k, TableHash(k)), static_cast<uint32_t>(i));
  }
  for (uint64_t i = 1; i <= kKeys; ++i) {
    const uint64_t k = i * 0x9E3779B97F4A7C15ULL;
    CHECK_EQ(index.Find(k, TableHash(k)), i % 2 == 1 ? HashIndex::kNotFound : static_cast<uint32_t>(i));
  }
  size_t seen = 0;
  index.ForEach([&](uint64_t k, uint32_t v) {
    CHECK_EQ(k, uint64_t{v} * 0x9E3779B97F4A7C15ULL);
    ++seen;
  });
  CHECK_EQ(seen, kKeys / 2);
}

// FindOrInsert (the bulk load's one-probe insert) against std::unordered_map, key 0 and growth included;
// make_value runs only for absent keys.
void TestFindOrInsert() {
  HashIndex index;
  std::unordered_map<uint64_t, uint32_t> ref;
  std::mt19937_64 rng(9);
  uint32_t next = 0, made = 0;
  for (int step = 0; step < 100000; ++step) {
    const uint64_t key = rng() % 1000 == 0 ? 0 : (rng() % 40000) * 0x9E3779B97F4A7C15ULL;
    const uint32_t got = index.FindOrInsert(key, TableHash(key), [&] {
      ++made;
      return next++;
    });
    auto it = ref.find(key);
    if (it == ref.end()) {
      CHECK_EQ(got, HashIndex::kNotFound);
      ref[key] = next - 1;
    } else {
      CHECK_EQ(got, it->second);
    }
    CHECK_EQ(index.size(), ref.size());
    CHECK_EQ(made, ref.size());
  }
  for (const auto& [k, v] : ref) CHECK_EQ(index.Find(k, TableHash(k)), v);
  CHECK_LE(index.size() * 5, index.capacity() * 4);
  // Reserved first: no growth while inserting up to the reserved count.
  HashIndex reserved;
  reserved.Reserve(5000);
  const size_t cap = reserved.capacity();
  for (uint32_t i = 1; i <= 5000; ++i) {
    const uint64_t k = uint64_t{i} * 0x10001ULL;
    CHECK_EQ(reserved.FindOrInsert(k, TableHash(k), [&] { return i; }), HashIndex::kNotFound);
  }
  CHECK_EQ(reserved.capacity(), cap);
  // A throwing make_value leaves the map unchanged.
  bool threw = false;
  try {
    reserved.FindOrInsert(7, TableHash(7), []() -> uint32_t { throw 1; });
  } catch (int) {
    threw = true;
  }
  CHECK(threw);
  CHECK_EQ(reserved.size(), 5000u);
  CHECK_EQ(reserved.Find(7, TableHash(7)), HashIndex::kNotFound);
}

void TestSlabPoolReusesFreedRecords() {
  ChunkArena arena;
  SlabPool pool(12, &arena);
  std::vector<uint32_t> ids;
  for (int i = 0; i < 3000; ++i) {
    ids.push_back(pool.Allocate());
    *reinterpret_cast<uint32_t*>(pool.At(ids.back()) + 8) = static_cast<uint32_t>(i);
  }
  const size_t bytes = pool.bytes();
  for (int i = 0; i < 3000; i += 2) pool.Free(ids[i]);
  CHECK_EQ(pool.live(), 1500u);
  for (int i = 0; i < 1500; ++i) pool.Allocate();
  CHECK_EQ(pool.bytes(), bytes);  // freed records were reused, no new chunk
  for (int i = 1; i < 3000; i += 2) CHECK_EQ(*reinterpret_cast<uint32_t*>(pool.At(ids[i]) + 8), uint32_t(i));
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestChurnAgainstStdMap);
  RUN_TEST(psembed::TestLargeIndexAcrossRehashes);
  RUN_TEST(psembed::TestFindOrInsert);
  RUN_TEST(psembed::TestSlabPoolReusesFreedRecords);
  return 0;
}
