// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/sparse_table.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <unordered_set>

#include "table/in_order_pull.h"
#include "table/push_merge.h"
#include "util/crc32.h"
#include "util/file_syncer.h"
#include "util/hash.h"
#include "util/prefetch.h"

namespace psembed {

namespace {
// Calls with fewer keys run their shard tasks on the calling thread: the pool handoff costs more.
constexpr size_t kParallelMinKeys = 4096;
// A push on one thread merges the whole call at once up to this many keys (push_merge.h). Its scratch
// costs ~130 bytes a key (the probe table, the merged keys and their copy sorted by shard), so a bigger
// call, a bulk push of millions of keys, goes by shard like a push on several threads (~20 bytes a key).
constexpr size_t kMaxWholeCallMerge = size_t{1} << 19;
}  // namespace

struct SparseTable::Partition {
  // No per-shard copy of the hashes: a shard task recomputes TableHash from skeys (a few cycles a key)
  // rather than read a third scattered array. Without it pulls ran ~3% faster (1.02x-1.07x in 11 of 12
  // paired runs, 1 and 2 threads) and pushes 0-3% (docs/benchmarks.md, "Table", session 16).
  std::vector<uint64_t> hashes;  // TableHash(keys[i]), for every input position
  std::vector<uint32_t> order;   // input positions grouped by shard, input order within a shard
  std::vector<uint64_t> skeys;   // keys[order[j]]
  std::vector<uint32_t> begin;   // shard s owns order[begin[s], begin[s+1])
  std::vector<uint32_t> cursor;  // counting sort: chunk c's next slot of shard s at cursor[c * shards + s]
  std::vector<uint8_t> busy;     // Pull: shard s was locked by another thread on the first pass

