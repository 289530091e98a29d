// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Shard: one hash index + two slab pools (short records without mf, long records with mf) + one
// reader/writer lock; pull/push/shrink for the keys it owns.
//
// Thread safety: every public method locks mu_ for its whole duration (the reads, Pull, Size, Contains
// and GetStats, in shared mode, so they run together; everything else exclusively), except the *Locked
// and *Shared methods, which REQUIRE the caller to hold mu(), the bulk-load phases (LoadIndexBulk ...
// LoadExistingRow: the load holds every shard's mu() in index order for its whole duration) and
// ExportRow/ExportMf (the table's gate held exclusively: nothing mutates). Calls on different shards run concurrently; on one
// shard, the reads run together and every other call runs alone.
// Invariants: (1) index_ maps a key to the RowRef of a live record (feature_value.h) and nothing else
// refers to that record; (2) the RowRef's mf bit says which pool holds it: records_ (short) without
// it, mf_records_ (long) with it. A row moves from records_ to mf_records_ when it gets mf.
// Admission keeps no state for rejected keys: the draw of a key pushed by push `push_id` is
// u(seed, key, 3, AdmissionDraw(day_index_, push_id)) (ctr_accessor.h), a function of the push alone,
// so memory holds only admitted rows.

#ifndef PSEMBED_TABLE_SHARD_H_
#define PSEMBED_TABLE_SHARD_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "table/ctr_accessor.h"
#include "table/row_store/chunk_arena.h"
#include "table/row_store/index_arena.h"
#include "table/row_store/feature_value.h"
#include "table/row_store/hash_index.h"
#include "table/row_store/slab_pool.h"
#include "util/hash.h"
#include "util/mutex.h"
#include "util/prefetch.h"

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
  uint64_t inserts = 0;
  uint64_t mf_created = 0;
  uint64_t deleted = 0;
  uint64_t admission_rejected = 0;
  uint64_t capacity_rejected = 0;
};

class Shard {
 public:
  // All three outlive the shard; arena holds the memory of the shard's slab chunks, index_arena that of
  // its index's slot arrays, as owner `index` (index_arena.h). A push inserts no key while the shard holds
  // max_rows rows (loads may go past it).
  Shard(const CtrAccessor* accessor, ChunkArena* arena, IndexArena* index_arena, uint32_t index,
        size_t max_rows = SIZE_MAX);
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  SharedMutex* mu() { return &mu_; }

  // For j in [0, n): copies the row of keys[j] into out + pos[j] * width (width = 1 + dim, or 3 + dim
  // with stats: show, click first). A missing key writes zeros; *misses = how many were missing (the
  // table counts them). A row without mf reads zeros in the mf part. Never inserts. Holds mu_ shared. If
  // wait is false and a writer holds or waits for mu_, returns false at once and writes nothing (nor
  // *misses); otherwise returns true.
  bool Pull(const uint64_t* keys, const uint32_t* pos, size_t n, bool with_stats, float* out, uint64_t* misses,
            bool wait = true) LOCKS_EXCLUDED(mu_);

  // For the table's in-order pull (in_order_pull.h, from SparseTable::TryPullInOrder), which reads many
  // shards key by key. Its caller holds mu() of every shard in shared mode for the whole call and runs
  // the reads on pool threads while it waits (as the bulk load does with the exclusive lock), hence
  // NO_THREAD_SAFETY_ANALYSIS. REQUIRES: mu() held, shared or exclusive, by the call.
  //
  // Hints the cache that the index probe of hash (TableHash of a key) comes soon.
  __attribute__((always_inline)) void PrefetchIndexShared(uint64_t hash) const NO_THREAD_SAFETY_ANALYSIS {
    index_.Prefetch(hash);
  }
  // The record of key (nullptr if absent); *ref = its RowRef (HashIndex::kNotFound if absent).
  const RowHeader* FindRowShared(uint64_t key, uint64_t hash, uint32_t* ref) const NO_THREAD_SAFETY_ANALYSIS {
    *ref = index_.Find(key, hash);
    return *ref == HashIndex::kNotFound ? nullptr : Row(*ref);
  }

  // Applies merged pushes in order (see CtrAccessor::Update and Admit). has_slots: take item.slot.
  // push_id names the push for admission draws (SparseTable::Push). A new key that admission lets in
  // is still not inserted while the shard holds max_rows rows (counted in capacity_rejected).
  void Push(const MergedPush* items, size_t n, bool has_slots, uint64_t push_id) LOCKS_EXCLUDED(mu_);

