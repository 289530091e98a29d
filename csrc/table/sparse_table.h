// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// SparseTable: N shards, key partitioning, parallel pull/push and the table-wide lifecycle
// (shrink, new_day, end_day, export/commit_save, load). This is the contract _C exposes
// (docs/architecture.md, "The _C module").
//
// Thread safety: every method may be called from many threads at once. Each shard has a reader/writer
// lock. A pull that can take every shard's lock in shared mode at once without waiting reads its keys
// in input order, on the pool in chunks for a large call (in_order_pull.h); else (a writer holds or
// waits for some shard) it goes by shard, as a push does. Push (and a contended pull) bucket the keys by
// shard (a stable counting sort on TableHash) and run one task per non-empty shard on the pool (calls
// under 4096 keys run every task on the calling thread); each task holds only its shard's lock
// (exclusively for a push, shared for a pull), so a pull racing a push sees each row wholly before or
// wholly after it. Every mutating call (push, shrink, new_day, end_day, commit_save, load_rows,
// set_tombstones, erase, clear) also holds gate_ in shared mode for its whole duration, and export
// holds gate_ exclusively while it copies (the shards in parallel, each under its own lock in shared
// mode, so pulls go on, then the tombstone list), so an export is one moment of the whole table: a concurrent push lands wholly
// before or wholly after it even though the push spans many shards. Pulls do not take gate_ (they
// change no row). Lock order: day_mu_ -> gate_ -> delete_mu_ -> one shard lock at a time -> tomb_mu_; two
// exceptions hold every shard's lock at once, taken in index order: LoadRowSegments exclusively (so that
// a pull never sees a row it has inserted but not yet written), and the in-order pull in shared mode,
// which only ever tries them (a busy one makes it let go of all), so neither can deadlock.
//
// Row semantics: see CtrAccessor.

#ifndef PSEMBED_TABLE_SPARSE_TABLE_H_
#define PSEMBED_TABLE_SPARSE_TABLE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "table/accessor_options.h"
#include "table/ctr_accessor.h"
#include "table/export_buffer.h"
#include "table/row_store/chunk_arena.h"
#include "table/row_store/index_arena.h"
#include "table/shard.h"
#include "util/mutex.h"
#include "util/status.h"
#include "util/thread_pool.h"

namespace psembed {

// Do not renumber (Python passes names; C++ tests use these).
enum class ExportMode { kCheckpoint = 0, kBase = 1, kDelta = 2, kServing = 3 };

struct TableStats {
  size_t keys = 0;
  size_t keys_with_mf = 0;
  size_t bytes = 0;
  uint64_t pull_misses = 0;
  uint64_t inserts = 0;
  uint64_t mf_created = 0;
  uint64_t deleted = 0;             // rows deleted by shrink/end_day (erase/clear do not count)
  uint64_t rejected = 0;            // pushed rows skipped for NaN/Inf gradients (nan_policy="skip")
  uint64_t admission_rejected = 0;  // pushes of unknown keys refused by probabilistic admission
  uint64_t capacity_rejected = 0;   // pushes of unknown keys admitted but not inserted: shard full (max_keys)
};

// export(): rows sorted by key (as uint64; sorted after the gate is released); mf holds rows with
// has_mf == 1, in order.
struct ExportResult {
  std::vector<uint64_t> keys;
  std::vector<float> base;  // keys.size() x base_export_width
  std::vector<uint8_t> has_mf;
  std::vector<float> mf;    // (#has_mf) x mf_width
  std::vector<uint64_t> tombstones;
  size_t pending_tombstones = 0;  // length of the whole pending list at the snapshot
};

// ExportBuckets(): the rows of one moment grouped by checkpoint bucket, ready to be written file by
// file without any reordering. Bucket of a key: Mix64(key ^ salt) % buckets. Bucket b holds rows
// [row_begin[b], row_begin[b + 1]) of keys/base/has_mf, ascending by key (as uint64); its mf rows
// (one per has_mf == 1 row, in order) are rows [row_begin[b], row_begin[b] + mf_rows[b]) of mf, which
// has room for one mf row per row (the rest of each bucket's range is unused, never written).
struct BucketExport {
  size_t rows = 0;               // total rows
  ExportBuffer keys;             // uint64[rows]
  ExportBuffer base;             // float[rows x base_export_width]
  ExportBuffer has_mf;           // uint8[rows]
  ExportBuffer mf;               // float[rows x mf_width], see above
  std::vector<uint64_t> row_begin;  // buckets + 1 entries
  std::vector<uint64_t> mf_rows;    // buckets entries
  std::vector<uint64_t> tombstones;  // checkpoint/delta: the whole pending list, in order
  size_t pending_tombstones = 0;
};

// One block of rows for LoadRowSegments, in the layout LoadRows takes: keys[n], base[n x
// base_export_width], has_mf[n], mf[mf_rows x mf_width] (the has_mf == 1 rows, in order).
struct RowSegment {
  const uint64_t* keys = nullptr;
  size_t n = 0;
  const float* base = nullptr;
  const uint8_t* has_mf = nullptr;
  const float* mf = nullptr;
  size_t mf_rows = 0;
};

// SaveBuckets(): one written file (column: 0 keys, 1 base, 2 has_mf, 3 mf).
struct SavedFile {
  uint32_t bucket = 0;
  uint32_t column = 0;
  uint64_t rows = 0;
  uint64_t bytes = 0;
  uint32_t crc32 = 0;  // zlib's crc32 of the whole file
};

struct BucketSave {
  std::vector<SavedFile> files;      // 4 per bucket with rows, by bucket then column
  uint64_t rows = 0;
  uint64_t mf_rows = 0;
  std::vector<uint64_t> tombstones;  // as in BucketExport
  size_t pending_tombstones = 0;
};

class SparseTable {
 public:
  // REQUIRES: options validated (bindings/ does it).
  explicit SparseTable(const TableOptions& options);
  ~SparseTable();
  SparseTable(const SparseTable&) = delete;
  SparseTable& operator=(const SparseTable&) = delete;