  // Calls up to this many keys keep their scratch for the next call; a bigger call frees it
  // afterwards, so one huge push does not pin ~20 bytes/key of scratch in its thread forever.
  static constexpr size_t kKeepKeys = size_t{1} << 20;
  void Trim() {
    if (hashes.capacity() > kKeepKeys) *this = Partition();
  }
};


SparseTable::SparseTable(const TableOptions& options)
    : accessor_(options), index_arena_(static_cast<uint32_t>(options.num_shards)) {
  shards_.reserve(options.num_shards);
  // Each shard's share of max_keys, rounded down, so pushes never take the table past max_keys rows.
  const size_t max_rows =
      options.max_keys == 0 ? SIZE_MAX : static_cast<size_t>(options.max_keys / options.num_shards);
  for (int i = 0; i < options.num_shards; ++i) {
    shards_.push_back(
        std::make_unique<Shard>(&accessor_, &arena_, &index_arena_, static_cast<uint32_t>(i), max_rows));
  }
  pool_ = std::make_unique<ThreadPool>(options.num_threads, options.spin_wait_us);
  parallelism_.store(pool_->num_threads(), std::memory_order_relaxed);
}

void SparseTable::set_num_threads(int n) {
  n = std::max(1, std::min(n, pool_->num_threads()));
  parallelism_.store(n, std::memory_order_relaxed);
}

SparseTable::~SparseTable() = default;

size_t SparseTable::Chunks(size_t n) const {
  // Four chunks a thread, not one: the pool's threads take chunks as they come, so a worker that starts
  // late (asleep until the call woke it) leaves the chunks it has not reached to the others instead of
  // holding the whole loop up by its wake-up. 2 threads: pulls and pushes 1.00x-1.06x faster, 15 of 16
  // paired runs (docs/benchmarks.md, "Table", session 17). One thread: no pool, one chunk. The
  // partition's serial step walks a counter per (chunk, shard): past 65,536 of them (thousands of shards),
  // one chunk per thread, as before.
  const size_t threads = static_cast<size_t>(num_threads());
  size_t most = threads == 1 ? 1 : 4 * threads;
  if (most * shards_.size() > 65536) most = threads;
  return std::max<size_t>(1, std::min<size_t>(most, n / kParallelMinKeys));
}

void SparseTable::ForEachChunk(size_t n, size_t chunks, const std::function<void(size_t, size_t, size_t)>& fn,
                               bool last) const {
  auto run = [&](size_t c) { fn(c, n * c / chunks, n * (c + 1) / chunks); };
  if (chunks == 1) {
    run(0);
  } else {
    pool_->ParallelFor(chunks, run, num_threads(), /*more_loops_follow=*/!last);
  }
}

void SparseTable::PartitionKeys(const uint64_t* keys, size_t n, const uint8_t* skip, Partition* p) const {
  const uint32_t num_shards = static_cast<uint32_t>(shards_.size());
  // A parallel counting sort, in chunks (ForEachChunk): each chunk hashes and counts its keys, then
  // scatters them behind the runs of the chunks before it. Done on the calling thread alone, this pass
  // bounded a pull on 16 threads at ~3x its 1-thread rate (docs/benchmarks.md, "Table", session 7).
  const size_t chunks = Chunks(n);
  p->hashes.resize(n);
  p->cursor.assign(chunks * num_shards, 0);
  uint64_t* hashes = p->hashes.data();
  uint32_t* cursor = p->cursor.data();
  // Pass 1: hash every key; count each chunk's kept keys per shard.
  ForEachChunk(n, chunks, [&](size_t c, size_t begin, size_t end) {
    uint32_t* count = cursor + c * num_shards;
    for (size_t i = begin; i < end; ++i) {
      const uint64_t h = TableHash(keys[i]);
      hashes[i] = h;
      if (skip == nullptr || !skip[i]) ++count[ShardOf(h, num_shards)];
    }
  });
  // Counts -> first destination of each (chunk, shard): shard by shard, chunks in input order, so a
  // shard's run keeps the input order (the merge of duplicates sums in that order).
  p->begin.resize(num_shards + 1);
  uint32_t total = 0;
  for (uint32_t s = 0; s < num_shards; ++s) {
    p->begin[s] = total;
    for (size_t c = 0; c < chunks; ++c) {
      const uint32_t k = cursor[c * num_shards + s];
      cursor[c * num_shards + s] = total;
      total += k;
    }
  }
  p->begin[num_shards] = total;
  p->order.resize(total);
  p->skeys.resize(total);
  uint32_t* order = p->order.data();
  uint64_t* skeys = p->skeys.data();
  // Pass 2: scatter into per-shard runs (sequential reads, one write stream per shard), so each shard
  // task then reads its keys contiguously.
  ForEachChunk(n, chunks, [&](size_t c, size_t begin, size_t end) {
    uint32_t* next = cursor + c * num_shards;
    for (size_t i = begin; i < end; ++i) {
      if (skip != nullptr && skip[i]) continue;
      const uint32_t d = next[ShardOf(hashes[i], num_shards)]++;
      order[d] = static_cast<uint32_t>(i);
      skeys[d] = keys[i];
    }
  });
}

void SparseTable::RunShards(size_t num_keys, const std::function<void(size_t)>& fn) {
  // Small calls on the calling thread alone (max_parallel 1), with the pool's contract all the same: a
  // shard that throws (std::bad_alloc) does not keep the others from their keys; the first exception
  // comes last.
  pool_->ParallelFor(shards_.size(), fn, num_keys < kParallelMinKeys ? 1 : num_threads());
}

bool SparseTable::TryPullInOrder(const uint64_t* keys, size_t n, bool with_stats, float* out) {
  // Every shard's lock in shared mode, in index order, without waiting (so this never waits while
  // holding some: no lock-order cycle with the bulk load, which takes them all exclusively).
  size_t held = 0;
  while (held < shards_.size() && shards_[held]->mu()->TryLockShared()) ++held;
  struct Release {
    const std::vector<std::unique_ptr<Shard>>& shards;
    const size_t& held;
    ~Release() {
      for (size_t s = held; s-- > 0;) shards[s]->mu()->UnlockShared();
    }
  } release{shards_, held};
  if (held < shards_.size()) return false;
  const size_t width = layout().pull_width(with_stats);
  ForEachChunk(n, Chunks(n), [&](size_t, size_t begin, size_t end) {
    const uint64_t misses = PullInOrder(shards_, layout(), keys + begin, end - begin, with_stats, out + begin * width);
    pull_misses_.fetch_add(misses, std::memory_order_relaxed);
  }, /*last=*/true);
  return true;
}

void SparseTable::Pull(const uint64_t* keys, size_t n, bool with_stats, float* out) {
  if (n == 0) return;
  // Uncontended (the usual case): in input order, every shard locked for the call (in_order_pull.h).
  if (TryPullInOrder(keys, n, with_stats, out)) return;
  // A writer holds or waits for some shard (a push, shrink or load is running): by shard, so the pull
  // reads the other shards meanwhile instead of waiting for that writer.
  // The calling thread's scratch, reused across calls (no page faults for the per-call arrays once
  // warm). Pool tasks read it by reference while this thread waits in RunShards.
  // (A reference, so the lambda below sees the caller's object, not the worker's thread_local.)
  thread_local Partition tls_part;
  Partition& part = tls_part;
  PartitionKeys(keys, n, nullptr, &part);
  // Shards whose lock is busy (most often: a push walking the shards in the same order) are skipped
  // on the first pass and read on the second. Waiting at each shard instead would keep the pull one
  // step behind such a push, at its pace, for the rest of the shards.
  part.busy.assign(shards_.size(), 0);
  RunShards(n, [&](size_t s) {
    const uint32_t b = part.begin[s], e = part.begin[s + 1];
    if (b == e) return;
    uint64_t misses = 0;
    const bool done = shards_[s]->Pull(part.skeys.data() + b, part.order.data() + b, e - b,
                                       with_stats, out, &misses, /*wait=*/false);
    if (!done) part.busy[s] = 1;
    pull_misses_.fetch_add(misses, std::memory_order_relaxed);
  });
  for (size_t s = 0; s < shards_.size(); ++s) {
    if (!part.busy[s]) continue;
    const uint32_t b = part.begin[s], e = part.begin[s + 1];
    uint64_t misses = 0;
    shards_[s]->Pull(part.skeys.data() + b, part.order.data() + b, e - b, with_stats, out, &misses);
    pull_misses_.fetch_add(misses, std::memory_order_relaxed);
  }
  part.Trim();
}

void SparseTable::Push(const uint64_t* keys, size_t n, const float* grads, const float* shows, const float* clicks,
                       const int32_t* slots, const uint8_t* skip, uint64_t push_id) {
  if (n == 0) return;
  if (push_id == kOwnPushId) push_id = own_pushes_.fetch_add(1, std::memory_order_relaxed);
  if (skip != nullptr) {
    size_t skipped = 0;
    for (size_t i = 0; i < n; ++i) skipped += skip[i] ? 1 : 0;
    rejected_.fetch_add(skipped, std::memory_order_relaxed);
  }
  const PushRows rows{grads, 1 + static_cast<size_t>(layout().dim()), shows, clicks, slots};
  const bool has_slots = slots != nullptr;
  if ((num_threads() == 1 && n <= kMaxWholeCallMerge) || n < kParallelMinKeys) {
    // One thread: merge the whole call in input order, then sort the distinct keys by shard (push_merge.h).
    PushMerger& m = ThreadPushMerger();
    const uint32_t num_shards = static_cast<uint32_t>(shards_.size());
    m.MergeCall(keys, n, skip, rows, num_shards);
    m.SortByShard(num_shards);
    ReaderMutexLock gate(&gate_);
    // On the calling thread: this path is taken only where RunShards does not go parallel.
    RunShards(n, [&](size_t s) {
      const uint32_t b = m.begin(static_cast<uint32_t>(s)), e = m.begin(static_cast<uint32_t>(s) + 1);
      if (b != e) shards_[s]->Push(m.sorted() + b, e - b, has_slots, push_id);
    });
    m.Trim();
    return;
  }
  // Several threads (or a call too big to merge whole): partition the keys by shard, then one task per
  // shard merges its run and updates.
  thread_local Partition tls_part;  // see Pull
  Partition& part = tls_part;
  PartitionKeys(keys, n, skip, &part);
  ReaderMutexLock gate(&gate_);
  RunShards(n, [&](size_t s) {
    const uint32_t b = part.begin[s], e = part.begin[s + 1];
    if (b == e) return;
    PushMerger& m = ThreadPushMerger();  // one TLS lookup per task
    const size_t num = m.MergeRun(part.skeys.data() + b, part.order.data() + b, e - b, rows);
    shards_[s]->Push(m.items(), num, has_slots, push_id);
    m.Trim();
  });
  part.Trim();
}

size_t SparseTable::DecayAndDeleteAll(double factor, uint32_t add_unseen, int64_t new_day_index) {
  ReaderMutexLock gate(&gate_);
  MutexLock deleting(&delete_mu_);  // until the deleted keys are listed (see CommitSave)
  // Everything that allocates comes first: each shard's count of the rows it will delete, room for their
  // keys and room on the tombstone list. A std::bad_alloc there leaves the table as it was; the pass that
  // decays and deletes then allocates nothing, so a day is never half closed (some shards decayed and
  // their deletions unlisted, then decayed again when the caller retries).
  const size_t num_shards = shards_.size();
  std::vector<size_t> doomed(num_shards, 0);
  pool_->ParallelFor(
      num_shards, [&](size_t s) { doomed[s] = shards_[s]->CountDoomed(factor, add_unseen); }, num_threads());
  std::vector<std::vector<uint64_t>> deleted(num_shards);
  size_t room = 0;
  for (size_t s = 0; s < num_shards; ++s) {
    deleted[s].reserve(doomed[s]);
    room += doomed[s];
  }
  {
    // Whether or not deletions are listed now: an export may turn the listing on before the pass ends.
    // Nothing else can take this room meanwhile: whatever replaces or empties the list holds delete_mu_.
    MutexLock l(&tomb_mu_);
    tombstones_.reserve(tombstones_.size() + room);
  }
  pool_->ParallelFor(
      num_shards,
      [&](size_t s) { shards_[s]->DecayAndDelete(factor, add_unseen, doomed[s], &deleted[s], new_day_index); },
      num_threads());
  size_t total = 0;
  MutexLock l(&tomb_mu_);
  for (auto& d : deleted) {
    total += d.size();
    if (track_tombstones_) tombstones_.insert(tombstones_.end(), d.begin(), d.end());  // within the room above
  }
  return total;
}

size_t SparseTable::Shrink() { return DecayAndDeleteAll(options().accessor.show_click_decay_rate, 0); }

void SparseTable::NewDay() {
  ReaderMutexLock gate(&gate_);
  pool_->ParallelFor(shards_.size(), [&](size_t s) { shards_[s]->NewDay(); }, num_threads());
}

Status SparseTable::EndDay(int64_t day, size_t* deleted) {
  *deleted = 0;
  // Below INT64_MAX: day + 1 below (the admission draws' day index) must not overflow.
  if (day < 0 || day == INT64_MAX) {
    return Status::InvalidArgument("day must be in [0, 2^63 - 1), got " + std::to_string(day));
  }
  MutexLock l(&day_mu_);
  const int64_t elapsed = day_ < 0 ? 1 : day - day_;
  if (elapsed < 0) {
    return Status::InvalidArgument("end_day(" + std::to_string(day) + ") is before the last day closed (" +
                                   std::to_string(day_) + ")");
  }
  if (elapsed == 0) return Status::OK();
  const double factor = std::pow(options().accessor.show_click_decay_rate, static_cast<double>(elapsed));
  const uint32_t add = elapsed > kMaxUnseenDays ? kMaxUnseenDays : static_cast<uint32_t>(elapsed);
  // A day boundary: admission draws use day index day + 1 from now on.
  *deleted = DecayAndDeleteAll(factor, add, day + 1);
  day_ = day;
  return Status::OK();
}

int64_t SparseTable::day() {
  MutexLock l(&day_mu_);
  return day_;
}

void SparseTable::set_day(int64_t day) {
  MutexLock l(&day_mu_);
  day_ = day;
  ReaderMutexLock gate(&gate_);
  for (auto& shard : shards_) shard->SetAdmissionDay(static_cast<uint32_t>(day + 1));
}

TableStats SparseTable::Stats() {
  TableStats st;
  ShardCounters c;
  for (auto& shard : shards_) shard->GetStats(&c, &st.keys, &st.keys_with_mf, &st.bytes);
  st.pull_misses = pull_misses_.load(std::memory_order_relaxed);
  st.inserts = c.inserts;
  st.mf_created = c.mf_created;
  st.deleted = c.deleted;
  st.admission_rejected = c.admission_rejected;
  st.capacity_rejected = c.capacity_rejected;
  st.rejected = rejected_.load(std::memory_order_relaxed);
  {
    MutexLock l(&tomb_mu_);
    st.bytes += tombstones_.capacity() * sizeof(uint64_t);
  }
  st.bytes += sizeof(SparseTable) + shards_.capacity() * sizeof(void*);
  return st;
}

size_t SparseTable::Size() {
  size_t n = 0;
  for (auto& shard : shards_) n += shard->Size();
  return n;
}

bool SparseTable::Contains(uint64_t key) {
  const uint64_t h = TableHash(key);
  return shards_[ShardOf(h, static_cast<uint32_t>(shards_.size()))]->Contains(key, h);
}

namespace {
struct KeyPos {
  uint64_t key;
  uint64_t pos;  // 64-bit: a table may hold 2^32 rows or more (a uint32 wrapped, exporting wrong rows); the
                 // struct is 16 bytes either way
};
inline bool KeyPosLess(const KeyPos& a, const KeyPos& b) { return a.key < b.key; }

// Even split of [0, n) into parts: part i is [Split(n, parts, i), Split(n, parts, i + 1)).
inline size_t Split(size_t n, size_t parts, size_t i) { return n / parts * i + std::min(i, n % parts); }
}  // namespace

void SparseTable::Export(ExportMode mode, uint32_t buckets, int64_t bucket, ExportResult* out) {
  const RowLayout& lay = layout();
  const size_t bw = lay.base_export_width();
  const size_t mw = lay.mf_width();
  const size_t lw = lay.lr_width();
  const size_t num_shards = shards_.size();
  const int threads = num_threads();
  auto in_bucket = [&](uint64_t key) {
    return bucket < 0 || Mix64(key) % buckets == static_cast<uint64_t>(bucket);
  };
  auto keep = [&](uint64_t key, const RowHeader& h, const float* m) {
    bool k = false;
    switch (mode) {
      case ExportMode::kCheckpoint:
        k = true;
        break;
      case ExportMode::kBase:
        k = accessor_.SaveBase(h);
        break;
      case ExportMode::kDelta:
        k = accessor_.SaveDelta(h);
        break;
      case ExportMode::kServing:
        k = m != nullptr;
        break;
    }
    return k && in_bucket(key);
  };
  // Unsorted copy: shard s writes rows [row_begin[s], row_begin[s+1]) and mf rows
  // [mf_begin[s], mf_begin[s+1]) of these presized buffers.
  std::vector<size_t> row_begin(num_shards + 1, 0), mf_begin(num_shards + 1, 0);
  std::vector<KeyPos> kp;
  std::vector<float> base;
  std::vector<uint8_t> has_mf;
  std::vector<uint64_t> mf_of;  // mf row of unsorted row i (when has_mf); 64-bit as KeyPos::pos
  std::vector<float> mf;
  {
    // One consistent moment: gate_ held exclusively means no mutating call is in flight (they all
    // hold it shared for their whole duration), so the shards can be copied one by one, in
    // parallel, each under its own lock (pulls may still read rows meanwhile). Two passes: count,
    // then each shard fills its slice of the presized buffers.
    WriterMutexLock gate(&gate_);
    pool_->ParallelFor(num_shards, [&](size_t s) {
      Shard* sh = shards_[s].get();
      ReaderMutexLock l(sh->mu());  // reads only (the gate keeps writers out)
      size_t rows = 0, mfs = 0;
      sh->ForEachLocked([&](uint64_t key, const RowHeader& h, const float* m) {
        if (!keep(key, h, m)) return;
        ++rows;
        mfs += m != nullptr ? 1 : 0;
      });
      row_begin[s + 1] = rows;
      mf_begin[s + 1] = mfs;
    }, threads);
    for (size_t s = 0; s < num_shards; ++s) {
      row_begin[s + 1] += row_begin[s];
      mf_begin[s + 1] += mf_begin[s];
    }
    const size_t n = row_begin[num_shards], m = mf_begin[num_shards];
    kp.resize(n);
    base.resize(n * bw);
    has_mf.resize(n);
    mf_of.resize(n);
    mf.resize(m * mw);
    pool_->ParallelFor(num_shards, [&](size_t s) {
      Shard* sh = shards_[s].get();
      ReaderMutexLock l(sh->mu());  // reads only (the gate keeps writers out)
      size_t i = row_begin[s], j = mf_begin[s];
      sh->ForEachLocked([&](uint64_t key, const RowHeader& h, const float* m) {
        if (!keep(key, h, m)) return;
        kp[i] = KeyPos{key, i};
        float* b = base.data() + i * bw;
        b[0] = h.show;
        b[1] = h.click;
        b[2] = h.delta_score;
        b[3] = static_cast<float>(h.unseen_days);
        b[4] = static_cast<float>(h.slot);
        std::memcpy(b + 5, RowLayout::Lr(&h), lw * sizeof(float));
        has_mf[i] = m != nullptr ? 1 : 0;
        if (m != nullptr) {
          mf_of[i] = j;
          std::memcpy(mf.data() + j * mw, m, mw * sizeof(float));
          ++j;
        }
        ++i;
      });
    }, threads);
    MutexLock l(&tomb_mu_);
    // A base or delta snapshot is about to reach a serving view: deletions from now on must be listed
    // (the first base's included), so that the next delta carries them.
    if (mode == ExportMode::kBase || mode == ExportMode::kDelta) track_tombstones_ = true;
    out->pending_tombstones = tombstones_.size();
    out->tombstones.clear();
    if (mode == ExportMode::kCheckpoint || mode == ExportMode::kDelta) {
      for (uint64_t k : tombstones_) {
        if (in_bucket(k)) out->tombstones.push_back(k);
      }
    }
  }

  // Sort by key (as uint64) outside the gate: each shard's run in parallel, then pairwise merges
  // (the order does not depend on the shard count, so files are deterministic).
  const size_t n = kp.size();
  {
    std::vector<size_t> runs(row_begin);  // run r is [runs[r], runs[r+1])
    pool_->ParallelFor(num_shards, [&](size_t s) {
      std::sort(kp.begin() + row_begin[s], kp.begin() + row_begin[s + 1], KeyPosLess);
    }, threads);
    std::vector<KeyPos> tmp(n);
    while (runs.size() > 2) {
      const size_t num_runs = runs.size() - 1;
      const size_t pairs = (num_runs + 1) / 2;
      pool_->ParallelFor(pairs, [&](size_t p) {
        const size_t lo = runs[2 * p], mid = runs[std::min(2 * p + 1, num_runs)], hi = runs[std::min(2 * p + 2, num_runs)];
        std::merge(kp.begin() + lo, kp.begin() + mid, kp.begin() + mid, kp.begin() + hi, tmp.begin() + lo, KeyPosLess);
      }, threads);
      kp.swap(tmp);
      std::vector<size_t> next;
      for (size_t r = 0; r < runs.size(); r += 2) next.push_back(runs[r]);
      if (next.back() != runs.back()) next.push_back(runs.back());
      runs.swap(next);
    }
  }

  // Gather in sorted order, in parallel over contiguous output ranges; the mf slice of each range
  // starts at the number of has_mf rows before it.
  out->keys.resize(n);
  out->base.resize(n * bw);
  out->has_mf.resize(n);
  out->mf.resize(mf.size());
  const size_t parts = n < kParallelMinKeys ? 1 : static_cast<size_t>(threads) * 4;
  std::vector<size_t> mf_start(parts + 1, 0);
  pool_->ParallelFor(parts, [&](size_t p) {
    size_t c = 0;
    for (size_t i = Split(n, parts, p), e = Split(n, parts, p + 1); i < e; ++i) c += has_mf[kp[i].pos];
    mf_start[p + 1] = c;
  }, threads);
  for (size_t p = 0; p < parts; ++p) mf_start[p + 1] += mf_start[p];
  pool_->ParallelFor(parts, [&](size_t p) {
    size_t j = mf_start[p];
    constexpr size_t kAhead = 16;
    for (size_t i = Split(n, parts, p), e = Split(n, parts, p + 1); i < e; ++i) {
      if (i + kAhead < e) {  // the reads are random: overlap their misses
        const uint64_t ahead = kp[i + kAhead].pos;
        PrefetchBytes(&base[static_cast<size_t>(ahead) * bw], bw * sizeof(float));
        if (has_mf[ahead]) PrefetchBytes(&mf[static_cast<size_t>(mf_of[ahead]) * mw], mw * sizeof(float));
      }
      const uint64_t src = kp[i].pos;
      out->keys[i] = kp[i].key;
      std::memcpy(&out->base[i * bw], &base[static_cast<size_t>(src) * bw], bw * sizeof(float));
      out->has_mf[i] = has_mf[src];
      if (has_mf[src]) {
        std::memcpy(&out->mf[j * mw], &mf[static_cast<size_t>(mf_of[src]) * mw], mw * sizeof(float));
        ++j;
      }
    }
  }, threads);
}

void SparseTable::CommitSave(ExportMode mode, const uint64_t* keys, const float* delta_scores, size_t n,
                             size_t tombstones) {
  if (mode != ExportMode::kBase && mode != ExportMode::kDelta) return;
  ReaderMutexLock gate(&gate_);
  MutexLock no_deletions(&delete_mu_);  // the list below stays every key deleted since the snapshot
  std::unordered_set<uint64_t> deleted_since;
  {
    MutexLock l(&tomb_mu_);
    if (tombstones < tombstones_.size()) deleted_since.insert(tombstones_.begin() + tombstones, tombstones_.end());
  }
  const uint32_t num_shards = static_cast<uint32_t>(shards_.size());
  for (size_t i = 0; i < n; ++i) {
    if (!deleted_since.empty() && deleted_since.count(keys[i]) != 0) continue;  // not the saved row
    const uint64_t h = TableHash(keys[i]);
    shards_[ShardOf(h, num_shards)]->SubtractDelta(keys[i], h, delta_scores[i]);
  }
  MutexLock l(&tomb_mu_);
  track_tombstones_ = true;  // a serving view now holds keys of this table: its deletions matter
  const size_t saved = std::min(tombstones, tombstones_.size());
  tombstones_.erase(tombstones_.begin(), tombstones_.begin() + static_cast<std::ptrdiff_t>(saved));
  // A day's deletions can be millions of keys: give the memory back once the list has been saved,
  // rather than holding the high-water mark forever (stats()["bytes"] counts the capacity).
  if (tombstones_.capacity() > 2 * tombstones_.size() + 1024) tombstones_.shrink_to_fit();
}

void SparseTable::LoadRows(const uint64_t* keys, size_t n, const float* base, const uint8_t* has_mf,
                           const float* mf) {
  if (n == 0) return;
  size_t m = 0;
  for (size_t i = 0; i < n; ++i) m += has_mf[i] ? 1 : 0;
  RowSegment seg;
  seg.keys = keys;
  seg.n = n;
  seg.base = base;
  seg.has_mf = has_mf;
  seg.mf = mf;
  seg.mf_rows = m;
  LoadSegments(&seg, 1, /*check=*/false, /*load=*/true);
}

Status SparseTable::LoadRowSegments(const RowSegment* segs, size_t num_segs, bool check) {
  return LoadSegments(segs, num_segs, check, /*load=*/true);
}

Status SparseTable::CheckRowSegments(const RowSegment* segs, size_t num_segs) {
  return LoadSegments(segs, num_segs, /*check=*/true, /*load=*/false);
}

void SparseTable::SetTombstones(const uint64_t* keys, size_t n) {
  std::vector<uint64_t> list(keys, keys + n);  // copy outside the locks
  ReaderMutexLock gate(&gate_);
  MutexLock deleting(&delete_mu_);  // not between end_day's reserve of room on the list and its use
  MutexLock l(&tomb_mu_);
  tombstones_.swap(list);
}

void SparseTable::ForgetTombstones(const uint64_t* keys, size_t n) {
  if (n == 0) return;
  const std::unordered_set<uint64_t> published(keys, keys + n);  // built outside the locks
  ReaderMutexLock gate(&gate_);
  MutexLock l(&tomb_mu_);
  tombstones_.erase(std::remove_if(tombstones_.begin(), tombstones_.end(),
                                   [&](uint64_t k) { return published.count(k) != 0; }),
                    tombstones_.end());
}

void SparseTable::SetTrackTombstones(bool on) {
  MutexLock l(&tomb_mu_);
  track_tombstones_ = on;
}

bool SparseTable::track_tombstones() {
  MutexLock l(&tomb_mu_);
  return track_tombstones_;
}

size_t SparseTable::Erase(const uint64_t* keys, size_t n) {
  const uint32_t num_shards = static_cast<uint32_t>(shards_.size());
  size_t erased = 0;
  ReaderMutexLock gate(&gate_);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t h = TableHash(keys[i]);
    erased += shards_[ShardOf(h, num_shards)]->Erase(keys[i], h) ? 1 : 0;
  }
  return erased;
}

