// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/shard.h"

#include <cmath>
#include <cstring>
#include <new>

#include "util/hash.h"

namespace psembed {

Shard::Shard(const CtrAccessor* accessor, ChunkArena* arena)
    : accessor_(accessor),
      layout_(accessor->layout()),
      base_(accessor->layout().base_bytes(), arena),
      mf_(accessor->layout().mf_bytes(), arena) {}

namespace {
// How far ahead (in keys) each phase prefetches. Each phase walks the shard's keys once, so the
// misses of one phase overlap (memory-level parallelism) instead of chaining index -> row -> mf.
constexpr size_t kAhead = 16;

// Per-thread scratch for the phases (no per-call allocation once warm).
struct PhaseScratch {
  std::vector<uint32_t> rows;
  std::vector<uint32_t> mfs;
};
PhaseScratch& Scratch() {
  thread_local PhaseScratch s;
  return s;
}

// Phase 1 of a batch, shared by Pull and Push: rows[j] = the row of the j-th key (kNotFound if
// absent), prefetching index slots kAhead keys ahead. key_at(j)/hash_at(j) give the j-th key and hash.
template <typename KeyAt, typename HashAt>
void FindRows(const HashIndex& index, size_t n, KeyAt key_at, HashAt hash_at, uint32_t* rows) {
  for (size_t j = 0; j < n && j < kAhead; ++j) index.Prefetch(hash_at(j));
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n) index.Prefetch(hash_at(j + kAhead));
    rows[j] = index.Find(key_at(j), hash_at(j));
  }
}
}  // namespace

bool Shard::Pull(const uint64_t* keys, const uint64_t* hashes, const uint32_t* pos, size_t n, bool with_stats,
                 float* out, bool wait) {
  const int dim = layout_.dim();
  const size_t width = (with_stats ? 3 : 1) + dim;
  PhaseScratch& sc = Scratch();
  sc.rows.resize(n);
  sc.mfs.resize(n);
  uint32_t* rows = sc.rows.data();
  uint32_t* mfs = sc.mfs.data();
  if (wait) {
    mu_.Lock();
  } else if (!mu_.TryLock()) {
    return false;
  }
  MutexLock l(&mu_, kAdoptLock);
  // Phase 1: index lookups.
  FindRows(index_, n, [keys](size_t j) { return keys[j]; }, [hashes](size_t j) { return hashes[j]; }, rows);
  // Phase 2: base records -> show, click, lr_w; remember the mf block.
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n && rows[j + kAhead] != HashIndex::kNotFound) __builtin_prefetch(base_.At(rows[j + kAhead]));
    float* o = out + static_cast<size_t>(pos[j]) * width;
    if (rows[j] == HashIndex::kNotFound) {
      std::memset(o, 0, width * sizeof(float));
      mfs[j] = kNoMf;
      ++counters_.pull_misses;
      continue;
    }
    const RowHeader* h = Row(rows[j]);
    if (with_stats) {
      o[0] = h->show;
      o[1] = h->click;
      o += 2;
    }
    o[0] = RowLayout::Lr(h)[0];
    mfs[j] = h->mf_index;
    if (h->mf_index == kNoMf) std::memset(o + 1, 0, dim * sizeof(float));
  }
  // Phase 3: mf blocks.
  const size_t mf_off = width - dim;
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n && mfs[j + kAhead] != kNoMf) {
      const char* p = mf_.At(mfs[j + kAhead]);
      __builtin_prefetch(p);
      __builtin_prefetch(p + layout_.mf_bytes() - 1);  // a block may straddle two cache lines
    }
    if (mfs[j] == kNoMf) continue;
    float* o = out + static_cast<size_t>(pos[j]) * width + mf_off;
    const float* src = Mf(mfs[j]);
    for (int d = 0; d < dim; ++d) o[d] = src[d];  // short: a loop beats a memcpy call
  }
  return true;
}

