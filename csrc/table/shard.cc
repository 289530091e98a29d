// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/shard.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "util/float_copy.h"
#include "util/hash.h"
#include "util/saturate.h"
#include "util/thread_scratch.h"

namespace psembed {

Shard::Shard(const CtrAccessor* accessor, ChunkArena* arena, IndexArena* index_arena, uint32_t index,
             size_t max_rows)
    : accessor_(accessor),
      layout_(accessor->layout()),
      max_rows_(max_rows),
      index_(index_arena, index),
      records_(accessor->layout().record_bytes(false), arena),
      mf_records_(accessor->layout().record_bytes(true), arena) {}

namespace {
// How far ahead (in keys) each phase prefetches. Each phase walks the shard's keys once, so the
// misses of one phase overlap (memory-level parallelism) instead of chaining index -> record.
constexpr size_t kAhead = 16;
// Keys a push's update phase takes at a time (Shard::Push).
constexpr size_t kUpdateBlock = 256;

// Per-thread scratch for the phases (no per-call allocation once warm): the RowRef of each key and
// the address of its record.
thread_local std::vector<uint32_t> tls_refs;
thread_local std::vector<RowHeader*> tls_records;
thread_local std::vector<uint64_t> tls_hashes;

// Phase 1 of a batch, shared by Pull and Push: refs[j] = the RowRef of the j-th key (kNotFound if
// absent), prefetching index slots kAhead keys ahead. key_at(j)/hash_at(j) give the j-th key and hash.
template <typename KeyAt, typename HashAt>
void FindRows(const HashIndex& index, size_t n, KeyAt key_at, HashAt hash_at, uint32_t* refs) {
  for (size_t j = 0; j < n && j < kAhead; ++j) index.Prefetch(hash_at(j));
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n) index.Prefetch(hash_at(j + kAhead));
    refs[j] = index.Find(key_at(j), hash_at(j));
  }
}
}  // namespace

bool Shard::Pull(const uint64_t* keys, const uint32_t* pos, size_t n, bool with_stats, float* out, uint64_t* misses,
                 bool wait) {
  const size_t width = layout_.pull_width(with_stats);
  ScratchBuffer<uint32_t> refs_buf(&tls_refs, n);
  ScratchBuffer<RowHeader*> records_buf(&tls_records, n);
  uint32_t* refs = refs_buf.data();
  RowHeader** records = records_buf.data();
  // The keys' hashes, before taking the lock (the partition does not pass them on: SparseTable::Partition).
  ScratchBuffer<uint64_t> hashes_buf(&tls_hashes, n);
  uint64_t* hashes = hashes_buf.data();
  for (size_t j = 0; j < n; ++j) hashes[j] = TableHash(keys[j]);
  if (wait) {
    mu_.LockShared();
  } else if (!mu_.TryLockShared()) {
    return false;
  }
  ReaderMutexLock l(&mu_, kAdoptLock);
  // Phase 1: index lookups.
  FindRows(index_, n, [keys](size_t j) { return keys[j]; }, [hashes](size_t j) { return hashes[j]; }, refs);
  RecordsOf(refs, n, records);
  // Phase 2: the records (stats, lr_w, and the mf weights of a long record), prefetched kAhead keys ahead:
  // only the part a pull reads (an Adam record's moments would be a line or more of waste).
  uint64_t missing = 0;
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n && records[j + kAhead] != nullptr) {
      PrefetchBytes(records[j + kAhead], layout_.pulled_bytes(RowRef::HasMf(refs[j + kAhead])));
    }
    missing += records[j] == nullptr ? 1 : 0;
    layout_.WritePullRow(records[j], RowRef::HasMf(refs[j]), with_stats, out + static_cast<size_t>(pos[j]) * width);
  }
  *misses = missing;
  return true;
}