void SparseTable::Clear() {
  ReaderMutexLock gate(&gate_);
  MutexLock deleting(&delete_mu_);  // as SetTombstones
  for (auto& shard : shards_) shard->Clear();
  MutexLock l(&tomb_mu_);
  tombstones_.clear();
  tombstones_.shrink_to_fit();
}

// ---------------------------------------------------------------------- ExportBuckets (the save path)

namespace {
// A row of one shard found by ExportBuckets: ref = shard << 32 | row id.
struct BucketEntry {
  uint64_t key;
  uint64_t ref;
};

// LSD radix sort of e[0, n) by key (as uint64), one byte a pass; tmp has room for n entries. A pass
// whose byte is the same in every key is skipped (small keys sort in a few passes). Result in e.
void RadixSortByKey(BucketEntry* e, BucketEntry* tmp, size_t n) {
  if (n < 2) return;
  if (n < 64) {
    std::sort(e, e + n, [](const BucketEntry& a, const BucketEntry& b) { return a.key < b.key; });
    return;
  }
  std::vector<size_t> hist(8 * 256, 0);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t k = e[i].key;
    for (int d = 0; d < 8; ++d) ++hist[d * 256 + ((k >> (8 * d)) & 255)];
  }
  BucketEntry* src = e;
  BucketEntry* dst = tmp;
  for (int d = 0; d < 8; ++d) {
    size_t* h = &hist[d * 256];
    const int shift = 8 * d;
    if (h[(src[0].key >> shift) & 255] == n) continue;  // every key has this byte
    size_t sum = 0;
    for (int v = 0; v < 256; ++v) {
      const size_t c = h[v];
      h[v] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) {
      const BucketEntry x = src[i];
      dst[h[(x.key >> shift) & 255]++] = x;
    }
    std::swap(src, dst);
  }
  if (src != e) std::memcpy(e, src, n * sizeof(BucketEntry));
}
}  // namespace