void Shard::Push(const MergedPush* items, size_t n, bool has_slots, uint64_t push_id) {
  const size_t grad_bytes = sizeof(float) * (1 + static_cast<size_t>(layout_.dim()));
  PhaseScratch& sc = Scratch();
  sc.rows.resize(n);
  sc.mfs.resize(n);
  uint32_t* rows = sc.rows.data();
  uint32_t* mfs = sc.mfs.data();
  MutexLock l(&mu_);
  const uint64_t draw = AdmissionDraw(admission_day_, push_id);
  // Phase 1: index lookups (items hold distinct keys, so a key missing here is inserted in phase 3
  // and nothing else can insert it in between: we hold the lock).
  FindRows(index_, n, [items](size_t j) { return items[j].key; }, [items](size_t j) { return items[j].hash; }, rows);
  // Phase 2: the mf block of each existing row, prefetching base records ahead.
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n && rows[j + kAhead] != HashIndex::kNotFound) __builtin_prefetch(base_.At(rows[j + kAhead]));
    mfs[j] = rows[j] == HashIndex::kNotFound ? kNoMf : Row(rows[j])->mf_index;
  }
  // Phase 3: admission/insert and the update, prefetching mf blocks and base records ahead.
  for (size_t j = 0; j < n; ++j) {
    if (j + kAhead < n) {
      if (mfs[j + kAhead] != kNoMf) {
        const char* m = mf_.At(mfs[j + kAhead]);
        __builtin_prefetch(m, 1);
        __builtin_prefetch(m + layout_.mf_bytes() - 1, 1);  // the rule's state is at the block's end
      }
      if (rows[j + kAhead] != HashIndex::kNotFound) __builtin_prefetch(base_.At(rows[j + kAhead]), 1);
      const char* g = reinterpret_cast<const char*>(items[j + kAhead].grad);
      __builtin_prefetch(g);
      __builtin_prefetch(g + grad_bytes - 1);
    }
    const MergedPush& it = items[j];
    uint32_t row = rows[j];
    if (row == HashIndex::kNotFound) {
      if (!accessor_->Admit(it.key, it.show, it.click, draw)) {
        ++counters_.admission_rejected;
        continue;
      }
      row = base_.Allocate();
      try {
        index_.Insert(it.key, it.hash, row);
      } catch (...) {
        base_.Free(row);
        throw;
      }
      accessor_->InitRow(Row(row), it.key);
      ++counters_.inserts;
    }
    RowHeader* h = Row(row);
    float* mf = h->mf_index == kNoMf ? nullptr : Mf(h->mf_index);
    if (accessor_->Update(h, mf, it.grad, it.show, it.click, has_slots ? &it.slot : nullptr)) {
      const uint32_t idx = mf_.Allocate();
      h->mf_index = idx;
      accessor_->InitMf(Mf(idx), it.key);
      ++counters_.mf_created;
    }
  }
}

void Shard::DeleteRowLocked(uint64_t key, uint64_t hash) {
  const uint32_t row = index_.Erase(key, hash);
  if (row == HashIndex::kNotFound) return;
  RowHeader* h = Row(row);
  if (h->mf_index != kNoMf) mf_.Free(h->mf_index);
  base_.Free(row);
}

size_t Shard::DecayAndDelete(double factor, uint32_t add_unseen, std::vector<uint64_t>* deleted,
                             int64_t new_day_index) {
  MutexLock l(&mu_);
  const bool boundary = new_day_index >= 0;
  if (boundary) admission_day_ = static_cast<uint32_t>(new_day_index);
  // Two passes: backward-shift deletion moves entries, so deleting while scanning could visit an
  // entry twice (and decay it twice).
  std::vector<uint64_t> doomed;
  index_.ForEach([&](uint64_t key, uint32_t row) {
    RowHeader* h = Row(row);
    accessor_->Decay(h, factor);
    const uint32_t u = uint32_t{h->unseen_days} + add_unseen;
    h->unseen_days = static_cast<uint16_t>(u > kMaxUnseenDays ? kMaxUnseenDays : u);
    if (accessor_->ShouldDelete(*h)) doomed.push_back(key);
  });
  for (uint64_t key : doomed) DeleteRowLocked(key, TableHash(key));
  counters_.deleted += doomed.size();
  deleted->insert(deleted->end(), doomed.begin(), doomed.end());
  return doomed.size();
}

void Shard::SetAdmissionDay(uint32_t day_index) {
  MutexLock l(&mu_);
  admission_day_ = day_index;
}

void Shard::NewDay() {
  MutexLock l(&mu_);
  index_.ForEach([&](uint64_t, uint32_t row) {
    RowHeader* h = Row(row);
    if (h->unseen_days < kMaxUnseenDays) ++h->unseen_days;
  });
}

size_t Shard::Size() {
  MutexLock l(&mu_);
  return index_.size();
}

bool Shard::Contains(uint64_t key, uint64_t hash) {
  MutexLock l(&mu_);
  return index_.Find(key, hash) != HashIndex::kNotFound;
}

bool Shard::Erase(uint64_t key, uint64_t hash) {
  MutexLock l(&mu_);
  if (index_.Find(key, hash) == HashIndex::kNotFound) return false;
  DeleteRowLocked(key, hash);
  return true;
}

void Shard::Load(uint64_t key, uint64_t hash, const float* base, const float* mf) {
  MutexLock l(&mu_);
  LoadLocked(key, hash, base, mf);
}