  const TableOptions& options() const { return accessor_.options(); }
  const RowLayout& layout() const { return accessor_.layout(); }
  int pull_width(bool with_stats) const { return static_cast<int>(layout().pull_width(with_stats)); }

  // The most keys one Pull or Push takes: a push's merge numbers a call's keys with int32 (push_merge.h),
  // and the key partitions count them in 32 bits. The bindings and the data plane refuse more.
  static constexpr uint64_t kMaxKeysPerCall = (uint64_t{1} << 31) - 1;

  // out: n x pull_width(with_stats) floats. Missing keys read zeros. Never inserts.
  // REQUIRES: n <= kMaxKeysPerCall.
  void Pull(const uint64_t* keys, size_t n, bool with_stats, float* out);

  // grads: n x (1 + dim); slots may be nullptr (slots unchanged); skip (may be nullptr) marks rows to
  // ignore (NaN/Inf under nan_policy="skip"), counted in stats().rejected. Duplicate keys are merged
  // (sums in input order; last slot wins) before the rule runs. push_id names the push for admission
  // draws (AdmissionDraw in ctr_accessor.h); kOwnPushId takes the next of this table's own count (one
  // per push with n > 0), which is what a local table does; a sharded table's trainer passes its own.
  // REQUIRES: n <= kMaxKeysPerCall.
  static constexpr uint64_t kOwnPushId = ~uint64_t{0};
  void Push(const uint64_t* keys, size_t n, const float* grads, const float* shows, const float* clicks,
            const int32_t* slots, const uint8_t* skip, uint64_t push_id = kOwnPushId);

  // Decay once, then delete by the predicates. Returns rows deleted (their keys become tombstones while
  // track_tombstones() is on).
  size_t Shrink();
  void NewDay();
  // Closes day `day` (>= 0): elapsed = day - this->day() (1 when no day yet); 0 is a no-op,
  // negative is InvalidArgument. Decays by rate^elapsed, unseen_days += elapsed, deletes.
  Status EndDay(int64_t day, size_t* deleted);
  int64_t day();
  void set_day(int64_t day);

  // Threads one call may use, in [1, the pool size fixed at construction]. Benchmarks use it to
  // compare 1 thread with all threads on one table.
  int num_threads() const { return parallelism_.load(std::memory_order_relaxed); }
  void set_num_threads(int n);

  // The passes over a call's inputs (the key partition here, the binding's value checks) run on the
  // pool too. Chunks(n): how many ranges to cut [0, n) into: one with one thread; else four per thread
  // at most, and none shorter than the size at which a call goes parallel (a small call is one chunk).
  // ForEachChunk(n, chunks, fn) runs fn(chunk, begin, end) for each of `chunks` ranges, in order of
  // position, on the pool when there are several (threads take them as they come), and returns when all
  // returned. (The count is the caller's: num_threads() may change between two calls, and per-chunk
  // arrays are sized by it.) last: no other loop of the same call follows it (else the workers poll for
  // one: ThreadPool::ParallelFor's more_loops_follow).
  size_t Chunks(size_t n) const;
  void ForEachChunk(size_t n, size_t chunks, const std::function<void(size_t chunk, size_t begin, size_t end)>& fn,
                    bool last = false) const;