void SparseTable::ExportBucketsWith(ExportMode mode, uint32_t buckets, uint64_t salt,
                                    std::vector<uint64_t>* row_begin, const BucketPlace& place,
                                    const BucketDone& done, std::vector<uint64_t>* tombstones, size_t* pending) {
  const RowLayout& lay = layout();
  const size_t bw = lay.base_export_width();
  const size_t mw = lay.mf_width();
  const size_t lw = lay.lr_width();
  const size_t num_shards = shards_.size();
  const size_t nb = buckets;
  const int threads = num_threads();
  auto bucket_of = [&](uint64_t key) { return static_cast<size_t>(Mix64(key ^ salt) % buckets); };
  auto keep = [&](const Shard* sh, uint32_t row) {
    switch (mode) {
      case ExportMode::kCheckpoint:
        return true;
      case ExportMode::kBase:
        return accessor_.SaveBase(*sh->ExportRow(row));
      case ExportMode::kDelta:
        return accessor_.SaveDelta(*sh->ExportRow(row));
      case ExportMode::kServing:
        return RowRef::HasMf(row);
    }
    return false;
  };
  row_begin->assign(nb + 1, 0);
  std::vector<uint64_t> cursor(num_shards * nb, 0);  // [s * nb + b]: rows of shard s in bucket b, then
                                                     // where shard s writes its next row of bucket b

  // One consistent moment: gate_ held exclusively means no mutating call is in flight (they all hold
  // it shared for their whole duration), so no row changes until the copy is done. Pulls may still
  // read rows meanwhile (they only read).
  WriterMutexLock gate(&gate_);
  // 1. Count the rows of each (shard, bucket): reads the index only (and the row for a filtered mode).
  pool_->ParallelFor(num_shards, [&](size_t s) {
    Shard* sh = shards_[s].get();
    ReaderMutexLock l(sh->mu());  // reads only (the gate keeps writers out)
    uint64_t* c = &cursor[s * nb];
    sh->ForEachRowIdLocked([&](uint64_t key, uint32_t row) {
      if (keep(sh, row)) ++c[bucket_of(key)];
    });
  }, threads);
  uint64_t n = 0;
  for (size_t b = 0; b < nb; ++b) {
    (*row_begin)[b] = n;
    for (size_t s = 0; s < num_shards; ++s) {
      const uint64_t c = cursor[s * nb + b];
      cursor[s * nb + b] = n;  // bucket-major, shard-minor
      n += c;
    }
  }
  (*row_begin)[nb] = n;
  ExportBuffer entry_buf(n * sizeof(BucketEntry));
  BucketEntry* entries = entry_buf.as<BucketEntry>();
  // Sort scratch: one buffer of the largest bucket per running task, reused from bucket to bucket (fresh
  // memory is slow to first-touch: see export_buffer.h).
  uint64_t max_bucket = 0;
  for (size_t b = 0; b < nb; ++b) max_bucket = std::max(max_bucket, (*row_begin)[b + 1] - (*row_begin)[b]);
  Mutex scratch_mu;
  std::vector<ExportBuffer> scratch;  // idle buffers
  // 2. Each shard lists its rows into its slice of every bucket.
  pool_->ParallelFor(num_shards, [&](size_t s) {
    Shard* sh = shards_[s].get();
    ReaderMutexLock l(sh->mu());  // reads only (the gate keeps writers out)
    uint64_t* cur = &cursor[s * nb];
    const uint64_t tag = static_cast<uint64_t>(s) << 32;
    sh->ForEachRowIdLocked([&](uint64_t key, uint32_t row) {
      if (keep(sh, row)) entries[cur[bucket_of(key)]++] = BucketEntry{key, tag | row};
    });
  }, threads);
  // 3. Per bucket: sort by key, then copy each row from its shard to where place() says, and hand the
  // bucket to done(). The reads are random: the record is prefetched kAhead rows ahead.
  pool_->ParallelFor(nb, [&](size_t b) {
    const uint64_t lo = (*row_begin)[b], hi = (*row_begin)[b + 1];
    ExportBuffer tmp;
    {
      MutexLock l(&scratch_mu);
      if (!scratch.empty()) {
        tmp = std::move(scratch.back());
        scratch.pop_back();
      }
    }
    if (tmp.data() == nullptr) tmp = ExportBuffer(max_bucket * sizeof(BucketEntry));
    RadixSortByKey(entries + lo, tmp.as<BucketEntry>(), hi - lo);
    {
      MutexLock l(&scratch_mu);
      scratch.push_back(std::move(tmp));
    }
    const BucketRows dest = place(b, lo, hi - lo);
    auto shard_of = [&](uint64_t i) { return shards_[entries[i].ref >> 32].get(); };
    constexpr uint64_t kAhead = 16;
    uint64_t j = 0;
    for (uint64_t i = lo; i < hi; ++i) {
      if (i + kAhead < hi) shard_of(i + kAhead)->PrefetchRecord(static_cast<uint32_t>(entries[i + kAhead].ref));
      const Shard* sh = shard_of(i);
      const uint32_t ref = static_cast<uint32_t>(entries[i].ref);
      const RowHeader* h = sh->ExportRow(ref);
      const uint64_t k = i - lo;
      dest.keys[k] = entries[i].key;
      float* o = dest.base + k * bw;
      o[0] = h->show;
      o[1] = h->click;
      o[2] = h->delta_score;
      o[3] = static_cast<float>(h->unseen_days);
      o[4] = static_cast<float>(h->slot);
      std::memcpy(o + 5, RowLayout::Lr(h), lw * sizeof(float));
      const float* m = sh->ExportMf(ref, h);
      dest.has_mf[k] = m != nullptr ? 1 : 0;
      if (m != nullptr) {
        std::memcpy(dest.mf + j * mw, m, mw * sizeof(float));
        ++j;
      }
    }
    done(b, dest, hi - lo, j);
  }, threads);
  MutexLock l(&tomb_mu_);
  if (mode == ExportMode::kBase || mode == ExportMode::kDelta) track_tombstones_ = true;  // as Export
  *pending = tombstones_.size();
  tombstones->clear();
  if (mode == ExportMode::kCheckpoint || mode == ExportMode::kDelta) *tombstones = tombstones_;
}