bool Shard::LoadIndexBulk(uint64_t* io, const uint8_t* has_mf, size_t n, std::vector<uint32_t>* existing) {
  const size_t existing_before = existing->size();
  size_t done = 0;  // io[0, done) hold results (a row or kLoadExisting); io[done, n) still keys
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
      uint32_t row = 0, mf = kNoMf;
      const uint32_t found = index_.FindOrInsert(key, hash, [&] {
        row = base_.Allocate();
        if (has_mf[j]) {
          try {
            mf = mf_.Allocate();
          } catch (...) {
            base_.Free(row);
            throw;
          }
        }
        return row;
      });
      if (found != HashIndex::kNotFound) {
        existing->push_back(static_cast<uint32_t>(j));  // may throw: io[j] is still the key then
        io[j] = kLoadExisting;
        done = j + 1;
        continue;
      }
      io[j] = row | (uint64_t{mf} << 32);  // from here on the undo covers this row
      done = j + 1;
    }
  } catch (const std::bad_alloc&) {
    // Undo what this call did: the keys it inserted and their records.
    UndoLoadIndexBulk(io, done);
    existing->resize(existing_before);
    return false;
  }
  return true;
}

void Shard::UndoLoadIndexBulk(const uint64_t* io, size_t n) {
  // The keys are gone from io (it holds row ids now): find them through the index, by row id.
  std::vector<uint8_t> made;
  for (size_t j = 0; j < n; ++j) {
    if (io[j] == kLoadExisting) continue;
    const uint32_t row = static_cast<uint32_t>(io[j]);
    if (row >= made.size()) made.resize(size_t{row} + 1, 0);
    made[row] = 1;
  }
  std::vector<uint64_t> keys;
  index_.ForEach([&](uint64_t key, uint32_t row) {
    if (row < made.size() && made[row]) keys.push_back(key);
  });
  for (uint64_t key : keys) index_.Erase(key, TableHash(key));
  for (size_t j = 0; j < n; ++j) {
    if (io[j] == kLoadExisting) continue;
    const uint32_t mf = static_cast<uint32_t>(io[j] >> 32);
    if (mf != kNoMf) mf_.Free(mf);
    base_.Free(static_cast<uint32_t>(io[j]));
  }
}

void Shard::WriteNewRow(uint64_t io, const float* base, const float* mf) {
  const uint32_t m = static_cast<uint32_t>(io >> 32);
  RowHeader* h = Row(static_cast<uint32_t>(io));
  h->show = base[0];
  h->click = base[1];
  h->delta_score = base[2];
  h->slot = static_cast<int32_t>(base[4]);
  h->unseen_days = static_cast<uint16_t>(base[3]);
  h->reserved = 0;
  h->mf_index = m;
  // Short rows: plain loops (a memcpy call of a run-time size costs more than the copy).
  float* lr = RowLayout::Lr(h);
  const int lw = layout_.lr_width();
  for (int k = 0; k < lw; ++k) lr[k] = base[5 + k];
  if (m != kNoMf) {
    float* d = Mf(m);
    const int mw = layout_.mf_width();
    for (int k = 0; k < mw; ++k) d[k] = mf[k];
  }
}

void Shard::LoadLocked(uint64_t key, uint64_t hash, const float* base, const float* mf) {
  uint32_t row = index_.Find(key, hash);
  if (row == HashIndex::kNotFound) {
    row = base_.Allocate();
    try {
      index_.Insert(key, hash, row);
    } catch (...) {
      base_.Free(row);
      throw;
    }
    Row(row)->mf_index = kNoMf;
    Row(row)->reserved = 0;
  }
  RowHeader* h = Row(row);
  h->show = base[0];
  h->click = base[1];
  h->delta_score = base[2];
  h->unseen_days = static_cast<uint16_t>(base[3]);
  h->slot = static_cast<int32_t>(base[4]);
  std::memcpy(RowLayout::Lr(h), base + 5, layout_.lr_width() * sizeof(float));
  if (mf == nullptr) {
    if (h->mf_index != kNoMf) {
      mf_.Free(h->mf_index);
      h->mf_index = kNoMf;
    }
  } else {
    if (h->mf_index == kNoMf) {
      const uint32_t idx = mf_.Allocate();
      h = Row(row);
      h->mf_index = idx;
    }
    std::memcpy(Mf(h->mf_index), mf, layout_.mf_bytes());
  }
}

void Shard::SubtractDelta(uint64_t key, uint64_t hash, float saved) {
  MutexLock l(&mu_);
  const uint32_t row = index_.Find(key, hash);
  if (row == HashIndex::kNotFound) return;
  RowHeader* h = Row(row);
  h->delta_score -= saved;
}

void Shard::Clear() {
  MutexLock l(&mu_);
  index_.Clear();
  // admission_day_ stays: Clear() keeps the table's day
  base_.Clear();
  mf_.Clear();
}

void Shard::GetStats(ShardCounters* c, size_t* keys, size_t* keys_with_mf, size_t* bytes) {
  MutexLock l(&mu_);
  c->pull_misses += counters_.pull_misses;
  c->inserts += counters_.inserts;
  c->mf_created += counters_.mf_created;
  c->deleted += counters_.deleted;
  c->admission_rejected += counters_.admission_rejected;
  *keys += index_.size();
  *keys_with_mf += mf_.live();
  *bytes += index_.bytes() + base_.bytes() + mf_.bytes() + sizeof(Shard);
}

}  // namespace psembed
