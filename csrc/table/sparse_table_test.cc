// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// SparseTable tests: single-threaded scaffolding first, then std::threads doing pull/push/shrink/
// new_day/export at once (run under TSan and ASan/UBSan by scripts/sanitize.sh).
//
// Properties hammered (with SGD lr = 1, every gradient component -1, show 1 per key occurrence,
// decay 1.0 and delete threshold 0, so nothing is deleted and every number is a small exact integer):
//  (1) no torn row: any pull sees show == lr_w and all mf components equal (a push updates the
//      whole row under its shard lock);
//  (2) nothing lost: at the end the total show over rows == the number of key occurrences pushed;
//  (3) export is one moment: each push call adds exactly B to the total show, so every export's
//      total show is a multiple of B (a push lands wholly before or wholly after the snapshot).
// The churn test adds real deletions and checks inserts - deleted == size and that tombstones
// account for every deletion.

#include "table/sparse_table.h"

#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "table/counting_options_for_test.h"
#include "table/shard.h"
#include "util/failing_new_for_test.h"
#include "util/hash.h"
#include "util/testharness.h"

namespace psembed {
namespace {


struct Batch {
  std::vector<uint64_t> keys;
  std::vector<float> grads, shows, clicks;
  std::vector<int32_t> slots;
  Batch(size_t n, int dim, uint64_t key_space, std::mt19937_64* rng)
      : keys(n), grads(n * (1 + dim), -1.0f), shows(n, 1.0f), clicks(n, 0.0f), slots(n, 3) {
    for (auto& k : keys) k = (*rng)() % key_space * 0x9e3779b97f4a7c15ULL;  // spread, include 0
  }
};

void CheckRowsWhole(const std::vector<float>& out, size_t n, int dim) {
  const size_t w = 3 + dim;
  for (size_t i = 0; i < n; ++i) {
    const float* r = &out[i * w];
    if (r[0] == 0) continue;  // not inserted yet
    CHECK_EQ(r[0], r[2]);      // show == lr_w
    for (int d = 1; d < dim; ++d) CHECK_EQ(r[3], r[3 + d]);
  }
}

void TestSingleThreaded() {
  TableOptions o = CountingOptions(1);
  SparseTable t(o);
  std::mt19937_64 rng(1);
  Batch b(1000, o.dim, 300, &rng);
  t.Push(b.keys.data(), b.keys.size(), b.grads.data(), b.shows.data(), b.clicks.data(), b.slots.data(), nullptr);
  std::vector<float> out(b.keys.size() * (3 + o.dim));
  t.Pull(b.keys.data(), b.keys.size(), true, out.data());
  CheckRowsWhole(out, b.keys.size(), o.dim);
  ExportResult e;
  t.Export(ExportMode::kCheckpoint, 1, -1, &e);
  double total = 0;
  for (size_t i = 0; i < e.keys.size(); ++i) total += e.base[i * t.layout().base_export_width()];
  CHECK_EQ(total, 1000.0);
  CHECK_EQ(e.keys.size(), t.Size());
  for (size_t i = 1; i < e.keys.size(); ++i) CHECK_LT(e.keys[i - 1], e.keys[i]);
  CHECK_EQ(t.Stats().inserts, e.keys.size());
  CHECK_EQ(t.Shrink(), 0u);
  size_t deleted = 0;
  CHECK(t.EndDay(1, &deleted).ok());
  CHECK(!t.EndDay(0, &deleted).ok());
  CHECK_EQ(t.Erase(e.keys.data(), e.keys.size()), e.keys.size());
  CHECK_EQ(t.Size(), 0u);
}

// A row lives in a short record until it gets mf, then in a long one (feature_value.h): the move keeps
// its stats and lr part, a freed short record is reused by a new key, and load_rows moves a row back
// without mf and forward again. With SGD lr 1, gradient -1 and show 1 per push, every number is a count;
// embedx_threshold 0.25 (score = 0.1 x show, no clicks) gives mf at the third push of a key, whose mf
// gradient is dropped (so mf = pushes - 3 afterwards).
void TestRowsMoveBetweenPools() {
  TableOptions o = CountingOptions(1, /*num_shards=*/4, /*dim=*/4);
  o.accessor.embedx_threshold = 0.25;
  SparseTable t(o);
  const int dim = o.dim;
  const size_t w = 3 + dim, bw = t.layout().base_export_width();
  auto push = [&](const std::vector<uint64_t>& keys) {
    const size_t n = keys.size();
    std::vector<float> g(n * (1 + dim), -1.0f), shows(n, 1.0f), clicks(n, 0.0f);
    t.Push(keys.data(), n, g.data(), shows.data(), clicks.data(), nullptr, nullptr);
  };
  // Expects every key's pulled row: show, lr_w = pushes, mf = mf_value (0 without mf).
  auto expect = [&](const std::vector<uint64_t>& keys, float pushes, float mf_value) {
    std::vector<float> out(keys.size() * w, -7.0f);
    t.Pull(keys.data(), keys.size(), true, out.data());
    for (size_t i = 0; i < keys.size(); ++i) {
      const float* r = &out[i * w];
      CHECK_EQ(r[0], pushes);
      CHECK_EQ(r[1], 0.0f);
      CHECK_EQ(r[2], pushes);
      for (int d = 0; d < dim; ++d) CHECK_EQ(r[3 + d], mf_value);
    }
  };
  std::vector<uint64_t> a, b;
  for (uint64_t k = 1; k <= 1000; ++k) {
    a.push_back(k * 0x9e3779b97f4a7c15ULL);
    b.push_back(k * 0xc2b2ae3d27d4eb4fULL + 1);
  }
  push(a);
  push(a);
  expect(a, 2, 0);
  CHECK_EQ(t.Stats().keys_with_mf, 0u);
  push(a);  // reaches the threshold: moves to long records, mf initialised to 0 (range 0)
  expect(a, 3, 0);
  CHECK_EQ(t.Stats().keys_with_mf, a.size());
  push(b);  // new keys, into the short records a left behind
  push(a);
  expect(a, 4, 1);
  expect(b, 1, 0);
  TableStats st = t.Stats();
  CHECK_EQ(st.keys, 2000u);
  CHECK_EQ(st.keys_with_mf, 1000u);
  CHECK_EQ(st.mf_created, 1000u);
  // load_rows without mf for the first half of a: back to short records, mf reads 0; stats kept.
  std::vector<uint64_t> half(a.begin(), a.begin() + 500);
  std::vector<float> base(half.size() * bw, 0.0f);
  for (size_t i = 0; i < half.size(); ++i) {
    float* r = &base[i * bw];
    r[0] = 4;       // show
    r[4] = -1;      // slot
    r[5] = 4;       // lr_w
  }
  std::vector<uint8_t> no_mf(half.size(), 0);
  t.LoadRows(half.data(), half.size(), base.data(), no_mf.data(), nullptr);
  expect(half, 4, 0);
  CHECK_EQ(t.Stats().keys_with_mf, 500u);
  push(half);  // score 0.5 already: mf again at once (this push's mf gradient dropped)
  expect(half, 5, 0);
  CHECK_EQ(t.Stats().keys_with_mf, 1000u);
  // A checkpoint export still sees every row, with mf exactly for a.
  ExportResult e;
  t.Export(ExportMode::kCheckpoint, 1, -1, &e);
  CHECK_EQ(e.keys.size(), 2000u);
  size_t with_mf = 0;
  for (uint8_t h : e.has_mf) with_mf += h;
  CHECK_EQ(with_mf, 1000u);
  CHECK_EQ(t.Erase(a.data(), a.size()), a.size());
  CHECK_EQ(t.Erase(b.data(), b.size()), b.size());
  st = t.Stats();
  CHECK_EQ(st.keys, 0u);
  CHECK_EQ(st.keys_with_mf, 0u);
}

// A pull that may not wait (SparseTable::Pull's first pass) leaves a shard whose lock another thread
// holds untouched, and reads it once asked to wait.
void TestShardPullSkipsALockedShard() {
  const TableOptions o = CountingOptions(1);
  CtrAccessor accessor(o);
  ChunkArena arena;
  IndexArena index_arena(1);
  Shard shard(&accessor, &arena, &index_arena, 0);
  const uint64_t key = 42;
  const uint32_t pos = 0;
  std::vector<float> out(1 + o.dim, 7.0f);
  bool done = true;
  uint64_t misses = 99;
  shard.mu()->Lock();
  std::thread other([&] { done = shard.Pull(&key, &pos, 1, false, out.data(), &misses, /*wait=*/false); });
  other.join();
  shard.mu()->Unlock();
  CHECK(!done);
  for (float v : out) CHECK_EQ(v, 7.0f);  // nothing written
  CHECK_EQ(misses, 99u);  // nor counted
  CHECK(shard.Pull(&key, &pos, 1, false, out.data(), &misses));  // waits (try_lock may fail spuriously)
  for (float v : out) CHECK_EQ(v, 0.0f);  // a missing key reads zeros
  CHECK_EQ(misses, 1u);
}

// A pull that finds a shard locked by a writer does not wait for it with the other shards in hand: it
// goes by shard, reads the rows it can, waits for the locked shard alone and returns the same rows and
// misses as an uncontended pull (which reads in input order, every shard locked at once). On 1 thread
// and on 3 (the fallback's shard tasks on the pool).
void TestPullFallsBackByShardWhenAShardIsLocked() {
  for (int threads : {1, 3}) {
    TableOptions o = CountingOptions(threads);
    SparseTable t(o);
    std::mt19937_64 rng(7);
    Batch b(6000, o.dim, 5000, &rng);
    t.Push(b.keys.data(), b.keys.size(), b.grads.data(), b.shows.data(), b.clicks.data(), b.slots.data(), nullptr);
    std::vector<uint64_t> keys = b.keys;
    for (uint64_t k = 1; k <= 500; ++k) keys.push_back(k * 0x51ed270b27c1ULL + 3);  // absent: misses
    const size_t w = 3 + o.dim;
    std::vector<float> fast(keys.size() * w), slow(keys.size() * w, -1.0f);
    const uint64_t misses0 = t.Stats().pull_misses;
    t.Pull(keys.data(), keys.size(), true, fast.data());
    const uint64_t misses1 = t.Stats().pull_misses;
    CHECK(misses1 - misses0 >= 500u);
    SharedMutex* locked = t.ShardLockForTest(5);
    locked->Lock();
    std::atomic<bool> done{false};
    std::thread puller([&] {
      t.Pull(keys.data(), keys.size(), true, slow.data());
      done = true;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    CHECK(!done);  // shard 5 holds some of the keys: the pull cannot end before it is unlocked
    locked->Unlock();
    puller.join();
    CHECK(fast == slow);
    CHECK_EQ(t.Stats().pull_misses - misses1, misses1 - misses0);
  }
}

void TestConcurrentPushPullShrinkExport() {
  TableOptions o = CountingOptions(3);
  SparseTable t(o);
  constexpr int kPushers = 3;
  constexpr int kIters = 40;
  // Above twice the parallel threshold (4096): the pool partitions the keys in 2-3 chunks, then runs
  // the shard tasks.
  constexpr size_t kBatch = 9000;
  constexpr uint64_t kKeySpace = 20000;
  std::atomic<int> pushers_left{kPushers};
  std::atomic<long> exports{0}, pulls{0};
  std::vector<std::thread> threads;
  for (int p = 0; p < kPushers; ++p) {
    threads.emplace_back([&, p] {
      std::mt19937_64 rng(100 + p);
      for (int it = 0; it < kIters; ++it) {
        Batch b(kBatch, o.dim, kKeySpace, &rng);
        t.Push(b.keys.data(), kBatch, b.grads.data(), b.shows.data(), b.clicks.data(), b.slots.data(), nullptr);
      }
      pushers_left.fetch_sub(1);
    });
  }
  threads.emplace_back([&] {  // puller: never a torn row
    std::mt19937_64 rng(7);
    while (pushers_left.load() > 0) {
      Batch b(13000, o.dim, kKeySpace, &rng);
      std::vector<float> out(b.keys.size() * (3 + o.dim));
      t.Pull(b.keys.data(), b.keys.size(), true, out.data());
      CheckRowsWhole(out, b.keys.size(), o.dim);
      pulls.fetch_add(1);
    }
  });
  threads.emplace_back([&] {  // lifecycle: decay 1.0, nothing may be deleted
    while (pushers_left.load() > 0) {
      CHECK_EQ(t.Shrink(), 0u);
      t.NewDay();
      (void)t.Stats();
      std::this_thread::yield();
    }
  });
  threads.emplace_back([&] {  // exporter: one consistent moment
    while (pushers_left.load() > 0) {
      ExportResult e;
      t.Export(ExportMode::kCheckpoint, 1, -1, &e);
      double total = 0;
      for (size_t i = 0; i < e.keys.size(); ++i) {
        const float* r = &e.base[i * t.layout().base_export_width()];
        total += r[0];
        CHECK_EQ(r[0], r[5]);  // show == lr_w
      }
      CHECK_EQ(static_cast<long>(total) % static_cast<long>(kBatch), 0L);
      exports.fetch_add(1);
    }
  });
  for (auto& th : threads) th.join();
  ExportResult e;
  t.Export(ExportMode::kCheckpoint, 1, -1, &e);
  double total = 0;
  for (size_t i = 0; i < e.keys.size(); ++i) total += e.base[i * t.layout().base_export_width()];
  CHECK_EQ(total, static_cast<double>(kPushers) * kIters * kBatch);
  const TableStats st = t.Stats();
  CHECK_EQ(st.inserts, e.keys.size());
  CHECK_EQ(st.keys_with_mf, e.keys.size());
  CHECK_EQ(st.deleted, 0u);
  std::fprintf(stderr, "  %ld pulls, %ld exports raced %d pushers\n", pulls.load(), exports.load(), kPushers);
}

// Two pushers (30 batches each of 4,500 keys from 6,000, rng seeds seed and seed + 1; after_push(batch)
// after each push) and a thread ending days (after_day() after each) until both pushers are done.
template <typename AfterPush, typename AfterDay>
void PushWhileEndingDays(SparseTable* t, uint64_t seed, AfterPush after_push, AfterDay after_day) {
  std::atomic<bool> done{false};
  std::vector<std::thread> threads;
  for (int p = 0; p < 2; ++p) {
    threads.emplace_back([&, p] {
      std::mt19937_64 rng(seed + p);
      for (int it = 0; it < 30; ++it) {
        Batch b(4500, t->options().dim, 6000, &rng);
        t->Push(b.keys.data(), b.keys.size(), b.grads.data(), b.shows.data(), b.clicks.data(), nullptr, nullptr);
        after_push(b);
      }
    });
  }
  threads.emplace_back([&] {
    int day = 0;
    while (!done.load()) {
      size_t deleted = 0;
      CHECK(t->EndDay(++day, &deleted).ok());
      after_day();
      std::this_thread::yield();
    }
  });
  threads[0].join();
  threads[1].join();
  done.store(true);
  threads[2].join();
}

void TestConcurrentChurnWithDeletes() {
  TableOptions o = CountingOptions(2);
  o.accessor.delete_threshold = 0.5;  // S = 0.1 * show: rows with show < 5 get deleted
  o.accessor.show_click_decay_rate = 0.5;
  SparseTable t(o);
  PushWhileEndingDays(
      &t, 200,
      [&t](const Batch& b) {
        std::vector<uint64_t> gone(b.keys.begin(), b.keys.begin() + 50);
        t.Erase(gone.data(), gone.size());
      },
      [&t] { t.Shrink(); });
  const TableStats st = t.Stats();
  ExportResult e;
  t.Export(ExportMode::kCheckpoint, 1, -1, &e);
  CHECK_EQ(e.keys.size(), st.keys);
  CHECK_EQ(e.tombstones.size(), st.deleted);
  // Erase removes rows without counting them as deleted, so inserts >= deleted + size.
  CHECK_LE(st.deleted + st.keys, st.inserts);
  size_t with_mf = 0;
  for (uint8_t h : e.has_mf) with_mf += h;
  CHECK_EQ(with_mf, st.keys_with_mf);
  CHECK_EQ(e.mf.size(), with_mf * 4);
}

// max_keys: each shard refuses new keys once it holds max_keys / num_shards rows. First exactly, on one
// thread; then with two pushers and a thread ending days (which deletes rows, making room) at once:
// the table never holds more than max_keys rows, and every insert is accounted for.
void TestMaxKeysBoundsRows() {
  TableOptions o = CountingOptions(2);  // 16 shards
  o.max_keys = 16 * 50 + 7;             // 50 rows a shard (rounded down)
  {
    SparseTable t(o);
    std::vector<uint64_t> keys(6000);
    for (size_t i = 0; i < keys.size(); ++i) keys[i] = (i + 1) * 0x9e3779b97f4a7c15ULL;  // distinct
    std::vector<float> grads(keys.size() * (1 + o.dim), -1.0f), shows(keys.size(), 1.0f), clicks(keys.size(), 0.0f);
    t.Push(keys.data(), keys.size(), grads.data(), shows.data(), clicks.data(), nullptr, nullptr);
    const TableStats st = t.Stats();
    CHECK_EQ(st.keys, 16u * 50u);  // 6000 keys fill every shard
    CHECK_EQ(st.inserts, 16u * 50u);
    CHECK_EQ(st.capacity_rejected, 6000u - 16u * 50u);
    // Rows in the table keep training; the keys left out stay out and read zeros.
    t.Push(keys.data(), keys.size(), grads.data(), shows.data(), clicks.data(), nullptr, nullptr);
    std::vector<float> out(keys.size() * (1 + o.dim));
    t.Pull(keys.data(), keys.size(), false, out.data());
    size_t twice = 0, zeros = 0;
    for (size_t i = 0; i < keys.size(); ++i) {
      const float lr_w = out[i * (1 + o.dim)];
      CHECK(lr_w == 2.0f || lr_w == 0.0f);
      CHECK_EQ(lr_w == 2.0f, t.Contains(keys[i]));
      twice += lr_w == 2.0f ? 1 : 0;
      zeros += lr_w == 0.0f ? 1 : 0;
    }
    CHECK_EQ(twice, 16u * 50u);
    CHECK_EQ(zeros, 6000u - 16u * 50u);
    CHECK_EQ(t.Stats().capacity_rejected, 2 * (6000u - 16u * 50u));
  }
  o.accessor.delete_threshold = 0.5;  // S = 0.1 * show: rows with show < 5 get deleted
  o.accessor.show_click_decay_rate = 0.5;
  SparseTable t(o);
  PushWhileEndingDays(
      &t, 300, [&t](const Batch&) { CHECK_LE(t.Size(), 16u * 50u); }, [&t] { CHECK_LE(t.Size(), 16u * 50u); });
  const TableStats st = t.Stats();
  CHECK_LE(st.keys, 16u * 50u);
  CHECK_EQ(st.inserts, st.deleted + st.keys);  // nothing erased: every insert is a row or a deletion
  CHECK_LT(0u, st.capacity_rejected);
}

// The side effect of base/delta saves races the pushes it must not lose: savers export a delta and
// commit it (delta_score -= saved value) while pushers push. With nonclk_coeff 1 each pushed
// occurrence adds exactly 1 to show and to delta_score, so at the end, for every key, delta_score +
// the total committed for it == show (a push between a snapshot and its commit keeps its part). The
// first commit turns tombstone tracking on (nothing is deleted here: the list stays empty).
void TestConcurrentCommitSave() {
  TableOptions o = CountingOptions(2);
  o.accessor.nonclk_coeff = 1.0;
  o.accessor.base_threshold = 0.0;
  o.accessor.delta_threshold = 1.0;
  SparseTable t(o);
  t.SetTrackTombstones(false);
  constexpr int kPushers = 2;
  std::atomic<int> pushers_left{kPushers};
  std::vector<std::thread> threads;
  for (int p = 0; p < kPushers; ++p) {
    threads.emplace_back([&, p] {
      std::mt19937_64 rng(300 + p);
      for (int it = 0; it < 40; ++it) {
        Batch b(5000, o.dim, 8000, &rng);
        t.Push(b.keys.data(), b.keys.size(), b.grads.data(), b.shows.data(), b.clicks.data(), nullptr, nullptr);
      }
      pushers_left.fetch_sub(1);
    });
  }
  std::map<uint64_t, double> committed;  // the saver's alone until it is joined
  long commits = 0;
  threads.emplace_back([&] {
    const size_t bw = t.layout().base_export_width();
    do {
      ExportResult e;
      const ExportMode mode = commits % 3 == 0 ? ExportMode::kBase : ExportMode::kDelta;
      t.Export(mode, 1, -1, &e);
      std::vector<float> saved(e.keys.size());
      for (size_t i = 0; i < e.keys.size(); ++i) {
        saved[i] = e.base[i * bw + 2];  // delta_score column
        committed[e.keys[i]] += saved[i];
      }
      t.CommitSave(mode, e.keys.data(), saved.data(), e.keys.size(), e.pending_tombstones);
      CHECK(t.track_tombstones());
      ++commits;
    } while (pushers_left.load() > 0);
  });
  for (auto& th : threads) th.join();
  ExportResult e;
  t.Export(ExportMode::kCheckpoint, 1, -1, &e);
  const size_t bw = t.layout().base_export_width();
  double total_show = 0;
  for (size_t i = 0; i < e.keys.size(); ++i) {
    const float* r = &e.base[i * bw];
    total_show += r[0];
    const auto it = committed.find(e.keys[i]);
    CHECK_EQ(static_cast<double>(r[2]) + (it == committed.end() ? 0.0 : it->second), static_cast<double>(r[0]));
  }
  CHECK_EQ(total_show, static_cast<double>(kPushers) * 40 * 5000);
  CHECK(e.tombstones.empty());
  std::fprintf(stderr, "  %ld commits raced %d pushers\n", commits, kPushers);
}

// LoadRows runs per shard in parallel, export copies shards in parallel under the gate: each load
// call inserts kRows new keys (show 1, has_mf on even keys), so every export sees a multiple of
// kRows rows, sorted, with mf rows matching their keys; set_tombstones races them.
// Rows for load_rows/load_segments calls of the concurrency tests: block c holds keys c * rows + 1 ..
// (c + 1) * rows, show 1, and mf (every value = the key) on even keys; mf_at[i] = mf rows before row i.
struct LoadBlock {
  std::vector<uint64_t> keys;
  std::vector<float> base, mf;
  std::vector<uint8_t> has;
  std::vector<size_t> mf_at;
};

LoadBlock MakeLoadBlock(int c, size_t rows, size_t bw, size_t mw) {
  LoadBlock b;
  b.keys.resize(rows);
  b.base.assign(rows * bw, 0.0f);
  b.has.resize(rows);
  b.mf_at.assign(rows + 1, 0);
  for (size_t i = 0; i < rows; ++i) {
    b.keys[i] = static_cast<uint64_t>(c) * rows + i + 1;
    b.base[i * bw] = 1.0f;
    b.has[i] = b.keys[i] % 2 == 0;
    if (b.has[i]) b.mf.insert(b.mf.end(), mw, static_cast<float>(b.keys[i]));
    b.mf_at[i + 1] = b.mf_at[i] + b.has[i];
  }
  return b;
}

void TestConcurrentLoadRowsExport() {
  TableOptions o = CountingOptions(2);
  SparseTable t(o);
  const size_t bw = t.layout().base_export_width(), mw = t.layout().mf_width();
  constexpr size_t kRows = 5000;  // above the parallel threshold
  constexpr int kCalls = 12;
  std::atomic<bool> done{false};
  std::thread loader([&] {
    for (int c = 0; c < kCalls; ++c) {
      const LoadBlock b = MakeLoadBlock(c, kRows, bw, mw);
      t.LoadRows(b.keys.data(), kRows, b.base.data(), b.has.data(), b.mf.data());
    }
    done.store(true);
  });
  std::thread tomb([&] {
    uint64_t k = 0;
    while (!done.load()) {
      std::vector<uint64_t> list = {++k, k + 1};
      t.SetTombstones(list.data(), list.size());
      std::this_thread::yield();
    }
  });
  long exports = 0;
  while (!done.load() || exports == 0) {
    ExportResult e;
    t.Export(ExportMode::kCheckpoint, 1, -1, &e);
    CHECK_EQ(e.keys.size() % kRows, 0u);
    size_t j = 0;
    for (size_t i = 0; i < e.keys.size(); ++i) {
      if (i > 0) CHECK(e.keys[i - 1] < e.keys[i]);
      CHECK_EQ(e.base[i * bw], 1.0f);
      CHECK_EQ(static_cast<int>(e.has_mf[i]), static_cast<int>(e.keys[i] % 2 == 0));
      if (e.has_mf[i]) {
        CHECK_EQ(e.mf[j * mw], static_cast<float>(e.keys[i]));
        ++j;
      }
    }
    CHECK_EQ(j * mw, e.mf.size());
    CHECK(e.tombstones.size() == 0 || e.tombstones.size() == 2);
    ++exports;
  }
  loader.join();
  tomb.join();
  CHECK_EQ(t.Size(), kRows * kCalls);
  std::fprintf(stderr, "  %ld exports raced %d load_rows calls\n", exports, kCalls);
}


// Probabilistic admission with pushes of fresh ids racing EndDay (TSan: the boundary moves the draw
// day under the shard locks the pushes take). Each push names its push id, as a trainer does: the
// admitted keys are exactly those whose draw u(seed, key, 3, AdmissionDraw(day_index, push_id)) is
// below the score, for the day index the push saw, and rejected keys leave no state behind.
void TestAdmissionDrawsArePerPush() {
  TableOptions o = CountingOptions(2);
  o.accessor.create_probability_from_score = true;  // show 1, no click: score 0.1
  o.accessor.embedx_threshold = 100.0;
  o.accessor.delete_threshold = 0.5;                // admitted rows go at end_day
  o.seed = 7;
  SparseTable t(o);
  constexpr size_t kKeys = 20000;
  const size_t empty_bytes = t.Stats().bytes;
  for (int day = 0; day < 3; ++day) {
    std::thread ender([&] {  // a real day boundary in the middle of the pushes
      size_t deleted = 0;
      CHECK(t.EndDay(2 * day, &deleted).ok());
    });
    std::vector<std::vector<uint64_t>> keys(2);
    std::vector<std::thread> pushers;
    for (int w = 0; w < 2; ++w) {
      pushers.emplace_back([&, w] {
        keys[w].resize(kKeys / 2);
        for (size_t i = 0; i < keys[w].size(); ++i) keys[w][i] = (uint64_t(day + 1) << 40) + w * kKeys + i;
        const size_t n = keys[w].size();
        std::vector<float> grads(n * (1 + o.dim), 0.0f), shows(n, 1.0f), clicks(n, 0.0f);
        t.Push(keys[w].data(), n, grads.data(), shows.data(), clicks.data(), nullptr, nullptr,
               (uint64_t(w) << 32) | uint64_t(day));
      });
    }
    for (auto& p : pushers) p.join();
    ender.join();
    // Each key was drawn with the day index before (2 * day) or after (2 * day + 1) the racing end_day;
    // a key admitted before it may have been deleted by it (score 0.1 < 0.5): then it is a tombstone.
    ExportResult e;
    t.Export(ExportMode::kCheckpoint, 1, -1, &e);
    const std::set<uint64_t> tomb(e.tombstones.begin(), e.tombstones.end());
    size_t admitted = 0;
    for (int w = 0; w < 2; ++w) {
      const uint64_t push_id = (uint64_t(w) << 32) | uint64_t(day);
      for (uint64_t k : keys[w]) {
        const bool in = t.Contains(k) || tomb.count(k) > 0;
        const bool before = Uniform01(o.seed, k, kStreamAdmission, AdmissionDraw(2 * day, push_id)) < 0.1;
        const bool after = Uniform01(o.seed, k, kStreamAdmission, AdmissionDraw(2 * day + 1, push_id)) < 0.1;
        CHECK(in == before || in == after);
        admitted += in ? 1 : 0;
      }
    }
    CHECK_EQ(t.Size() + tomb.size(), admitted);
    CHECK(admitted > kKeys / 20 && admitted < kKeys / 5);  // about 10%
    size_t deleted = 0;
    CHECK(t.EndDay(2 * day + 1, &deleted).ok());
    CHECK_EQ(t.Size(), 0u);
    t.SetTombstones(nullptr, 0);  // as a delta save would
  }
  // Nothing is kept for the 90% rejected (only the slab chunks and index of emptied shards remain).
  CHECK_LT(uint64_t{kKeys * 3 * 8 / 10}, t.Stats().admission_rejected);
  std::fprintf(stderr, "  bytes empty %zu, after 3 days of rejections %zu\n", empty_bytes, size_t(t.Stats().bytes));
}

}  // namespace
// The bulk checkpoint paths racing each other: LoadRowSegments inserts kRows new keys a call (in 3
// segments; show 1, mf on even keys holding the key), ExportBuckets and SaveBuckets take one moment
// each: a multiple of kRows rows, every key in its bucket and ascending there, mf rows matching keys.
void TestConcurrentBulkLoadExportSave() {
  TableOptions o = CountingOptions(2);
  SparseTable t(o);
  const size_t bw = t.layout().base_export_width(), mw = t.layout().mf_width();
  constexpr size_t kRows = 6000;
  constexpr int kCalls = 10;
  constexpr uint32_t kBuckets = 5;
  constexpr uint64_t kSalt = 0x1234;
  std::atomic<bool> done{false};
  std::thread loader([&] {
    for (int c = 0; c < kCalls; ++c) {
      const LoadBlock b = MakeLoadBlock(c, kRows, bw, mw);
      const std::vector<uint64_t>& keys = b.keys;
      const std::vector<float>& base = b.base;
      const std::vector<float>& mf = b.mf;
      const std::vector<uint8_t>& has = b.has;
      const std::vector<size_t>& mf_at = b.mf_at;
      const size_t cut[4] = {0, 1000, 1000, kRows};  // an empty segment in the middle
      RowSegment segs[3];
      for (int k = 0; k < 3; ++k) {
        segs[k].keys = keys.data() + cut[k];
        segs[k].n = cut[k + 1] - cut[k];
        segs[k].base = base.data() + cut[k] * bw;
        segs[k].has_mf = has.data() + cut[k];
        segs[k].mf = mf.data() + mf_at[cut[k]] * mw;
        segs[k].mf_rows = mf_at[cut[k + 1]] - mf_at[cut[k]];
      }
      CHECK(t.LoadRowSegments(segs, 3).ok());
    }
    done.store(true);
  });
  const std::string dir = "/tmp/psembed_bulk_test_" + std::to_string(::getpid());
  CHECK_EQ(::mkdir(dir.c_str(), 0755), 0);
  std::vector<std::string> paths;
  for (uint32_t b = 0; b < kBuckets; ++b) {
    for (int c = 0; c < 4; ++c) paths.push_back(dir + "/" + std::to_string(b) + "." + std::to_string(c));
  }
  long rounds = 0;
  while (!done.load() || rounds == 0) {
    BucketExport e;
    t.ExportBuckets(ExportMode::kCheckpoint, kBuckets, kSalt, &e);
    CHECK_EQ(e.rows % kRows, 0u);
    for (uint32_t b = 0; b < kBuckets; ++b) {
      uint64_t j = 0;
      for (uint64_t i = e.row_begin[b]; i < e.row_begin[b + 1]; ++i) {
        const uint64_t key = e.keys.as<uint64_t>()[i];
        CHECK_EQ(Mix64(key ^ kSalt) % kBuckets, b);
        if (i > e.row_begin[b]) CHECK(e.keys.as<uint64_t>()[i - 1] < key);
        CHECK_EQ(e.base.as<float>()[i * bw], 1.0f);
        CHECK_EQ(static_cast<int>(e.has_mf.as<uint8_t>()[i]), static_cast<int>(key % 2 == 0));
        if (key % 2 == 0) {
          CHECK_EQ(e.mf.as<float>()[(e.row_begin[b] + j) * mw], static_cast<float>(key));
          ++j;
        }
      }
      CHECK_EQ(j, e.mf_rows[b]);
    }
    BucketSave s;
    CHECK(t.SaveBuckets(ExportMode::kCheckpoint, kBuckets, kSalt, paths, /*sync=*/true, &s).ok());
    CHECK_EQ(s.rows % kRows, 0u);
    CHECK_EQ(s.mf_rows * 2, s.rows);
    ++rounds;
  }
  loader.join();
  CHECK_EQ(t.Size(), kRows * kCalls);
  for (const std::string& p : paths) ::unlink(p.c_str());
  ::rmdir(dir.c_str());
  std::fprintf(stderr, "  %ld export/save rounds raced %d load_segments calls\n", rounds, kCalls);
}


namespace {

// A std::bad_alloc anywhere in end_day (the counts, the room reserved, the pool) leaves the table as it
// was: no row decayed, aged or deleted without its key on the tombstone list, and the caller's retry
// closes the day once. Before, shards that had finished stayed decayed with their deletions unlisted,
// and the retry decayed them again.
void TestEndDayFailsWholeOrNotAtAll() {
  TableOptions o;
  o.dim = 2;
  o.num_shards = 4;
  o.num_threads = 2;
  const int n = 2000;
  std::vector<uint64_t> keys(n);
  std::vector<float> grads(n * 3, 0.0f), shows(n), clicks(n, 0.0f);
  for (int i = 0; i < n; ++i) {
    keys[i] = i + 1;
    shows[i] = (i % 2) ? 1.0f : 100.0f;  // odd keys' score 0.1 falls under delete_threshold: deleted
  }
  int failures = 0;
  for (long k = 0; k < 400; ++k) {
    SparseTable t(o);
    t.Push(keys.data(), n, grads.data(), shows.data(), clicks.data(), nullptr, nullptr);
    size_t deleted = 0;
    bool threw = false;
    failing_new::FailFrom(k);
    try {
      (void)t.EndDay(0, &deleted);
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    failing_new::Stop();
    if (!threw) break;  // past the last allocation
    ++failures;
    CHECK_EQ(t.Size(), static_cast<size_t>(n));
    CHECK_EQ(t.day(), -1);
    std::vector<float> row(3 + 2);
    t.Pull(&keys[0], 1, true, row.data());
    CHECK_EQ(row[0], 100.0f);  // not decayed
    CHECK(t.EndDay(0, &deleted).ok());
    CHECK_EQ(deleted, static_cast<size_t>(n / 2));
    ExportResult e;
    t.Export(ExportMode::kCheckpoint, 1, -1, &e);
    CHECK_EQ(e.pending_tombstones, static_cast<size_t>(n / 2));
    t.Pull(&keys[0], 1, true, row.data());
    CHECK_EQ(row[0], static_cast<float>(100.0 * 0.98));  // decayed once
  }
  CHECK(failures > 0);
  std::fprintf(stderr, "  end_day failed at %d allocations, each time whole\n", failures);
}

// The tables of the bulk-load failure tests: dim 2, 4 shards, 2 threads (loads of 6000 rows run on the pool).
TableOptions BulkLoadTestOptions(float embedx_threshold) {
  TableOptions o;
  o.dim = 2;
  o.num_shards = 4;
  o.num_threads = 2;
  o.accessor.embedx_threshold = embedx_threshold;
  return o;
}

// A std::bad_alloc anywhere in a bulk load, once or from some allocation on (persistent), leaves every key
// absent or holding a row some call wrote: never a record phase 1 inserted and phase 2 did not write (an
// erased key's bytes), and the undo of phase 1 allocates nothing.
void TestBulkLoadFailureLeavesNoUnwrittenRow() {
  const TableOptions o = BulkLoadTestOptions(/*embedx_threshold=*/0);  // every pushed row has mf
  const int n = 6000;  // over the load's kParallelMinKeys: its phases run on the pool (whose set-up allocates)
  int failures = 0;
  for (bool persist : {false, true}) {
    for (long k = 0; k < 400; ++k) {
      SparseTable t(o);
      const size_t bw = t.layout().base_export_width(), mw = t.layout().mf_width();
      // Keys 1..n pushed (show 5), then 1..n/2 erased: their records wait on the free lists, bytes and all.
      std::vector<uint64_t> keys(n);
      std::vector<float> grads(n * 3, 0.5f), shows(n, 5.0f), clicks(n, 1.0f);
      for (int i = 0; i < n; ++i) keys[i] = i + 1;
      t.Push(keys.data(), n, grads.data(), shows.data(), clicks.data(), nullptr, nullptr);
      t.Erase(keys.data(), n / 2);
      // The load: keys n/2+1 .. n/2+n (half present, half new), show 7, slot 3, mf 9s.
      std::vector<uint64_t> lk(n);
      std::vector<float> base(n * bw, 0.0f), mf(n * mw, 9.0f);
      std::vector<uint8_t> has_mf(n, 1);
      for (int i = 0; i < n; ++i) {
        lk[i] = n / 2 + 1 + i;
        base[i * bw + 0] = 7.0f;
        base[i * bw + 4] = 3.0f;
      }
      const size_t half = n / 2;  // two segments
      const RowSegment segs[2] = {
          {lk.data(), half, base.data(), has_mf.data(), mf.data(), half},
          {lk.data() + half, n - half, base.data() + half * bw, has_mf.data() + half, mf.data() + half * mw, n - half}};
      bool threw = false;
      failing_new::FailFrom(k, persist);
      try {
        (void)t.LoadRowSegments(segs, 2, /*check=*/true);
      } catch (const std::bad_alloc&) {
        threw = true;
      }
      failing_new::Stop();
      if (!threw) break;
      ++failures;
      std::vector<float> row(3 + 2);
      for (uint64_t key = n + 1; key <= static_cast<uint64_t>(n / 2 + n); ++key) {  // the new keys
        if (!t.Contains(key)) continue;
        t.Pull(&key, 1, true, row.data());
        CHECK_EQ(row[0], 7.0f);
      }
    }
  }
  CHECK(failures > 0);
  std::fprintf(stderr, "  bulk loads failed at %d allocations, none leaving an unwritten row\n", failures);
}

// A std::bad_alloc anywhere in a bulk load leaves the table as it was, also when the load gives present
// rows their mf: phase 3 moved those rows into the long pool one by one, so an allocation failing there left
// the load half done (some rows loaded, the rest not) after phases 1 and 2 had gone through.
void TestBulkLoadIsAllOrNothing() {
  const TableOptions o = BulkLoadTestOptions(/*embedx_threshold=*/1e30f);  // pushed rows get no mf
  const int n = 6000;
  std::vector<uint64_t> keys(n);
  std::vector<float> grads(n * 3, 0.5f), shows(n, 5.0f), clicks(n, 1.0f);
  for (int i = 0; i < n; ++i) keys[i] = i + 1;
  // The load: every pushed key again, now with mf (show 7), then n / 4 new keys.
  const int m = n + n / 4;
  std::vector<uint64_t> lk(m);
  for (int i = 0; i < m; ++i) lk[i] = i + 1;
  int failures = 0;
  for (bool persist : {false, true}) {
    for (long k = 0; k < 1000; ++k) {
      SparseTable t(o);
      const size_t bw = t.layout().base_export_width(), mw = t.layout().mf_width(), w = 3 + 2;
      t.Push(keys.data(), n, grads.data(), shows.data(), clicks.data(), nullptr, nullptr);
      std::vector<float> before(n * w), after(n * w);
      t.Pull(keys.data(), n, true, before.data());
      std::vector<float> base(m * bw, 0.0f), mf(m * mw, 9.0f);
      std::vector<uint8_t> has_mf(m, 1);
      for (int i = 0; i < m; ++i) base[i * bw + 0] = 7.0f;
      const RowSegment seg{lk.data(), static_cast<size_t>(m), base.data(), has_mf.data(), mf.data(),
                           static_cast<size_t>(m)};
      bool threw = false;
      failing_new::FailFrom(k, persist);
      try {
        (void)t.LoadRowSegments(&seg, 1, /*check=*/true);
      } catch (const std::bad_alloc&) {
        threw = true;
      }
      failing_new::Stop();
      if (!threw) {
        CHECK_EQ(t.Size(), static_cast<size_t>(m));
        t.Pull(keys.data(), n, true, after.data());
        for (int i = 0; i < n; ++i) CHECK_EQ(after[i * w + 3], 9.0f);  // every present row got its mf
        break;
      }
      ++failures;
      CHECK_EQ(t.Size(), static_cast<size_t>(n));
      for (int i = n; i < m; ++i) CHECK(!t.Contains(lk[i]));
      t.Pull(keys.data(), n, true, after.data());
      size_t loaded = 0;
      for (int i = 0; i < n; ++i) loaded += after[i * w] == 7.0f ? 1 : 0;
      CHECK_EQ(loaded, size_t{0});
      CHECK(std::memcmp(before.data(), after.data(), before.size() * sizeof(float)) == 0);
    }
  }
  CHECK(failures > 0);
  std::fprintf(stderr, "  bulk loads failed at %d allocations, each leaving the table as it was\n", failures);
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestSingleThreaded);
  RUN_TEST(psembed::TestRowsMoveBetweenPools);
  RUN_TEST(psembed::TestConcurrentPushPullShrinkExport);
  RUN_TEST(psembed::TestConcurrentChurnWithDeletes);
  RUN_TEST(psembed::TestMaxKeysBoundsRows);
  RUN_TEST(psembed::TestConcurrentCommitSave);
  RUN_TEST(psembed::TestConcurrentLoadRowsExport);
  RUN_TEST(psembed::TestAdmissionDrawsArePerPush);
  RUN_TEST(psembed::TestShardPullSkipsALockedShard);
  RUN_TEST(psembed::TestPullFallsBackByShardWhenAShardIsLocked);
  RUN_TEST(psembed::TestConcurrentBulkLoadExportSave);
  RUN_TEST(psembed::TestEndDayFailsWholeOrNotAtAll);
  RUN_TEST(psembed::TestBulkLoadFailureLeavesNoUnwrittenRow);
  RUN_TEST(psembed::TestBulkLoadIsAllOrNothing);
  return 0;
}
