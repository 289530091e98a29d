// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// The layout of one feasign row. A row is a fixed-size base record in its shard's base slab pool,
// plus (once admitted) a fixed-size mf block in the shard's mf pool:
//
//   base record (RowLayout::base_bytes() bytes, 4-byte aligned):
//     struct RowHeader { float show, click, delta_score; int32 slot; uint16 unseen_days;
//                        uint16 reserved; uint32 mf_index; } // 24 bytes
//     float lr[1 + lr_state_dim]                                      // lr_w, then its rule state
//   mf block (RowLayout::mf_bytes() bytes):
//     float mf[dim + mf_state_dim]                                    // mf_w[dim], then rule state
//
// The key itself lives only in the hash index (hash_index.h). Invariants: (1) mf_index is kNoMf or
// the index of a live block in the mf pool owned by this row alone; (2) once a row has mf it keeps
// it until the row is deleted or load_rows() overwrites it without mf.

#ifndef PSEMBED_TABLE_ROW_STORE_FEATURE_VALUE_H_
#define PSEMBED_TABLE_ROW_STORE_FEATURE_VALUE_H_

#include <cstddef>
#include <cstdint>

namespace psembed {

constexpr uint32_t kNoMf = 0xffffffffu;
constexpr uint16_t kMaxUnseenDays = 0xffff;  // unseen_days saturates here

struct RowHeader {
  float show;
  float click;
  float delta_score;
  int32_t slot;  // -1 until a push gives one
  uint16_t unseen_days;
  uint16_t reserved;  // 0; padding that keeps mf_index aligned (the header stays 24 bytes)
  uint32_t mf_index;
};
static_assert(sizeof(RowHeader) == 24, "RowHeader layout is part of the memory budget");

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
  size_t base_bytes() const { return sizeof(RowHeader) + sizeof(float) * lr_width(); }
  size_t mf_bytes() const { return sizeof(float) * mf_width(); }

  static float* Lr(RowHeader* h) { return reinterpret_cast<float*>(h + 1); }
  static const float* Lr(const RowHeader* h) { return reinterpret_cast<const float*>(h + 1); }

 private:
  const int dim_;
  const int lr_state_dim_;
  const int mf_state_dim_;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_ROW_STORE_FEATURE_VALUE_H_
