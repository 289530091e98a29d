// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// PushMerger: both ways through a push (MergeCall + SortByShard, MergeRun over shard runs) against a
// reference left fold written here (a std::map per key, input order), bit for bit, with duplicates,
// skipped rows, slots and key 0; two keys that share MergeCall's probe slot and tag; and the scratch
// reused by a smaller call after a bigger one.

#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "table/push_merge.h"
#include "util/hash.h"
#include "util/testharness.h"

namespace psembed {
namespace {

constexpr size_t kGw = 3;  // 1 + dim

struct Call {
  std::vector<uint64_t> keys;
  std::vector<float> grads, shows, clicks;
  std::vector<int32_t> slots;
  std::vector<uint8_t> skip;
  PushRows Rows() const { return PushRows{grads.data(), kGw, shows.data(), clicks.data(), slots.data()}; }
};

// n rows over a universe of u keys (key 0 among them), about 1 in 20 rows skipped.
Call RandomCall(size_t n, size_t u, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint64_t> universe(u);
  for (auto& k : universe) k = rng();
  universe[0] = 0;
  std::normal_distribution<float> normal;
  Call c;
  for (size_t i = 0; i < n; ++i) {
    c.keys.push_back(universe[rng() % u]);
    for (size_t d = 0; d < kGw; ++d) c.grads.push_back(normal(rng));
    c.shows.push_back(static_cast<float>(rng() % 3));
    c.clicks.push_back(static_cast<float>(rng() % 2));
    c.slots.push_back(static_cast<int32_t>(rng() % 100));
    c.skip.push_back(rng() % 20 == 0 ? 1 : 0);
  }
  return c;
}

// What a merged key must hold, folded here in input order.
struct Want {
  size_t first;  // input row of the first occurrence
  std::vector<float> grad;
  float show, click;
  int32_t slot;
};

std::map<uint64_t, Want> Reference(const Call& c) {
  std::map<uint64_t, Want> want;
  for (size_t p = 0; p < c.keys.size(); ++p) {
    if (c.skip[p]) continue;
    const float* g = &c.grads[p * kGw];
    auto it = want.find(c.keys[p]);
    if (it == want.end()) {
      want[c.keys[p]] = Want{p, std::vector<float>(g, g + kGw), c.shows[p], c.clicks[p], c.slots[p]};
      continue;
    }
    for (size_t d = 0; d < kGw; ++d) it->second.grad[d] += g[d];
    it->second.show += c.shows[p];
    it->second.click += c.clicks[p];
    it->second.slot = c.slots[p];
  }
  return want;
}

// items[0, n) are shard s's merged keys: each equals its reference bit for bit, they come in order of
// first occurrence and all belong to shard s. Returns n.
size_t CheckShard(const MergedPush* items, size_t n, uint32_t s, uint32_t num_shards,
                  const std::map<uint64_t, Want>& want) {
  size_t last_first = 0;
  for (size_t j = 0; j < n; ++j) {
    const MergedPush& it = items[j];
    const auto w = want.find(it.key);
    CHECK(w != want.end());
    CHECK_EQ(it.hash, TableHash(it.key));
    CHECK_EQ(ShardOf(it.hash, num_shards), s);
    CHECK(j == 0 || w->second.first > last_first);
    last_first = w->second.first;
    CHECK(std::memcmp(it.grad, w->second.grad.data(), kGw * sizeof(float)) == 0);
    CHECK(std::memcmp(&it.show, &w->second.show, sizeof(float)) == 0);
    CHECK(std::memcmp(&it.click, &w->second.click, sizeof(float)) == 0);
    CHECK_EQ(it.slot, w->second.slot);
  }
  return n;
}

void TestBothWaysMatchTheReference() {
  constexpr uint32_t kShards = 8;
  PushMerger call_merger, run_merger;
  // A big call first, then smaller ones on the same mergers (scratch reused, never cleared between).
  for (const auto& [n, u] : {std::pair<size_t, size_t>{20000, 3000}, {5000, 40}, {7, 3}, {3000, 3000}}) {
    const Call c = RandomCall(n, u, static_cast<uint32_t>(n + u));
    const auto want = Reference(c);
    call_merger.MergeCall(c.keys.data(), n, c.skip.data(), c.Rows(), kShards);
    call_merger.SortByShard(kShards);
    size_t total = 0;
    for (uint32_t s = 0; s < kShards; ++s) {
      const uint32_t b = call_merger.begin(s), e = call_merger.begin(s + 1);
      total += CheckShard(call_merger.sorted() + b, e - b, s, kShards, want);
    }
    CHECK_EQ(total, want.size());
    CHECK_EQ(call_merger.begin(kShards), want.size());
    // MergeRun over each shard's run (its rows in input order), as the partition hands them over.
    total = 0;
    for (uint32_t s = 0; s < kShards; ++s) {
      std::vector<uint64_t> run_keys;
      std::vector<uint32_t> run_pos;
      for (size_t p = 0; p < n; ++p) {
        if (!c.skip[p] && ShardOf(TableHash(c.keys[p]), kShards) == s) {
          run_keys.push_back(c.keys[p]);
          run_pos.push_back(static_cast<uint32_t>(p));
        }
      }
      const size_t num = run_merger.MergeRun(run_keys.data(), run_pos.data(), run_keys.size(), c.Rows());
      total += CheckShard(run_merger.items(), num, s, kShards, want);
    }
    CHECK_EQ(total, want.size());
    call_merger.Trim();
    run_merger.Trim();
  }
}

void TestKeysSharingAProbeSlotAndTag() {
  // Two keys whose hashes agree in their low 32 bits: in a call of under 2,048 rows MergeCall starts both
  // probes at the same slot ((hash >> 20) & mask, mask < 2^12) with the same tag, so only the key
  // comparison tells them apart. Found by a birthday search over 2^18 keys (~8 pairs expected).
  std::map<uint32_t, uint64_t> seen;
  uint64_t a = 0, b = 0;
  for (uint64_t k = 1; b == 0; ++k) {
    const uint32_t low = static_cast<uint32_t>(TableHash(k));
    const auto it = seen.find(low);
    if (it != seen.end()) {
      a = it->second;
      b = k;
    }
    seen[low] = k;
    CHECK_LT(k, uint64_t{1} << 22);
  }
  Call c;
  for (uint64_t k : {a, b, a, b, b}) {
    c.keys.push_back(k);
    for (size_t d = 0; d < kGw; ++d) c.grads.push_back(k == a ? 1.0f : 10.0f);
    c.shows.push_back(1.0f);
    c.clicks.push_back(k == a ? 1.0f : 0.0f);
    c.slots.push_back(k == a ? 7 : 9);
    c.skip.push_back(0);
  }
  PushMerger m;
  m.MergeCall(c.keys.data(), c.keys.size(), nullptr, c.Rows(), 1);
  m.SortByShard(1);
  CHECK_EQ(m.begin(1), 2u);
  CHECK_EQ(m.sorted()[0].key, a);
  CHECK_EQ(m.sorted()[0].grad[0], 2.0f);
  CHECK_EQ(m.sorted()[0].show, 2.0f);
  CHECK_EQ(m.sorted()[0].click, 2.0f);
  CHECK_EQ(m.sorted()[1].key, b);
  CHECK_EQ(m.sorted()[1].grad[kGw - 1], 30.0f);
  CHECK_EQ(m.sorted()[1].show, 3.0f);
  CHECK_EQ(m.sorted()[1].slot, 9);
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestBothWaysMatchTheReference);
  RUN_TEST(psembed::TestKeysSharingAProbeSlotAndTag);
  return 0;
}