  TableStats Stats();
  size_t Size();
  bool Contains(uint64_t key);

  // buckets >= 1; bucket in [-1, buckets): -1 = all rows, else only keys with
  // Mix64(key) % buckets == bucket (rows and tombstones). No side effects.
  void Export(ExportMode mode, uint32_t buckets, int64_t bucket, ExportResult* out);
  // The rows Export(mode) would return, of one moment, grouped by bucket (see BucketExport):
  // the save path. Copies straight from the shards into the final layout, in parallel: no
  // intermediate copy, no global sort. buckets >= 1. No side effects.
  void ExportBuckets(ExportMode mode, uint32_t buckets, uint64_t salt, BucketExport* out);
  // ExportBuckets written straight to files, bucket by bucket, while mutating calls wait: the rows of
  // bucket b go to paths[4 * b + c] for the columns c = keys, base, has_mf, mf (the layout of
  // docs/format.md; buckets without rows get no files), each copied into a buffer that is reused for
  // the next bucket and checksummed. With sync, each file is fsynced on a background thread as soon as
  // it is written (util/file_syncer.h), and SaveBuckets returns once all are durable; without it, the
  // caller syncs. The only fresh memory is 16 bytes per row of sort entries and one bucket per thread.
  // A failed write or fsync is IOError naming the file (files already written stay; the caller removes
  // the directory).
  Status SaveBuckets(ExportMode mode, uint32_t buckets, uint64_t salt, const std::vector<std::string>& paths,
                     bool sync, BucketSave* out);
  // base/delta: delta_score -= saved for each present key; drops the first `tombstones` pending
  // tombstones, which must be the count the snapshot saw (its pending_tombstones), for a base too: the
  // keys deleted since the snapshot were not in it and must reach the next delta. A key deleted since
  // the snapshot (listed after those) gets no subtraction: its row, if any, was made anew after the
  // snapshot, and its delta_score is its own. Turns tombstone tracking on. checkpoint/serving: no effect.
  // REQUIRES: no other CommitSave, SetTombstones, ForgetTombstones or Clear between the snapshot and this
  // commit (the count would then name other tombstones); the Python layer runs one save or load of a table
  // at a time (checkpoint/_table_io.py).
  void CommitSave(ExportMode mode, const uint64_t* keys, const float* delta_scores, size_t n, size_t tombstones);
  // Insert/overwrite rows. base: n x base_export_width; has_mf: n; mf: (#has_mf) x mf_width.
  // REQUIRES: values valid (as LoadRowSegments checks them; bindings/ does it).
  void LoadRows(const uint64_t* keys, size_t n, const float* base, const uint8_t* has_mf, const float* mf);
  // LoadRows of many blocks at once (the load path; a key in several blocks: the last one wins).
  // First (if check) checks every value, in parallel: finite floats, show/click >= 0, unseen_days an
  // integer in [0, 65535], slot an int32, has_mf 0/1 with mf_rows ones. A bad value is InvalidArgument
  // naming the segment and row, and nothing changes. check = false is for rows CheckRowSegments passed
  // already (a checkpoint load checks while it verifies the files, before it clears the table); only
  // the has_mf count is checked then. The load itself, with every shard lock held throughout (a
  // concurrent pull sees a row wholly loaded or not at all): the keys and flags are scattered into shard
  // order (9 bytes of scratch per row); phase 1, per shard, finds or inserts every key in its index
  // (grown once), allocating the new rows' records and reserving those that phase 3 moves rows into;
  // phase 2, per block of input, walks the input in order and writes each new row into its shard's
  // records (sequential reads; writes sequential per shard); phase 3, per shard, overwrites the rows of
  // keys that were present, in input order. Only the scatter and phase 1 allocate: a std::bad_alloc
  // leaves every row and key as before the call (a shard's pools may keep room they reserved).
  // REQUIRES: segs[i].n < 2^32.
  Status LoadRowSegments(const RowSegment* segs, size_t num_segs, bool check = true);
  // The checks of LoadRowSegments alone (in parallel; changes nothing).
  Status CheckRowSegments(const RowSegment* segs, size_t num_segs);
  // Replaces the pending tombstone list with keys[0..n), in order (restores a checkpoint's list).
  void SetTombstones(const uint64_t* keys, size_t n);
  // Removes keys[0..n) from the pending tombstone list (keeping the others' order): a delta loaded into
  // this table already published them (a table restored from a checkpoint, then given the deltas written
  // after it, listed them again in its own next delta).
  void ForgetTombstones(const uint64_t* keys, size_t n);
  // Whether deletions append their keys to the pending tombstone list. A tombstone only matters to a
  // serving view built from this table's base/delta saves, so the Python layer turns this off for a
  // table whose save chain has no base or delta yet (a job that only checkpoints would otherwise grow
  // the list by 8 bytes per deleted key forever), and CommitSave of a base or delta turns it on.
  // Default: on (a bare table lists every deletion).
  void SetTrackTombstones(bool on);
  bool track_tombstones();
  // Deletes present keys (no tombstones). Returns how many existed.
  size_t Erase(const uint64_t* keys, size_t n);
  void Clear();

