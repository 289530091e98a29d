// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Golden values: saved shards and the owner rank of every key depend on Mix64/Route. If one of these
// fails, the hash changed and existing checkpoints are orphaned: do not "fix" the numbers.

#include "util/hash.h"

#include <cstddef>
#include <random>
#include <set>
#include <vector>

#include "util/testharness.h"

namespace psembed {
namespace {

void TestMix64Golden() {
  CHECK_EQ(Mix64(0), 0ULL);
  CHECK_EQ(Mix64(1), 6238072747940578789ULL);
  CHECK_EQ(Mix64(~0ULL), 13029008266876403067ULL);  // key -1 as int64
  CHECK_EQ(Mix64(0x7fffffffffffffffULL), 6514504133438201533ULL);
  CHECK_EQ(Mix64(0x8000000000000000ULL), 2720858781877447050ULL);
  CHECK_EQ(Mix64(123456789ULL), 17445968401720671584ULL);
}

void TestRouteIsMix64Mod() {
  for (uint64_t k = 0; k < 1000; ++k) {
    const uint64_t key = k * 0x9e3779b97f4a7c15ULL;
    CHECK_EQ(Route(key, 7), Mix64(key) % 7);
    CHECK_EQ(Route(key, 1), 0u);
  }
}

void TestUniformRangeAndDeterminism() {
  double sum = 0;
  for (uint64_t k = 0; k < 10000; ++k) {
    const double u = Uniform01(42, k, kStreamMfInit, 3);
    CHECK(u >= 0.0 && u < 1.0);
    CHECK_EQ(u, Uniform01(42, k, kStreamMfInit, 3));
    sum += u;
  }
  CHECK(sum / 10000 > 0.48 && sum / 10000 < 0.52);
  CHECK_NE(Uniform01(1, 5, 1, 0), Uniform01(1, 5, 2, 0));
}

void TestShardsSpreadEvenly() {
  const uint32_t shards = 64;
  uint32_t counts[64] = {0};
  for (uint64_t k = 0; k < 64000; ++k) ++counts[ShardOf(TableHash(k), shards)];
  for (uint32_t c : counts) CHECK(c > 800 && c < 1200);
}

void TestDedup() {
  const uint64_t keys[] = {5, 0, 5, ~0ULL, 0, 7, 5, ~0ULL};
  uint64_t uniq[8];
  int64_t inv[8];
  CHECK_EQ(Dedup(keys, 8, uniq, inv), 4u);
  const uint64_t want_u[] = {5, 0, ~0ULL, 7};
  const int64_t want_i[] = {0, 1, 0, 2, 1, 3, 0, 2};
  for (int i = 0; i < 4; ++i) CHECK_EQ(uniq[i], want_u[i]);
  for (int i = 0; i < 8; ++i) CHECK_EQ(inv[i], want_i[i]);
  CHECK_EQ(Dedup(keys, 0, uniq, inv), 0u);
  std::vector<uint64_t> many(20000), u(20000);
  std::vector<int64_t> iv(20000);
  for (size_t i = 0; i < many.size(); ++i) many[i] = (i * 7919) % 3001;
  const size_t n = Dedup(many.data(), many.size(), u.data(), iv.data());
  CHECK_EQ(n, 3001u);
  for (size_t i = 0; i < many.size(); ++i) CHECK_EQ(u[static_cast<size_t>(iv[i])], many[i]);
}

void TestDedupByOwner() {
  std::vector<uint64_t> keys(5000);
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = ((i * 7919) % 1201) * 0x9e3779b97f4a7c15ULL;
  for (uint32_t parts : {1u, 2u, 3u, 8u}) {
    std::vector<uint64_t> uniq(keys.size()), first(keys.size());
    std::vector<int64_t> inv(keys.size()), first_inv(keys.size()), starts(parts + 1);
    const size_t u = DedupByOwner(keys.data(), keys.size(), parts, uniq.data(), inv.data(), starts.data());
    CHECK_EQ(u, 1201u);
    CHECK_EQ(Dedup(keys.data(), keys.size(), first.data(), first_inv.data()), u);
    CHECK_EQ(starts[0], 0);
    CHECK_EQ(static_cast<size_t>(starts[parts]), u);
    for (size_t i = 0; i < keys.size(); ++i) CHECK_EQ(uniq[static_cast<size_t>(inv[i])], keys[i]);
    // Part p's slice holds exactly its keys, in first-occurrence order.
    size_t at = 0;
    for (uint32_t p = 0; p < parts; ++p) {
      for (size_t j = 0; j < u; ++j) {
        if (Route(first[j], parts) != p) continue;
        CHECK(static_cast<int64_t>(at) >= starts[p] && static_cast<int64_t>(at) < starts[p + 1]);
        CHECK_EQ(uniq[at++], first[j]);
      }
    }
  }
  int64_t starts[3];
  CHECK_EQ(DedupByOwner(nullptr, 0, 2, nullptr, nullptr, starts), 0u);
  CHECK_EQ(starts[2], 0);
}

// Dedup and DedupByOwner reuse their per-thread scratch across calls: calls of growing, shrinking and
// growing sizes, and keys seen by an earlier call, must not leak into a later call's answer.
void TestDedupReusesScratchCleanly() {
  std::mt19937_64 rng(7);
  for (size_t n : {3000u, 10u, 40000u, 1u, 5000u, 40000u}) {
    std::vector<uint64_t> keys(n);
    for (auto& k : keys) k = rng() % (n / 2 + 1);  // ~ half repeats; the same small keys every call
    for (uint32_t parts : {1u, 3u}) {
      std::vector<uint64_t> uniq(n);
      std::vector<int64_t> inv(n), starts(parts + 1);
      const size_t u = DedupByOwner(keys.data(), n, parts, uniq.data(), inv.data(), starts.data());
      std::set<uint64_t> want(keys.begin(), keys.end());
      CHECK_EQ(u, want.size());
      CHECK(std::set<uint64_t>(uniq.begin(), uniq.begin() + static_cast<std::ptrdiff_t>(u)) == want);
      for (size_t i = 0; i < n; ++i) CHECK_EQ(uniq[static_cast<size_t>(inv[i])], keys[i]);
    }
  }
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestMix64Golden);
  RUN_TEST(psembed::TestRouteIsMix64Mod);
  RUN_TEST(psembed::TestUniformRangeAndDeterminism);
  RUN_TEST(psembed::TestShardsSpreadEvenly);
  RUN_TEST(psembed::TestDedup);
  RUN_TEST(psembed::TestDedupByOwner);
  RUN_TEST(psembed::TestDedupReusesScratchCleanly);
  return 0;
}
