// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// The bulk load (SparseTable::LoadRowSegments and the Shard phases behind it): insert-or-overwrite with
// last-one-wins against a std::map reference (new keys, keys already in the table, keys repeated within
// and across segments, rows gaining and losing mf, pieces of more than 2^16 rows), the undo of phase 1,
// and pulls racing a load (run under TSan and ASan/UBSan by scripts/sanitize.sh).

#include <atomic>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "table/counting_options_for_test.h"
#include "table/shard.h"
#include "table/sparse_table.h"
#include "util/hash.h"
#include "util/testharness.h"

namespace psembed {
namespace {

constexpr int kDim = 3;

// SGD (lr 1, no init noise), mf from the first push; the rest of CountingOptions does not matter here.
TableOptions Options(int num_shards, int num_threads) { return CountingOptions(num_threads, num_shards, kDim); }

// One row as the export columns hold it (SGD: base = show, click, delta, unseen, slot, lr_w).
struct Row {
  std::vector<float> base;
  bool has_mf = false;
  std::vector<float> mf;
};

struct Segment {
  std::vector<uint64_t> keys;
  std::vector<float> base;
  std::vector<uint8_t> has_mf;
  std::vector<float> mf;
  RowSegment View() const {
    RowSegment s;
    s.keys = keys.data();
    s.n = keys.size();
    s.base = base.data();
    s.has_mf = has_mf.data();
    s.mf = mf.data();
    s.mf_rows = mf.size() / kDim;
    return s;
  }
  void Add(uint64_t key, const Row& r) {
    keys.push_back(key);
    base.insert(base.end(), r.base.begin(), r.base.end());
    has_mf.push_back(r.has_mf ? 1 : 0);
    if (r.has_mf) mf.insert(mf.end(), r.mf.begin(), r.mf.end());
  }
};

Row RandomRow(std::mt19937_64* rng, size_t bw) {
  Row r;
  r.base.resize(bw);
  for (size_t j = 0; j < bw; ++j) r.base[j] = static_cast<float>((*rng)() % 1000);
  r.has_mf = (*rng)() % 3 != 0;
  if (r.has_mf) {
    r.mf.resize(kDim);
    for (float& x : r.mf) x = static_cast<float>((*rng)() % 1000) - 500.0f;
  }
  return r;
}

void CheckTableEquals(SparseTable* t, const std::map<uint64_t, Row>& ref) {
  ExportResult e;
  t->Export(ExportMode::kCheckpoint, 1, -1, &e);
  CHECK_EQ(e.keys.size(), ref.size());
  const size_t bw = t->layout().base_export_width();
  size_t i = 0, m = 0;
  for (const auto& [key, r] : ref) {  // both sorted by key as uint64
    CHECK_EQ(e.keys[i], key);
    for (size_t j = 0; j < bw; ++j) CHECK_EQ(e.base[i * bw + j], r.base[j]);
    CHECK_EQ(e.has_mf[i], r.has_mf ? 1 : 0);
    if (r.has_mf) {
      for (int d = 0; d < kDim; ++d) CHECK_EQ(e.mf[m * kDim + d], r.mf[d]);
      ++m;
    }
    ++i;
  }
}

// Insert-or-overwrite, last one wins, on a table that already holds rows; one segment is longer than a
// load piece (2^16 rows), so phase 3 finds overwritten rows in several pieces.
void TestLoadOverwritesAndRepeatsLikeAMap() {
  for (int threads : {1, 2}) {
    SparseTable t(Options(8, threads));
    const size_t bw = t.layout().base_export_width();
    std::mt19937_64 rng(17 + threads);
    std::map<uint64_t, Row> ref;
    std::vector<uint64_t> pool;
    for (int i = 0; i < 60000; ++i) pool.push_back(rng() * 2 + (i == 0 ? 0 : 1));
    pool[5] = 0;  // key 0 lives out of line in the index
    // A first load: a third of the pool.
    Segment first;
    for (size_t i = 0; i < pool.size(); i += 3) {
      const Row r = RandomRow(&rng, bw);
      first.Add(pool[i], r);
      ref[pool[i]] = r;
    }
    RowSegment v = first.View();
    CHECK(t.LoadRowSegments(&v, 1).ok());
    CheckTableEquals(&t, ref);
    // Then three segments drawing keys from the whole pool: new keys, present keys, repeats.
    std::vector<Segment> segs(3);
    const size_t sizes[3] = {70000, 1, 30000};
    for (int s = 0; s < 3; ++s) {
      for (size_t i = 0; i < sizes[s]; ++i) {
        const uint64_t key = pool[rng() % pool.size()];
        const Row r = RandomRow(&rng, bw);
        segs[s].Add(key, r);
        ref[key] = r;
      }
    }
    std::vector<RowSegment> views;
    for (const Segment& s : segs) views.push_back(s.View());
    CHECK(t.LoadRowSegments(views.data(), views.size()).ok());
    CHECK_EQ(t.Size(), ref.size());
    CheckTableEquals(&t, ref);
    TableStats st = t.Stats();
    size_t with_mf = 0;
    for (const auto& kv : ref) with_mf += kv.second.has_mf ? 1 : 0;
    CHECK_EQ(st.keys_with_mf, with_mf);
  }
}

// Phase 1 on one shard, then its undo: the shard is as before (keys, rows, counts).
void TestLoadIndexBulkUndo() {
  const TableOptions o = Options(1, 1);
  CtrAccessor accessor(o);
  ChunkArena arena;
  IndexArena index_arena(1);
  Shard shard(&accessor, &arena, &index_arena, 0);
  const size_t bw = accessor.layout().base_export_width();
  std::vector<float> base(bw, 1.0f), mf(kDim, 2.0f);
  for (uint64_t k = 1; k <= 100; ++k) shard.Load(k, TableHash(k), base.data(), k % 2 ? mf.data() : nullptr);
  ShardCounters c0;
  size_t keys0 = 0, mf0 = 0, bytes0 = 0;
  shard.GetStats(&c0, &keys0, &mf0, &bytes0);
  // 50 present keys (51..100), 50 new ones (101..150), one new key twice.
  std::vector<uint64_t> io;
  for (uint64_t k = 51; k <= 150; ++k) io.push_back(k);
  io.push_back(120);
  std::vector<uint8_t> has(io.size(), 1);
  std::vector<uint32_t> existing;
  {
    WriterMutexLock l(shard.mu());
    CHECK(shard.LoadIndexBulk(io.data(), has.data(), io.size(), &existing));
  }
  CHECK_EQ(existing.size(), 51u);  // 50 present + the repeat of 120
  CHECK_EQ(existing.back(), 100u);
  for (uint32_t j : existing) CHECK_EQ(io[j], Shard::kLoadExisting);
  CHECK_EQ(shard.Size(), 150u);
  for (uint64_t k = 101; k <= 150; ++k) CHECK(shard.Contains(k, TableHash(k)));
  {
    WriterMutexLock l(shard.mu());
    shard.UndoLoadIndexBulk(io.data(), io.size());
  }
  ShardCounters c1;
  size_t keys1 = 0, mf1 = 0, bytes1 = 0;
  shard.GetStats(&c1, &keys1, &mf1, &bytes1);
  CHECK_EQ(keys1, keys0);
  CHECK_EQ(mf1, mf0);
  for (uint64_t k = 1; k <= 150; ++k) CHECK_EQ(shard.Contains(k, TableHash(k)), k <= 100);
  // The freed records are reused: loading the same keys again takes no new memory.
  std::vector<uint64_t> again;
  for (uint64_t k = 101; k <= 150; ++k) again.push_back(k);
  std::vector<uint8_t> has2(again.size(), 1);
  existing.clear();
  {
    WriterMutexLock l(shard.mu());
    CHECK(shard.LoadIndexBulk(again.data(), has2.data(), again.size(), &existing));
    for (uint64_t v : again) shard.WriteNewRow(v, base.data(), mf.data());
  }
  CHECK(existing.empty());
  ShardCounters c2;
  size_t keys2 = 0, mf2 = 0, bytes2 = 0;
  shard.GetStats(&c2, &keys2, &mf2, &bytes2);
  CHECK_EQ(keys2, 150u);
  CHECK_EQ(bytes2, bytes1);
}

// Pulls racing loads: a pull sees a key either absent (zeros) or with its whole loaded row, never a row
// whose record phase 2 has not written yet.
void TestPullsRacingALoad() {
  SparseTable t(Options(16, 2));
  const size_t bw = t.layout().base_export_width();
  constexpr size_t kRows = 20000;
  Segment seg;
  for (size_t i = 0; i < kRows; ++i) {
    Row r;
    const float v = static_cast<float>(i % 997 + 1);
    r.base.assign(bw, 0.0f);
    r.base[0] = v;  // show
    r.base[1] = 0;
    r.base[5] = v;  // lr_w
    r.has_mf = true;
    r.mf.assign(kDim, v);
    seg.Add(Mix64(i + 1), r);
  }
  std::atomic<bool> done{false};
  std::thread puller([&] {
    std::vector<uint64_t> keys(512);
    std::vector<float> out(keys.size() * (3 + kDim));
    std::mt19937_64 rng(3);
    while (!done.load()) {
      for (auto& k : keys) k = Mix64(rng() % kRows + 1);
      t.Pull(keys.data(), keys.size(), /*with_stats=*/true, out.data());
      for (size_t j = 0; j < keys.size(); ++j) {
        const float* o = &out[j * (3 + kDim)];
        // show, click, lr_w, mf...: all zero (absent) or show == lr_w == every mf component.
        for (int d = 0; d < kDim; ++d) CHECK_EQ(o[3 + d], o[0]);
        CHECK_EQ(o[2], o[0]);
      }
    }
  });
  for (int round = 0; round < 5; ++round) {
    t.Clear();
    RowSegment v = seg.View();
    CHECK(t.LoadRowSegments(&v, 1).ok());
    CHECK_EQ(t.Size(), kRows);
  }
  done.store(true);
  puller.join();
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestLoadOverwritesAndRepeatsLikeAMap);
  RUN_TEST(psembed::TestLoadIndexBulkUndo);
  RUN_TEST(psembed::TestPullsRacingALoad);
  return 0;
}
