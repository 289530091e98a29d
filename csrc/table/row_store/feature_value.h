// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// The layout of one feasign row. A row is one fixed-size record in one of its shard's two slab pools:
// a short record while it has no mf, a long one (the same record with the mf block appended) once
// admitted:
//
//   record (RowLayout::record_bytes(has_mf) bytes, 4-byte aligned):
//     struct RowHeader { float show, click, delta_score; int32 slot; uint16 unseen_days;
//                        uint16 reserved; }                          // 20 bytes
//     float lr[1 + lr_state_dim]                                      // lr_w, then its rule state
//     float mf[dim + mf_state_dim]   (long records only)              // mf_w[dim], then rule state
//
// Why one record and not a base record pointing at a separate mf block: a pull or push of a row with
// mf then reads one random record instead of chasing a pointer into a second pool (one cache line
// instead of two or three for dim 8 with AdaGrad, where the long record is exactly 64 bytes); the
// row moves once, when it gets mf. The key itself lives only in the hash index (hash_index.h), whose
// value is the row's RowRef: which pool, and the record's index in it. Invariant: a row has mf iff
// its RowRef says the long pool; once a row has mf it keeps it until the row is deleted or
// load_rows() overwrites it without mf.

#ifndef PSEMBED_TABLE_ROW_STORE_FEATURE_VALUE_H_
#define PSEMBED_TABLE_ROW_STORE_FEATURE_VALUE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "util/float_copy.h"

namespace psembed {

constexpr uint16_t kMaxUnseenDays = 0xffff;  // unseen_days saturates here
// Pushed slots lie in [0, kSlotLimit): a checkpoint stores the slot as a float32 column, which holds
// every integer up to 2^24 exactly and rounds larger ones (a slot of 2^24 + 1 would come back as 2^24).
// -1 marks a row that no push gave a slot yet.
constexpr int32_t kSlotLimit = int32_t{1} << 24;

struct RowHeader {
  float show;
  float click;
  float delta_score;
  int32_t slot;  // -1 until a push gives one
  uint16_t unseen_days;
  uint16_t reserved;  // padding that keeps lr 4-byte aligned: 0 in a live row (a bulk load marks the rows it
                      // has inserted but not written yet, Shard::kLoadMark)
};
static_assert(sizeof(RowHeader) == 20, "RowHeader layout is part of the memory budget");

// Where a row's record lives (the hash index's value): the top bit says the long pool (with mf), the
// other 31 bits the record's index in its pool. Never equal to HashIndex::kNotFound (0xffffffff): a
// pool holds at most kMaxRecords records.
class RowRef {
 public:
  static constexpr uint32_t kMfBit = 0x80000000u;
  static constexpr uint32_t kMaxRecords = kMfBit - 1;  // indexes [0, 2^31 - 1)

  static uint32_t Make(uint32_t index, bool has_mf) { return index | (has_mf ? kMfBit : 0u); }
  static bool HasMf(uint32_t ref) { return (ref & kMfBit) != 0; }
  static uint32_t Index(uint32_t ref) { return ref & ~kMfBit; }
};

// Widths and byte sizes of the two records; immutable after construction.
class RowLayout {
 public:
  RowLayout(int dim, int lr_state_dim, int mf_state_dim)
      : dim_(dim), lr_state_dim_(lr_state_dim), mf_state_dim_(mf_state_dim) {}

  int dim() const { return dim_; }
  int lr_state_dim() const { return lr_state_dim_; }
  int mf_state_dim() const { return mf_state_dim_; }
  int lr_width() const { return 1 + lr_state_dim_; }
  int mf_width() const { return dim_ + mf_state_dim_; }
  // Columns of export()'s base matrix: show, click, delta_score, unseen_days, slot, lr_w, lr_state...
  int base_export_width() const { return 5 + lr_width(); }
  // The short record (header + lr); the mf part of a long record; a whole record.
  size_t base_bytes() const { return sizeof(RowHeader) + sizeof(float) * lr_width(); }
  size_t mf_bytes() const { return sizeof(float) * mf_width(); }
  size_t record_bytes(bool has_mf) const { return base_bytes() + (has_mf ? mf_bytes() : 0); }
  // The leading bytes of a record that a pull reads: the header, the lr block, the mf weights (not the
  // mf rule's state that follows them).
  size_t pulled_bytes(bool has_mf) const { return base_bytes() + (has_mf ? sizeof(float) * dim_ : 0); }

  // Floats of one pulled row: lr_w and the mf weights, after show and click if with_stats.
  size_t pull_width(bool with_stats) const { return (with_stats ? 3 : 1) + static_cast<size_t>(dim_); }
  // Writes a pull's row of h into out[0, pull_width(with_stats)): show and click if with_stats, lr_w,
  // then the mf weights (zeros without mf). h == nullptr (an absent key): all zeros.
  void WritePullRow(const RowHeader* h, bool has_mf, bool with_stats, float* out) const {
    if (h == nullptr) {
      std::memset(out, 0, pull_width(with_stats) * sizeof(float));
      return;
    }
    if (with_stats) {
      out[0] = h->show;
      out[1] = h->click;
      out += 2;
    }
    out[0] = Lr(h)[0];
    if (has_mf) {
      CopyFloats(out + 1, Mf(h), static_cast<size_t>(dim_));
    } else {
      std::memset(out + 1, 0, static_cast<size_t>(dim_) * sizeof(float));
    }
  }

  static float* Lr(RowHeader* h) { return reinterpret_cast<float*>(h + 1); }
  static const float* Lr(const RowHeader* h) { return reinterpret_cast<const float*>(h + 1); }
  // The mf part of a long record. REQUIRES: h is a long record (its RowRef has the mf bit).
  float* Mf(RowHeader* h) const { return reinterpret_cast<float*>(reinterpret_cast<char*>(h) + base_bytes()); }
  const float* Mf(const RowHeader* h) const {
    return reinterpret_cast<const float*>(reinterpret_cast<const char*>(h) + base_bytes());
  }

 private:
  const int dim_;
  const int lr_state_dim_;
  const int mf_state_dim_;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_ROW_STORE_FEATURE_VALUE_H_
