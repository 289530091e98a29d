// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Shard: one hash index + two slab pools + one mutex; pull/push/shrink for the keys it owns.
//
// Thread safety: every public method locks mu_ for its whole duration, except the *Locked methods,
// which REQUIRE the caller to hold mu() (export takes all shard locks in index order for one
// consistent snapshot). Calls on different shards run concurrently; calls on one shard serialize.
// Invariants: (1) index_ maps a key to a live base record and nothing else does; (2) a record's
// mf_index is kNoMf or a live mf block owned by it alone. Admission keeps no state for rejected
// keys: the draw of a key pushed by push `push_id` is u(seed, key, 3, AdmissionDraw(day_index_,
// push_id)) (ctr_accessor.h), a function of the push alone, so memory holds only admitted rows.

#ifndef PSEMBED_TABLE_SHARD_H_
#define PSEMBED_TABLE_SHARD_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "table/ctr_accessor.h"
#include "table/row_store/chunk_arena.h"
#include "table/row_store/feature_value.h"
#include "table/row_store/hash_index.h"
#include "table/row_store/slab_pool.h"
#include "util/mutex.h"

namespace psembed {

// One key of a push after merging the duplicates of a call (sums in input order).
struct MergedPush {
  uint64_t key;
  uint64_t hash;     // TableHash(key)
  const float* grad; // 1 + dim floats
  float show;
  float click;
  int32_t slot;
};

struct ShardCounters {
  uint64_t pull_misses = 0;
  uint64_t inserts = 0;
  uint64_t mf_created = 0;
  uint64_t deleted = 0;
  uint64_t admission_rejected = 0;
};

class Shard {
 public:
  // Both outlive the shard; the arena holds the memory of the shard's slab chunks.
  Shard(const CtrAccessor* accessor, ChunkArena* arena);
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  Mutex* mu() { return &mu_; }

  // For j in [0, n): copies the row of keys[j] (hashes[j] = TableHash(keys[j])) into
  // out + pos[j] * width (width = 1 + dim, or 3 + dim with stats: show, click first). A missing key writes zeros and counts a pull miss; a row
  // without mf reads zeros in the mf part. Never inserts.
  void Pull(const uint64_t* keys, const uint64_t* hashes, const uint32_t* pos, size_t n, bool with_stats,
            float* out) LOCKS_EXCLUDED(mu_);

  // Applies merged pushes in order (see CtrAccessor::Update and Admit). has_slots: take item.slot.
  // push_id names the push for admission draws (SparseTable::Push).
  void Push(const MergedPush* items, size_t n, bool has_slots, uint64_t push_id) LOCKS_EXCLUDED(mu_);

  // show, click *= factor; unseen_days += add_unseen (saturating); then deletes rows by the delete
  // predicate, appending their keys to *deleted. Returns the number deleted. If new_day_index >= 0
  // this is a day boundary (end_day): admission draws use day index new_day_index from now on.
  size_t DecayAndDelete(double factor, uint32_t add_unseen, std::vector<uint64_t>* deleted,
                        int64_t new_day_index = -1) LOCKS_EXCLUDED(mu_);

  // Sets the day index of admission draws (table day + 1) (checkpoint load).
  void SetAdmissionDay(uint32_t day_index) LOCKS_EXCLUDED(mu_);

  // unseen_days += 1 for every row (saturating).
  void NewDay() LOCKS_EXCLUDED(mu_);

  size_t Size() LOCKS_EXCLUDED(mu_);
  bool Contains(uint64_t key, uint64_t hash) LOCKS_EXCLUDED(mu_);
  // Removes key (no tombstone, not counted as deleted). Returns whether it existed.
  bool Erase(uint64_t key, uint64_t hash) LOCKS_EXCLUDED(mu_);
  // Inserts or overwrites a row from export columns (base: base_export_width floats; mf: mf_width
  // floats or nullptr for a row without mf).
  void Load(uint64_t key, uint64_t hash, const float* base, const float* mf) LOCKS_EXCLUDED(mu_);
  // The load path (SparseTable::LoadRowSegments), under mu(): grow the index once for `extra` more
  // keys, then insert/overwrite rows rows[j] (j in [0, n)) of one block of input: key keys[rows[j]],
  // base row rows[j] of base (base_export_width floats each) and, if mf_rows[j] != kNoMfRow, row
  // mf_rows[j] of mf. REQUIRES: every key belongs to this shard.
  static constexpr uint32_t kNoMfRow = 0xffffffffu;
  void ReserveLocked(size_t extra) EXCLUSIVE_LOCKS_REQUIRED(mu_) { index_.Reserve(index_.size() + extra); }
  void LoadBlockLocked(const uint64_t* keys, const float* base, const float* mf, const uint32_t* rows,
                       const uint32_t* mf_rows, size_t n) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // delta_score -= saved, if key is present.
  void SubtractDelta(uint64_t key, uint64_t hash, float saved) LOCKS_EXCLUDED(mu_);
  void Clear() LOCKS_EXCLUDED(mu_);

  // Counters, keys_with_mf and bytes held. bytes counts capacity, not size.
  void GetStats(ShardCounters* c, size_t* keys, size_t* keys_with_mf, size_t* bytes) LOCKS_EXCLUDED(mu_);

  // fn(key, const RowHeader&, const float* mf_or_null) for every row. REQUIRES: mu() held.
  template <typename Fn>
  void ForEachLocked(Fn&& fn) const EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    index_.ForEach([&](uint64_t key, uint32_t row) {
      const auto* h = reinterpret_cast<const RowHeader*>(base_.At(row));
      const float* mf = h->mf_index == kNoMf ? nullptr : reinterpret_cast<const float*>(mf_.At(h->mf_index));
      fn(key, *h, mf);
    });
  }

  // Export access (SparseTable::ExportBuckets). fn(key, row id) for every row, in index order,
  // without reading the row. REQUIRES: mu() held.
  template <typename Fn>
  void ForEachRowIdLocked(Fn&& fn) const EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    index_.ForEach(fn);
  }
  // The record of a row id from ForEachRowIdLocked, and its mf block (nullptr without mf).
  // REQUIRES: the shard is not mutated meanwhile (the table's gate held exclusively). No lock is
  // needed beyond that: nothing else writes rows, so any number of threads may read at once.
  const RowHeader* ExportRow(uint32_t row) const NO_THREAD_SAFETY_ANALYSIS { return Row(row); }
  const float* ExportMf(const RowHeader* h) const NO_THREAD_SAFETY_ANALYSIS {
    return h->mf_index == kNoMf ? nullptr : Mf(h->mf_index);
  }

 private:
  RowHeader* Row(uint32_t row) const EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return reinterpret_cast<RowHeader*>(base_.At(row));
  }
  float* Mf(uint32_t idx) const EXCLUSIVE_LOCKS_REQUIRED(mu_) { return reinterpret_cast<float*>(mf_.At(idx)); }
  void DeleteRowLocked(uint64_t key, uint64_t hash) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LoadLocked(uint64_t key, uint64_t hash, const float* base, const float* mf) EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CtrAccessor* const accessor_;  // not owned; outlives the shard
  const RowLayout& layout_;
  Mutex mu_;
  HashIndex index_ GUARDED_BY(mu_);     // key -> base record
  uint32_t admission_day_ GUARDED_BY(mu_) = 0;  // table day + 1 (0 before the first end_day)
  SlabPool base_ GUARDED_BY(mu_);
  SlabPool mf_ GUARDED_BY(mu_);
  ShardCounters counters_ GUARDED_BY(mu_);
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_SHARD_H_