void SparseTable::ExportBuckets(ExportMode mode, uint32_t buckets, uint64_t salt, BucketExport* out) {
  const size_t bw = layout().base_export_width();
  const size_t mw = layout().mf_width();
  out->mf_rows.assign(buckets, 0);
  // The buffers are sized once the rows are counted (the first place() call), under the gate.
  std::once_flag sized;
  const BucketPlace place = [&](size_t, uint64_t lo, uint64_t) {
    std::call_once(sized, [&] {
      const uint64_t n = out->row_begin[buckets];
      out->rows = n;
      out->keys = ExportBuffer(n * sizeof(uint64_t));
      out->base = ExportBuffer(n * bw * sizeof(float));
      out->has_mf = ExportBuffer(n);
      out->mf = ExportBuffer(n * mw * sizeof(float));
    });
    return BucketRows{out->keys.as<uint64_t>() + lo, out->base.as<float>() + lo * bw,
                      out->has_mf.as<uint8_t>() + lo, out->mf.as<float>() + lo * mw};
  };
  const BucketDone done = [&](size_t b, const BucketRows&, uint64_t, uint64_t mf_rows) { out->mf_rows[b] = mf_rows; };
  ExportBucketsWith(mode, buckets, salt, &out->row_begin, place, done, &out->tombstones, &out->pending_tombstones);
  out->rows = out->row_begin[buckets];
}