void Shard::Push(const MergedPush* items, size_t n, bool has_slots, uint64_t push_id) {
  const size_t grad_bytes = sizeof(float) * (1 + static_cast<size_t>(layout_.dim()));
  ScratchBuffer<uint32_t> refs_buf(&tls_refs, n);
  ScratchBuffer<RowHeader*> records_buf(&tls_records, n);
  uint32_t* refs = refs_buf.data();
  RowHeader** records = records_buf.data();
  WriterMutexLock l(&mu_);
  const uint64_t draw = AdmissionDraw(admission_day_, push_id);
  // Phase 1: index lookups (items hold distinct keys, so a key missing here is inserted in phase 2
  // and nothing else can insert it in between: we hold the lock).
  FindRows(index_, n, [items](size_t j) { return items[j].key; }, [items](size_t j) { return items[j].hash; }, refs);
  // (A record found here stays where it is until its own key's update below: nothing in between moves
  // or frees another key's record.)
  RecordsOf(refs, n, records);
  // Phase 2: admission/insert and the update, kUpdateBlock keys at a time: first a loop that only loads
  // the header line of each found record, then the update of each key, with the rest of its record and
  // its gradient prefetched kAhead keys ahead.
  //
  // Why the loop of loads: one key's update is long (the accessor, two rules, ~15 stores), so the core's
  // out-of-order window holds only a few keys of it, and record prefetches issued kAhead keys ahead still
  // left the update waiting on its records. A loop of loads alone, a few instructions a key, overlaps
  // the misses of dozens of keys (docs/benchmarks.md, "Table", session 20). A block (16 KiB of dim-8
  // AdaGrad records) stays in L1/L2 until its update.
  for (size_t begin = 0; begin < n; begin += kUpdateBlock) {
    const size_t end = std::min(n, begin + kUpdateBlock);
    for (size_t j = begin; j < end; ++j) {
      if (records[j] != nullptr) TouchWord(records[j]);
    }
    for (size_t j = begin; j < end; ++j) {
      if (j + kAhead < n) {
        const RowHeader* ahead = records[j + kAhead];
        // Its first line is the loop of loads' (a key kAhead on in the next block: that loop's, soon).
        if (ahead != nullptr) PrefetchAfterFirstLine<1>(ahead, layout_.record_bytes(RowRef::HasMf(refs[j + kAhead])));
        PrefetchBytes(items[j + kAhead].grad, grad_bytes);
      }
      PushOneLocked(items[j], refs[j], records[j], has_slots, draw);
    }
  }
}

void Shard::PushOneLocked(const MergedPush& it, uint32_t ref, RowHeader* h, bool has_slots, uint64_t draw) {
  // A new key whose first push reaches the mf threshold (its stats after the update are this push's)
  // gets its mf at once, in a long record, rather than a short one moved straight away.
  bool mf_new = false;
  if (ref == HashIndex::kNotFound) {
    if (!accessor_->Admit(it.key, it.show, it.click, draw)) {
      ++counters_.admission_rejected;
      return;
    }
    if (index_.size() >= max_rows_) {  // full: the key stays out, as a refused one does
      ++counters_.capacity_rejected;
      return;
    }
    mf_new = accessor_->ReachesMfThreshold(it.show, it.click);
    ref = AllocateRecord(mf_new);
    try {
      index_.Insert(it.key, it.hash, ref);
    } catch (...) {
      FreeRecord(ref);
      throw;
    }
    h = Row(ref);
    accessor_->InitRow(h, it.key);
    ++counters_.inserts;
    if (mf_new) {
      accessor_->InitMf(layout_.Mf(h), it.key);
      ++counters_.mf_created;
    }
  }
  // mf created by this push takes no gradient from it (the reference's rule): Update sees no mf.
  float* mf = RowRef::HasMf(ref) && !mf_new ? layout_.Mf(h) : nullptr;
  if (accessor_->Update(h, mf, it.grad, it.show, it.click, has_slots ? &it.slot : nullptr) &&
      !RowRef::HasMf(ref)) {
    ref = MoveRecordLocked(it.key, it.hash, ref);
    accessor_->InitMf(layout_.Mf(Row(ref)), it.key);
    ++counters_.mf_created;
  }
}

void Shard::RecordsOf(const uint32_t* refs, size_t n, RowHeader** records) const {
  for (size_t j = 0; j < n; ++j) records[j] = refs[j] == HashIndex::kNotFound ? nullptr : Row(refs[j]);
}

uint32_t Shard::MoveRecordLocked(uint64_t key, uint64_t hash, uint32_t ref) {
  const uint32_t moved = AllocateRecord(!RowRef::HasMf(ref));
  std::memcpy(Row(moved), Row(ref), layout_.base_bytes());
  index_.Update(key, hash, moved);
  FreeRecord(ref);
  return moved;
}

void Shard::DeleteRowLocked(uint64_t key, uint64_t hash) {
  const uint32_t ref = index_.Erase(key, hash);
  if (ref != HashIndex::kNotFound) FreeRecord(ref);
}