  // How many rows DecayAndDelete(factor, add_unseen, ...) would delete now; changes nothing. The caller
  // reserves room for their keys with it, so that the pass that changes rows allocates nothing.
  size_t CountDoomed(double factor, uint32_t add_unseen) LOCKS_EXCLUDED(mu_);
  // show, click *= factor; unseen_days += add_unseen (saturating); then deletes rows by the delete
  // predicate, appending their keys to *deleted, at most max_deleted of them (what CountDoomed counted; a row
  // that became deletable since, by a push in between, waits for the next pass). REQUIRES: room in *deleted
  // for max_deleted more keys. Returns the number deleted. Allocates nothing, so it never stops half-way.
  // If new_day_index >= 0 this is a day boundary (end_day): admission draws use day index new_day_index
  // from now on.
  size_t DecayAndDelete(double factor, uint32_t add_unseen, size_t max_deleted, std::vector<uint64_t>* deleted,
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
  // The bulk load (SparseTable::LoadSegments), in three phases. The load holds mu() of every shard for
  // its whole duration, taken by the thread that started it, and runs these on pool threads while that
  // thread waits; each phase works on disjoint shards or disjoint rows. Hence NO_THREAD_SAFETY_ANALYSIS:
  // REQUIRES mu() held by the load for the whole call.
  //
  // Phase 1: io[0, n) holds this shard's keys of the load in input order, has_mf[j] their flags. Grows
  // the index once, then finds or inserts each key (one probe; slots prefetched kAhead keys ahead). An
  // absent key gets a new record, long if has_mf[j]: io[j] = its RowRef; the records are written in
  // phase 2 (WriteNewRow). A key already present (in the table, or
  // earlier in this load) gets io[j] = kLoadExisting and j is appended to *existing: phase 3 overwrites
  // it in input order (LoadExistingRow), so the last row of a key wins. Reserves the records phase 3's
  // moves between the pools take, so that phase 3 cannot fail. On std::bad_alloc returns false with this
  // shard's rows and index as they were before the call (its pools may keep room they reserved).
  static constexpr uint64_t kLoadExisting = ~uint64_t{0};
  // RowHeader::reserved of a row LoadIndexBulk made and phase 2 has not written yet (live rows hold 0).
  static constexpr uint16_t kLoadMark = 0x10ad;
  bool LoadIndexBulk(uint64_t* io, const uint8_t* has_mf, size_t n, std::vector<uint32_t>* existing)
      NO_THREAD_SAFETY_ANALYSIS;
  // Undoes a LoadIndexBulk that succeeded on io[0, n) (another shard's failed): erases the keys it
  // inserted and frees their records; allocates nothing, and overwrites io. O(index capacity).
  void UndoLoadIndexBulk(uint64_t* io, size_t n) NO_THREAD_SAFETY_ANALYSIS;
  // Phase 2: writes the record of a row phase 1 made (io = its io[j]) from export columns: base has
  // base_export_width floats, mf mf_width floats (nullptr when has_mf was 0).
  void WriteNewRow(uint64_t io, const float* base, const float* mf) NO_THREAD_SAFETY_ANALYSIS;
  // Hints the cache that WriteNewRow(io, ...) comes soon (both ends of the record).
  void PrefetchNewRow(uint64_t io) const NO_THREAD_SAFETY_ANALYSIS { PrefetchRecord(static_cast<uint32_t>(io), 1); }
  // Phase 3: overwrites the row of a present key (insert-or-overwrite, as Load). Allocates nothing for a
  // key of the LoadIndexBulk before it (its records reserved there).
  void LoadExistingRow(uint64_t key, const float* base, const float* mf) NO_THREAD_SAFETY_ANALYSIS {
    LoadLocked(key, TableHash(key), base, mf);
  }
  // delta_score -= saved, if key is present.
  void SubtractDelta(uint64_t key, uint64_t hash, float saved) LOCKS_EXCLUDED(mu_);
  void Clear() LOCKS_EXCLUDED(mu_);

  // Counters, keys_with_mf and bytes held. bytes counts capacity, not size.
  void GetStats(ShardCounters* c, size_t* keys, size_t* keys_with_mf, size_t* bytes) LOCKS_EXCLUDED(mu_);

  // fn(key, const RowHeader&, const float* mf_or_null) for every row. REQUIRES: mu() held (shared is enough).
  template <typename Fn>
  void ForEachLocked(Fn&& fn) const SHARED_LOCKS_REQUIRED(mu_) {
    index_.ForEach([&](uint64_t key, uint32_t ref) {
      const RowHeader* h = Row(ref);
      fn(key, *h, MfOf(ref, h));
    });
  }

  // Export access (SparseTable::ExportBuckets). fn(key, RowRef) for every row, in index order,
  // without reading the row. REQUIRES: mu() held (shared is enough).
  template <typename Fn>
  void ForEachRowIdLocked(Fn&& fn) const SHARED_LOCKS_REQUIRED(mu_) {
    index_.ForEach(fn);
  }
  // The record of a RowRef from ForEachRowIdLocked, and its mf part (nullptr without mf).
  // REQUIRES: the shard is not mutated meanwhile (the table's gate held exclusively). No lock is
  // needed beyond that: nothing else writes rows, so any number of threads may read at once.
  const RowHeader* ExportRow(uint32_t ref) const NO_THREAD_SAFETY_ANALYSIS { return Row(ref); }
  const float* ExportMf(uint32_t ref, const RowHeader* h) const NO_THREAD_SAFETY_ANALYSIS { return MfOf(ref, h); }
  // Hints the cache that the record of ref is read (rw = 0) or written (rw = 1) soon: all of it.
  // always_inline: GCC 12 finds a function whose only effect is a prefetch "pure" and deletes calls
  // to it that it has not inlined yet (the record prefetches of Pull and Push vanished that way).
  __attribute__((always_inline)) void PrefetchRecord(uint32_t ref, int rw = 0) const NO_THREAD_SAFETY_ANALYSIS {
    PrefetchRecordAt(Row(ref), RowRef::HasMf(ref), rw);
  }

 private:
  static_assert(SlabPool::kMaxRecords <= RowRef::kMaxRecords, "a pool index must fit a RowRef");

  // PrefetchRecord of the record at h (has_mf: a long one): every line of it (util/prefetch.h).
  __attribute__((always_inline)) void PrefetchRecordAt(const RowHeader* h, bool has_mf, int rw) const {
    if (rw) {
      PrefetchBytes<1>(h, layout_.record_bytes(has_mf));
    } else {
      PrefetchBytes<0>(h, layout_.record_bytes(has_mf));
    }
  }
  // records[j] = the record of refs[j] (nullptr for kNotFound). A pass of its own, between the index
  // probes and the record reads: a record's address needs a load from its pool's chunk directory,
  // which is often out of L1/L2 by then; in this short loop those loads overlap instead of sitting in
  // the update loop's chain to each record prefetch. (On this VM an A/B could not tell it from the
  // noise: docs/benchmarks.md, "Table", session 11.)
  void RecordsOf(const uint32_t* refs, size_t n, RowHeader** records) const SHARED_LOCKS_REQUIRED(mu_);
  RowHeader* Row(uint32_t ref) const SHARED_LOCKS_REQUIRED(mu_) {
    const SlabPool& pool = RowRef::HasMf(ref) ? mf_records_ : records_;
    return reinterpret_cast<RowHeader*>(pool.At(RowRef::Index(ref)));
  }
  const float* MfOf(uint32_t ref, const RowHeader* h) const {
    return RowRef::HasMf(ref) ? layout_.Mf(h) : nullptr;
  }
  // A new record (its bytes unspecified); the caller adds its RowRef to the index. Throws std::bad_alloc.
  uint32_t AllocateRecord(bool has_mf) EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return RowRef::Make(has_mf ? mf_records_.Allocate() : records_.Allocate(), has_mf);
  }
  void FreeRecord(uint32_t ref) EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    (RowRef::HasMf(ref) ? mf_records_ : records_).Free(RowRef::Index(ref));
  }
  // Push's per-key step: admits and inserts a new key (ref == kNotFound), then applies the update.
  // h is the record of ref (nullptr for a new key); draw is the push's admission draw.
  void PushOneLocked(const MergedPush& it, uint32_t ref, RowHeader* h, bool has_slots, uint64_t draw)
      EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves the row of key (at ref) into a record of the other pool: copies the header and lr block,
  // sets the index to the new RowRef and frees the old record. The mf part of a new long record is
  // left unspecified. Returns the new RowRef. Throws std::bad_alloc with nothing changed.
  uint32_t MoveRecordLocked(uint64_t key, uint64_t hash, uint32_t ref) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes the record of ref from export columns (base: base_export_width floats; mf: mf_width floats,
  // REQUIRES: non-null iff ref is a long record): the one place that maps those columns onto a record
  // (checkpoint load, both paths).
  void WriteRecord(uint32_t ref, const float* base, const float* mf) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DeleteRowLocked(uint64_t key, uint64_t hash) EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void LoadLocked(uint64_t key, uint64_t hash, const float* base, const float* mf) EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CtrAccessor* const accessor_;  // not owned; outlives the shard
  const RowLayout& layout_;
  const size_t max_rows_;  // a push inserts no key while index_ holds this many (TableOptions::max_keys)
  SharedMutex mu_;
  HashIndex index_ GUARDED_BY(mu_);     // key -> RowRef
  uint32_t admission_day_ GUARDED_BY(mu_) = 0;  // table day + 1 (0 before the first end_day)
  SlabPool records_ GUARDED_BY(mu_);     // short records: rows without mf
  SlabPool mf_records_ GUARDED_BY(mu_);  // long records: rows with mf
  ShardCounters counters_ GUARDED_BY(mu_);
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_SHARD_H_