// ---------------------------------------------------------------------- SaveBuckets (the save path)

namespace {
// Creates (or truncates) path and writes bytes to it; no fsync (the caller syncs every file later).
Status WriteWholeFile(const std::string& path, const void* data, size_t bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::IOError(path + ": " + std::strerror(errno));
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t w = ::write(fd, p, bytes);
    if (w < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      ::close(fd);
      return Status::IOError(path + ": " + std::strerror(e));
    }
    p += w;
    bytes -= static_cast<size_t>(w);
  }
  if (::close(fd) != 0) return Status::IOError(path + ": " + std::strerror(errno));
  return Status::OK();
}
}  // namespace

Status SparseTable::SaveBuckets(ExportMode mode, uint32_t buckets, uint64_t salt,
                                const std::vector<std::string>& paths, bool sync, BucketSave* out) {
  if (paths.size() != static_cast<size_t>(buckets) * 4) {
    return Status::InvalidArgument("SaveBuckets needs 4 paths per bucket");
  }
  const size_t bw = layout().base_export_width();
  const size_t mw = layout().mf_width();
  // Per running task: one bucket's columns (sized for the largest bucket), reused from bucket to
  // bucket, so the only fresh memory of the save is the page cache of the files it writes.
  std::vector<uint64_t> row_begin;
  Mutex mu;
  std::vector<ExportBuffer> idle;               // GUARDED_BY(mu)
  std::vector<std::pair<size_t, ExportBuffer>> busy;  // bucket -> its buffer, GUARDED_BY(mu)
  std::vector<SavedFile> files;                 // GUARDED_BY(mu)
  Status first_error;                           // GUARDED_BY(mu)
  std::atomic<bool> failed{false};
  // Four threads: they mostly wait on the disk, and concurrent fsyncs share journal commits.
  std::unique_ptr<FileSyncer> syncer(sync ? new FileSyncer(4) : nullptr);
  uint64_t max_bucket = 0;
  std::once_flag sized;
  const BucketPlace place = [&](size_t b, uint64_t, uint64_t) {
    std::call_once(sized, [&] {
      for (size_t i = 0; i < buckets; ++i) max_bucket = std::max(max_bucket, row_begin[i + 1] - row_begin[i]);
    });
    const size_t row_bytes = 8 + bw * 4 + 1 + mw * 4;
    ExportBuffer buf;
    {
      MutexLock l(&mu);
      if (!idle.empty()) {
        buf = std::move(idle.back());
        idle.pop_back();
      }
    }
    if (buf.data() == nullptr) buf = ExportBuffer(max_bucket * row_bytes + 64);
    char* p = buf.data();
    BucketRows r;
    r.keys = reinterpret_cast<uint64_t*>(p);
    r.base = reinterpret_cast<float*>(p + max_bucket * 8);
    r.mf = reinterpret_cast<float*>(p + max_bucket * (8 + bw * 4));
    r.has_mf = reinterpret_cast<uint8_t*>(p + max_bucket * (8 + bw * 4 + mw * 4));
    MutexLock l(&mu);
    busy.emplace_back(b, std::move(buf));
    return r;
  };
  const BucketDone done = [&](size_t b, const BucketRows& r, uint64_t rows, uint64_t mf_rows) {
    std::vector<SavedFile> mine;
    Status st;
    if (rows > 0 && !failed.load(std::memory_order_relaxed)) {
      const void* data[4] = {r.keys, r.base, r.has_mf, r.mf};
      const uint64_t counts[4] = {rows, rows, rows, mf_rows};
      const uint64_t widths[4] = {8, bw * 4, 1, mw * 4};
      for (uint32_t c = 0; c < 4 && st.ok(); ++c) {
        const uint64_t bytes = counts[c] * widths[c];
        st = WriteWholeFile(paths[b * 4 + c], data[c], bytes);
        if (st.ok() && syncer) syncer->Submit(paths[b * 4 + c]);
        mine.push_back(SavedFile{static_cast<uint32_t>(b), c, counts[c], bytes, Crc32(data[c], bytes)});
      }
    }
    MutexLock l(&mu);
    for (auto it = busy.begin(); it != busy.end(); ++it) {
      if (it->first == b) {
        idle.push_back(std::move(it->second));
        busy.erase(it);
        break;
      }
    }
    if (!st.ok()) {
      if (first_error.ok()) first_error = st;
      failed.store(true, std::memory_order_relaxed);
    }
    files.insert(files.end(), mine.begin(), mine.end());
    out->mf_rows += mf_rows;
  };
  out->mf_rows = 0;
  ExportBucketsWith(mode, buckets, salt, &row_begin, place, done, &out->tombstones, &out->pending_tombstones);
  const Status synced = syncer ? syncer->Finish() : Status::OK();
  if (!first_error.ok()) return first_error;
  if (!synced.ok()) return synced;
  std::sort(files.begin(), files.end(), [](const SavedFile& a, const SavedFile& b) {
    return a.bucket != b.bucket ? a.bucket < b.bucket : a.column < b.column;
  });
  out->files = std::move(files);
  out->rows = row_begin[buckets];
  return Status::OK();
}