namespace {

void DecayAndAge(const CtrAccessor& accessor, RowHeader* h, double factor, uint32_t add_unseen) {
  accessor.Decay(h, factor);
  const uint32_t u = uint32_t{h->unseen_days} + add_unseen;
  h->unseen_days = static_cast<uint16_t>(u > kMaxUnseenDays ? kMaxUnseenDays : u);
}

}  // namespace

size_t Shard::CountDoomed(double factor, uint32_t add_unseen) {
  ReaderMutexLock l(&mu_);
  size_t doomed = 0;
  index_.ForEach([&](uint64_t, uint32_t row) {
    RowHeader h = *Row(row);  // a copy: nothing changes
    DecayAndAge(*accessor_, &h, factor, add_unseen);
    doomed += accessor_->ShouldDelete(h) ? 1 : 0;
  });
  return doomed;
}

size_t Shard::DecayAndDelete(double factor, uint32_t add_unseen, size_t max_deleted, std::vector<uint64_t>* deleted,
                             int64_t new_day_index) {
  WriterMutexLock l(&mu_);
  const bool boundary = new_day_index >= 0;
  if (boundary) admission_day_ = static_cast<uint32_t>(new_day_index);
  // Two passes: backward-shift deletion moves entries, so deleting while scanning could visit an
  // entry twice (and decay it twice). The keys go straight into *deleted, within its reserved room.
  const size_t first = deleted->size();
  const size_t limit = first + max_deleted;
  index_.ForEach([&](uint64_t key, uint32_t row) {
    RowHeader* h = Row(row);
    DecayAndAge(*accessor_, h, factor, add_unseen);
    if (accessor_->ShouldDelete(*h) && deleted->size() < limit) deleted->push_back(key);
  });
  for (size_t i = first; i < deleted->size(); ++i) DeleteRowLocked((*deleted)[i], TableHash((*deleted)[i]));
  const size_t num = deleted->size() - first;
  counters_.deleted += num;
  return num;
}

void Shard::SetAdmissionDay(uint32_t day_index) {
  WriterMutexLock l(&mu_);
  admission_day_ = day_index;
}

void Shard::NewDay() {
  WriterMutexLock l(&mu_);
  index_.ForEach([&](uint64_t, uint32_t row) {
    RowHeader* h = Row(row);
    if (h->unseen_days < kMaxUnseenDays) ++h->unseen_days;
  });
}

size_t Shard::Size() {
  ReaderMutexLock l(&mu_);
  return index_.size();
}

bool Shard::Contains(uint64_t key, uint64_t hash) {
  ReaderMutexLock l(&mu_);
  return index_.Find(key, hash) != HashIndex::kNotFound;
}

bool Shard::Erase(uint64_t key, uint64_t hash) {
  WriterMutexLock l(&mu_);
  if (index_.Find(key, hash) == HashIndex::kNotFound) return false;
  DeleteRowLocked(key, hash);
  return true;
}

void Shard::Load(uint64_t key, uint64_t hash, const float* base, const float* mf) {
  WriterMutexLock l(&mu_);
  LoadLocked(key, hash, base, mf);
}

bool Shard::LoadIndexBulk(uint64_t* io, const uint8_t* has_mf, size_t n, std::vector<uint32_t>* existing) {
  const size_t existing_before = existing->size();
  size_t done = 0;  // io[0, done) hold results (a row or kLoadExisting); io[done, n) still keys
  // Phase 3 moves a present row whose mf flag differs from its record into the other pool. Each such row
  // of the load counts one record of that pool; phase 1 reserves them, so that phase 3 allocates nothing
  // and the load stays all-or-nothing. (A key whose rows flip back and forth reuses the record it freed;
  // so the count over rows bounds what the pools give out.)
  size_t to_long = 0, to_short = 0;
  try {
    index_.Reserve(index_.size() + n);
    // Hashes of the keys kAhead ahead (their slots are being prefetched), in a ring.
    uint64_t ring[kAhead];
    for (size_t a = 0; a < n && a < kAhead; ++a) {
      ring[a] = TableHash(io[a]);
      index_.Prefetch(ring[a]);
    }
    for (size_t j = 0; j < n; ++j) {
      const uint64_t key = io[j];
      const uint64_t hash = ring[j % kAhead];
      if (j + kAhead < n) {
        const uint64_t ahead = TableHash(io[j + kAhead]);
        ring[j % kAhead] = ahead;
        index_.Prefetch(ahead);
      }
      uint32_t ref = 0;
      const uint32_t found = index_.FindOrInsert(key, hash, [&] {
        ref = AllocateRecord(has_mf[j] != 0);
        Row(ref)->reserved = kLoadMark;  // until phase 2 writes the row (see UndoLoadIndexBulk)
        return ref;
      });
      if (found != HashIndex::kNotFound) {
        existing->push_back(static_cast<uint32_t>(j));  // may throw: io[j] is still the key then
        io[j] = kLoadExisting;
        done = j + 1;
        if (RowRef::HasMf(found) != (has_mf[j] != 0)) ++(has_mf[j] != 0 ? to_long : to_short);
        continue;
      }
      io[j] = ref;  // from here on the undo covers this row
      done = j + 1;
    }
    mf_records_.Reserve(to_long);
    records_.Reserve(to_short);
  } catch (const std::bad_alloc&) {
    // Undo what this call did: the keys it inserted and their records.
    UndoLoadIndexBulk(io, done);
    existing->resize(existing_before);
    return false;
  }
  return true;
}