  // Tests only: shard s's lock, so that a test can hold it against a pull (sparse_table_test.cc).
  SharedMutex* ShardLockForTest(size_t s) { return shards_[s]->mu(); }

 private:
  struct Partition;
  // Pull's fast path: if it can take every shard's lock in shared mode at once without waiting, pulls in
  // input order (in_order_pull.h) and returns true; else takes nothing, writes nothing, returns false.
  bool TryPullInOrder(const uint64_t* keys, size_t n, bool with_stats, float* out);
  // Buckets keys[0..n) by shard, stable, skipping rows marked in skip; on the pool, in chunks, for large n.
  void PartitionKeys(const uint64_t* keys, size_t n, const uint8_t* skip, Partition* p) const;
  // Decay by factor, unseen += add_unseen, delete; appends tombstones. Returns deleted.
  size_t DecayAndDeleteAll(double factor, uint32_t add_unseen, int64_t new_day_index = -1);
  // fn(s) for every shard s: on the pool for a call of num_keys >= 4,096 keys, else on the calling thread;
  // either way every shard runs and the first exception is rethrown afterwards (ThreadPool::ParallelFor).
  void RunShards(size_t num_keys, const std::function<void(size_t)>& fn);
  Status LoadSegments(const RowSegment* segs, size_t num_segs, bool check, bool load);
  // Where the rows of one bucket go, and what happens to them once copied (both under the gate).
  struct BucketRows {
    uint64_t* keys;
    float* base;
    uint8_t* has_mf;
    float* mf;
  };
  using BucketPlace = std::function<BucketRows(size_t bucket, uint64_t first_row, uint64_t rows)>;
  using BucketDone = std::function<void(size_t bucket, const BucketRows& rows_at, uint64_t rows, uint64_t mf_rows)>;
  // The one-moment bucketed copy behind ExportBuckets and SaveBuckets: row_begin gets the bucket
  // bounds; for every bucket (in parallel), place() gives the destination of its rows (sorted by key),
  // then done() runs.
  void ExportBucketsWith(ExportMode mode, uint32_t buckets, uint64_t salt, std::vector<uint64_t>* row_begin,
                         const BucketPlace& place, const BucketDone& done, std::vector<uint64_t>* tombstones,
                         size_t* pending);

  CtrAccessor accessor_;  // immutable after construction
  ChunkArena arena_;        // the shards' slab memory; declared before shards_ so it outlives them
  IndexArena index_arena_;  // the shards' index slot arrays; the same
  std::vector<std::unique_ptr<Shard>> shards_;  // immutable vector; each shard locks itself
  std::unique_ptr<ThreadPool> pool_;

  SharedMutex gate_;  // shared: mutating calls; exclusive: export (see the thread-safety note)

  Mutex day_mu_;
  int64_t day_ GUARDED_BY(day_mu_) = -1;

  // Held by a deletion pass from its first deleted row until its keys are on the tombstone list, and by
  // CommitSave throughout: so CommitSave sees every key deleted since the snapshot on the list, never a
  // row deleted and made anew whose tombstone is not listed yet.
  Mutex delete_mu_;

  Mutex tomb_mu_;
  std::vector<uint64_t> tombstones_ GUARDED_BY(tomb_mu_);  // pending, in deletion order
  bool track_tombstones_ GUARDED_BY(tomb_mu_) = true;     // see SetTrackTombstones

  // Relaxed: statistics, read without ordering against rows. Pulls add their misses once per call or
  // shard task (stats()'s pull_misses).
  std::atomic<uint64_t> rejected_{0};
  std::atomic<uint64_t> pull_misses_{0};
  std::atomic<uint64_t> own_pushes_{0};  // pushes with n > 0 and kOwnPushId so far: the next own push id
  // Relaxed: a tuning knob; a call reads it once.
  std::atomic<int> parallelism_{1};
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_SPARSE_TABLE_H_