// ---------------------------------------------------------------------- LoadRowSegments (the load path)

namespace {
// Rows [lo, hi) of segment seg: the unit of the check and partition passes.
struct LoadPiece {
  size_t seg;
  size_t lo, hi;
  uint64_t mf_before = 0;  // has_mf rows of the segment before lo
};
constexpr size_t kLoadPieceRows = size_t{1} << 16;

std::string ShortFloat(float v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(v));
  return buf;
}

// Whether a base row passes the checks of RowError, without a branch per column or a libm call (floor
// is a call without SSE4.1, and this build has no -march): the fast path of CheckPiece.
inline bool BaseRowOk(const float* row, size_t bw) {
  bool ok = true;
  for (size_t j = 0; j < bw; ++j) ok &= std::isfinite(row[j]);
  if (!ok) return false;
  const float u = row[3];
  const double slot = row[4];
  return row[0] >= 0 && row[1] >= 0 && u >= 0 && u <= static_cast<float>(kMaxUnseenDays) &&
         static_cast<float>(static_cast<int32_t>(u)) == u && std::fabs(slot) <= 2147483647.0 &&
         static_cast<double>(static_cast<int64_t>(slot)) == slot;
}

// The message for row i of seg if it is bad ("" if not): the rules BaseRowOk checks, spelled out.
std::string RowError(const RowSegment& seg, size_t si, size_t i, size_t bw) {
  const std::string where = "segment " + std::to_string(si) + ": row " + std::to_string(i);
  const uint8_t h = seg.has_mf[i];
  if (h > 1) return where + ": has_mf must be 0 or 1, got " + std::to_string(int{h});
  const float* row = seg.base + i * bw;
  for (size_t j = 0; j < bw; ++j) {
    if (!std::isfinite(row[j])) return where + ": base column " + std::to_string(j) + " is not finite";
  }
  if (row[0] < 0 || row[1] < 0) return where + ": show and click must be >= 0";
  if (row[3] < 0 || row[3] > kMaxUnseenDays || row[3] != std::floor(row[3])) {
    return where + ": unseen_days (base column 3) must be an integer in [0, 65535], got " + ShortFloat(row[3]);
  }
  if (row[4] != std::floor(row[4]) || std::fabs(static_cast<double>(row[4])) > 2147483647.0) {
    return where + ": slot (base column 4) must be an int32, got " + ShortFloat(row[4]);
  }
  return std::string();
}

// The first bad value of rows [lo, hi) of seg, as a message ("" if none; mf rows are checked
// apart); counts the has_mf ones.
std::string CheckPiece(const RowSegment& seg, size_t si, size_t lo, size_t hi, size_t bw, uint64_t* ones) {
  uint64_t m = 0;
  for (size_t i = lo; i < hi; ++i) {
    const uint8_t h = seg.has_mf[i];
    m += h;
    if (h > 1 || !BaseRowOk(seg.base + i * bw, bw)) {
      std::string e = RowError(seg, si, i, bw);
      if (!e.empty()) return e;
    }
  }
  *ones = m;
  return std::string();
}

// The first non-finite value of mf rows [first, first + rows) of seg, as a message ("" if none).
std::string CheckMfRows(const RowSegment& seg, size_t si, uint64_t first, uint64_t rows, size_t mw) {
  const float* f = seg.mf + first * mw;
  const size_t n = rows * mw;
  bool ok = true;
  for (size_t k = 0; k < n; ++k) ok &= std::isfinite(f[k]);
  if (ok) return std::string();
  for (size_t k = 0; k < n; ++k) {
    if (!std::isfinite(f[k])) {
      return "segment " + std::to_string(si) + ": mf row " + std::to_string(first + k / mw) + " column " +
             std::to_string(k % mw) + " is not finite";
    }
  }
  return std::string();
}
}  // namespace