void Shard::UndoLoadIndexBulk(uint64_t* io, size_t n) {
  // The keys are gone from io (it holds RowRefs now), and this runs after a std::bad_alloc, so it may not
  // allocate: the rows the load inserted are the ones whose header still carries kLoadMark (every other
  // live row has 0 there), found by one pass over the index. Their keys, at most n, go into io.
  size_t found = 0;
  index_.ForEach([&](uint64_t key, uint32_t ref) {
    if (Row(ref)->reserved == kLoadMark && found < n) io[found++] = key;
  });
  for (size_t i = 0; i < found; ++i) FreeRecord(index_.Erase(io[i], TableHash(io[i])));
}

void Shard::WriteNewRow(uint64_t io, const float* base, const float* mf) {
  WriteRecord(static_cast<uint32_t>(io), base, mf);
}

void Shard::WriteRecord(uint32_t ref, const float* base, const float* mf) {
  RowHeader* h = Row(ref);
  h->show = base[0];
  h->click = base[1];
  h->delta_score = base[2];
  // Checked loads pass whole numbers in range; an unchecked one (load_segments(check=False)) may not, and a
  // float-to-int conversion out of range is undefined: clamp first (NaN reads 0).
  auto clamp = [](float v, float lo, float hi) { return std::isnan(v) ? 0.0f : std::min(std::max(v, lo), hi); };
  h->unseen_days = static_cast<uint16_t>(clamp(base[3], 0.0f, static_cast<float>(kMaxUnseenDays)));
  h->slot = static_cast<int32_t>(clamp(base[4], -2147483648.0f, 2147483520.0f));  // the floats in int32's range
  h->reserved = 0;
  CopyFloats(RowLayout::Lr(h), base + 5, layout_.lr_width());
  if (RowRef::HasMf(ref)) CopyFloats(layout_.Mf(h), mf, layout_.mf_width());
}

void Shard::LoadLocked(uint64_t key, uint64_t hash, const float* base, const float* mf) {
  uint32_t ref = index_.Find(key, hash);
  if (ref == HashIndex::kNotFound) {
    ref = AllocateRecord(mf != nullptr);
    try {
      index_.Insert(key, hash, ref);
    } catch (...) {
      FreeRecord(ref);
      throw;
    }
  } else if (RowRef::HasMf(ref) != (mf != nullptr)) {
    ref = MoveRecordLocked(key, hash, ref);  // gains or loses its mf part
  }
  WriteRecord(ref, base, mf);
}

void Shard::SubtractDelta(uint64_t key, uint64_t hash, float saved) {
  WriterMutexLock l(&mu_);
  const uint32_t ref = index_.Find(key, hash);
  if (ref == HashIndex::kNotFound) return;
  RowHeader* h = Row(ref);
  h->delta_score = SaturateToFloat(double{h->delta_score} - saved);
}

void Shard::Clear() {
  WriterMutexLock l(&mu_);
  index_.Clear();
  // admission_day_ stays: Clear() keeps the table's day
  records_.Clear();
  mf_records_.Clear();
}

void Shard::GetStats(ShardCounters* c, size_t* keys, size_t* keys_with_mf, size_t* bytes) {
  ReaderMutexLock l(&mu_);
  c->inserts += counters_.inserts;
  c->mf_created += counters_.mf_created;
  c->deleted += counters_.deleted;
  c->admission_rejected += counters_.admission_rejected;
  c->capacity_rejected += counters_.capacity_rejected;
  *keys += index_.size();
  *keys_with_mf += mf_records_.live();
  *bytes += index_.bytes() + records_.bytes() + mf_records_.bytes() + sizeof(Shard);
}

}  // namespace psembed