Status SparseTable::LoadSegments(const RowSegment* segs, size_t num_segs, bool check, bool load) {
  const size_t bw = layout().base_export_width();
  const size_t mw = layout().mf_width();
  const uint32_t num_shards = static_cast<uint32_t>(shards_.size());
  const int threads = num_threads();
  std::vector<LoadPiece> pieces;
  for (size_t si = 0; si < num_segs; ++si) {
    if (segs[si].n >= (size_t{1} << 32)) {
      return Status::InvalidArgument("segment " + std::to_string(si) + " has 2^32 rows or more");
    }
    if (segs[si].n == 0 && segs[si].mf_rows != 0) {  // no piece of it below counts its has_mf ones
      return Status::InvalidArgument("segment " + std::to_string(si) + ": has_mf marks 0 rows, but mf holds " +
                                     std::to_string(segs[si].mf_rows));
    }
    for (size_t lo = 0; lo < segs[si].n; lo += kLoadPieceRows) {
      pieces.push_back(LoadPiece{si, lo, std::min(segs[si].n, lo + kLoadPieceRows)});
    }
  }
  if (pieces.empty()) return Status::OK();
  const size_t np = pieces.size();
  // 1. has_mf ones per piece (and, if check, every value but the mf rows), in parallel.
  std::vector<uint64_t> ones(np, 0);
  std::vector<std::string> errors(np);
  pool_->ParallelFor(np, [&](size_t p) {
    const LoadPiece& pc = pieces[p];
    const RowSegment& seg = segs[pc.seg];
    if (check) {
      // mf rows are checked in pass 2, once each piece knows where its mf rows start.
      errors[p] = CheckPiece(seg, pc.seg, pc.lo, pc.hi, bw, &ones[p]);
    } else {
      uint64_t m = 0;
      for (size_t i = pc.lo; i < pc.hi; ++i) m += seg.has_mf[i] ? 1 : 0;
      ones[p] = m;
    }
  }, threads);
  for (size_t p = 0; p < np; ++p) {
    if (!errors[p].empty()) return Status::InvalidArgument(errors[p]);
  }
  for (size_t p = 0, run = 0; p < np; ++p) {
    if (p > 0 && pieces[p].seg != pieces[p - 1].seg) run = 0;
    pieces[p].mf_before = run;
    run += ones[p];
    const bool last = p + 1 == np || pieces[p + 1].seg != pieces[p].seg;
    if (last && run != segs[pieces[p].seg].mf_rows) {
      return Status::InvalidArgument("segment " + std::to_string(pieces[p].seg) + ": has_mf marks " +
                                     std::to_string(run) + " rows, but mf holds " +
                                     std::to_string(segs[pieces[p].seg].mf_rows));
    }
  }
  // 2. mf values (if check) and rows per (piece, shard), in parallel.
  std::vector<uint64_t> at(load ? np * num_shards : 0, 0);  // rows of piece p in shard s, then where they go
  pool_->ParallelFor(np, [&](size_t p) {
    const LoadPiece& pc = pieces[p];
    const RowSegment& seg = segs[pc.seg];
    if (check) {
      errors[p] = CheckMfRows(seg, pc.seg, pc.mf_before, ones[p], mw);
      if (!errors[p].empty()) return;
    }
    if (!load) return;
    uint64_t* c = &at[p * num_shards];
    for (size_t i = pc.lo; i < pc.hi; ++i) ++c[ShardOf(TableHash(seg.keys[i]), num_shards)];
  }, threads);
  for (size_t p = 0; p < np; ++p) {
    if (!errors[p].empty()) return Status::InvalidArgument(errors[p]);
  }
  if (!load) return Status::OK();
  // Shard-major, piece-minor: block (p, s) holds the rows of piece p that belong to shard s, so a shard's
  // rows are contiguous and in input order (last one wins).
  std::vector<uint64_t> shard_rows(num_shards, 0), shard_start(num_shards + 1, 0);
  uint64_t total = 0;
  for (uint32_t s = 0; s < num_shards; ++s) {
    shard_start[s] = total;
    for (size_t p = 0; p < np; ++p) {
      const uint64_t c = at[p * num_shards + s];
      at[p * num_shards + s] = total;  // where block (p, s) starts
      total += c;
      shard_rows[s] += c;
    }
  }
  shard_start[num_shards] = total;
  // 3. Scatter the keys and has_mf flags into shard order (sequential reads, one write stream per shard),
  // so phase 1 reads each shard's keys contiguously.
  ExportBuffer io_buf(total * sizeof(uint64_t)), flag_buf(total);
  uint64_t* io = io_buf.as<uint64_t>();
  uint8_t* flags = flag_buf.as<uint8_t>();
  const size_t par = total < kParallelMinKeys ? 1 : static_cast<size_t>(threads);
  pool_->ParallelFor(np, [&](size_t p) {
    const LoadPiece& pc = pieces[p];
    const RowSegment& seg = segs[pc.seg];
    std::vector<uint64_t> cur(at.begin() + p * num_shards, at.begin() + (p + 1) * num_shards);
    for (size_t i = pc.lo; i < pc.hi; ++i) {
      const uint64_t key = seg.keys[i];
      const uint64_t d = cur[ShardOf(TableHash(key), num_shards)]++;
      io[d] = key;
      flags[d] = seg.has_mf[i] != 0 ? 1 : 0;
    }
  }, static_cast<int>(par));
  // Phase 1's output: per shard, the rows of keys already present (phase 3 loads them).
  std::vector<std::vector<uint32_t>> existing(num_shards);
  std::vector<uint8_t> ok(num_shards, 1);
  // Phase 1, one task per shard: find or insert every key (its index grown once), allocating the new rows.
  const std::function<void(size_t)> insert_keys = [&](size_t s) {
    if (shard_rows[s] == 0) return;
    ok[s] = shards_[s]->LoadIndexBulk(io + shard_start[s], flags + shard_start[s], shard_rows[s], &existing[s]) ? 1 : 0;
  };
  // Phases 2 and 3 (below, after phase 1) as functions made now: a std::function of a lambda with these
  // captures allocates, and nothing may fail between phase 1 inserting keys and phase 2 writing their rows.
  // Phase 2, one task per piece: walk the input in order (sequential reads) and write each new row into
  // its shard's records (sequential writes within each shard). A row of a present key instead leaves
  // where it is in the input for phase 3: piece << 32 | row offset << 16 | mf row offset (pieces hold at
  // most 2^16 rows).
  // It allocates nothing (its cursors are `at`'s own slice, which nothing reads after it): a std::bad_alloc
  // here would leave phase 1's rows in the index unwritten.
  static_assert(kLoadPieceRows <= (size_t{1} << 16), "phase 2 packs offsets in a piece into 16 bits");
  const std::function<void(size_t)> write_new_rows = [&](size_t p) {
    const LoadPiece& pc = pieces[p];
    const RowSegment& seg = segs[pc.seg];
    uint64_t* cur = &at[p * num_shards];
    // The destinations kWriteAhead rows ahead are looked up early and prefetched for writing: the rows go
    // to 2 x num_shards write streams, more than the hardware prefetchers follow.
    constexpr size_t kWriteAhead = 16;
    struct Ahead {
      uint32_t shard;
      uint64_t d;
    } ring[kWriteAhead];
    auto look = [&](size_t i) {
      const uint32_t s = ShardOf(TableHash(seg.keys[i]), num_shards);
      const uint64_t d = cur[s]++;
      if (io[d] != Shard::kLoadExisting) shards_[s]->PrefetchNewRow(io[d]);
      ring[i % kWriteAhead] = Ahead{s, d};
    };
    for (size_t i = pc.lo; i < pc.hi && i < pc.lo + kWriteAhead; ++i) look(i);
    uint64_t m = pc.mf_before;
    for (size_t i = pc.lo; i < pc.hi; ++i) {
      const Ahead a = ring[i % kWriteAhead];
      if (i + kWriteAhead < pc.hi) look(i + kWriteAhead);
      const uint32_t s = a.shard;
      const uint64_t d = a.d;
      const bool has = seg.has_mf[i] != 0;  // a flag: a 2 (check = false lets it through) counts one mf row
      const uint64_t v = io[d];
      if (v != Shard::kLoadExisting) {
        shards_[s]->WriteNewRow(v, seg.base + i * bw, has ? seg.mf + m * mw : nullptr);
      } else {
        io[d] = (uint64_t{p} << 32) | ((i - pc.lo) << 16) | (m - pc.mf_before);
      }
      m += has ? 1 : 0;
    }
  };
  // Phase 3, one task per shard: rows of keys that were present, in input order. A row that gains or loses
  // its mf moves into a record phase 1 reserved, so this allocates nothing either.
  const std::function<void(size_t)> load_existing_rows = [&](size_t s) {
    Shard* sh = shards_[s].get();
    for (uint32_t j : existing[s]) {
      const uint64_t v = io[shard_start[s] + j];
      const LoadPiece& pc = pieces[v >> 32];
      const RowSegment& seg = segs[pc.seg];
      const size_t i = pc.lo + ((v >> 16) & 0xffff);
      const float* mf = seg.has_mf[i] ? seg.mf + (pc.mf_before + (v & 0xffff)) * mw : nullptr;
      sh->LoadExistingRow(seg.keys[i], seg.base + i * bw, mf);
    }
  };
  // The load holds every shard's lock from here to the end, taken by this thread in index order (nothing
  // else holds two shard locks, so the order cannot deadlock): a pull never sees a row of phase 1 before
  // phase 2 wrote it. The pool tasks below work on disjoint shards or rows under these locks.
  ReaderMutexLock gate(&gate_);
  for (auto& sh : shards_) sh->mu()->Lock();
  struct Unlocker {
    std::vector<std::unique_ptr<Shard>>* shards;
    ~Unlocker() NO_THREAD_SAFETY_ANALYSIS {
      for (size_t s = shards->size(); s-- > 0;) (*shards)[s]->mu()->Unlock();
    }
  } unlock{&shards_};
  // Phase 1 (ParallelFor throws only what its tasks throw, and LoadIndexBulk catches its own failure): a
  // shard that fails undoes itself, then the others undo theirs, and the load fails whole.
  pool_->ParallelFor(num_shards, insert_keys, static_cast<int>(par));
  if (std::find(ok.begin(), ok.end(), 0) != ok.end()) {
    for (uint32_t s = 0; s < num_shards; ++s) {
      if (ok[s] && shard_rows[s] > 0) shards_[s]->UndoLoadIndexBulk(io + shard_start[s], shard_rows[s]);
    }
    throw std::bad_alloc();
  }
  pool_->ParallelFor(np, write_new_rows, static_cast<int>(par));  // phase 2
  pool_->ParallelFor(num_shards, load_existing_rows, static_cast<int>(par));  // phase 3
  return Status::OK();
}

}  // namespace psembed
