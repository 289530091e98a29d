// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// CtrAccessor: the rules applied to one row: score, admission, push update, mf creation, decay, and
// the save/delete predicates (reference: shared ctr_accessor_semantics.md sections 1, 2, 4;
// docs/architecture.md "Row semantics").
//
// Thread safety: immutable after construction; methods touch only the row they are given, which the
// caller protects with the shard mutex.
//
// Numerics: scores and rule arithmetic are computed in double from the stored float32 values and
// rounded to float32 once when stored (AdaGrad's and FTRL's per-weight loops excepted: sparse_rule.h).

#ifndef PSEMBED_TABLE_CTR_ACCESSOR_H_
#define PSEMBED_TABLE_CTR_ACCESSOR_H_

#include <cstdint>
#include <memory>

#include "table/accessor_options.h"
#include "table/row_store/feature_value.h"
#include "table/sparse_rule.h"

namespace psembed {

// The draw index of admission for a push: (day_index << 48) | (push_id mod 2^48), day_index = table
// day + 1. push_id = (trainer << 32) | that trainer's push count (a local table counts its own pushes),
// so a key's attempts in different pushes draw independently, and the draw depends only on the push,
// not on which shard or server applies it, nor on when it arrives. No per-key state is kept.
inline uint64_t AdmissionDraw(uint64_t day_index, uint64_t push_id) {
  return (day_index << 48) | (push_id & ((uint64_t{1} << 48) - 1));
}

class CtrAccessor {
 public:
  explicit CtrAccessor(const TableOptions& options);
  CtrAccessor(const CtrAccessor&) = delete;
  CtrAccessor& operator=(const CtrAccessor&) = delete;

  const TableOptions& options() const { return options_; }
  const RowLayout& layout() const { return layout_; }
  const SparseRule& lr_rule() const { return *lr_rule_; }
  const SparseRule& mf_rule() const { return *mf_rule_; }

  // S(show, click) = (show - click) * nonclk_coeff + click * click_coeff.
  double Score(double show, double click) const {
    return (show - click) * options_.accessor.nonclk_coeff + click * options_.accessor.click_coeff;
  }

  // Admission of an unknown key pushed with (show, click) when create_probability_from_score:
  // s = Score; reject if s <= 0, admit if s >= 1, else admit iff u(seed, key, 3, draw) < s, with
  // draw = AdmissionDraw(day_index, push_id) of the push that carries the key.
  bool Admit(uint64_t key, double show, double click, uint64_t draw) const;

  // A fresh record header and lr block: zero stats, slot -1, lr block from the lr rule's Init (stream 1).
  void InitRow(RowHeader* h, uint64_t key) const;
  // A fresh mf block from the mf rule's Init (stream 2).
  void InitMf(float* mf, uint64_t key) const;

  // Whether a row with these (post-update) stats gets mf: S(show, click) >= embedx_threshold.
  bool ReachesMfThreshold(double show, double click) const {
    return Score(show, click) >= options_.accessor.embedx_threshold;
  }

  // Applies one merged push: stats, slot (when slot != nullptr), the lr rule and, if mf != nullptr,
  // the mf rule. g has 1 + dim floats. Returns true when the row has no mf and its post-update
  // score reaches embedx_threshold (the caller then creates mf; this push's mf gradient is dropped).
  bool Update(RowHeader* h, float* mf, const float* g, float show, float click, const int32_t* slot) const;

  // show, click *= factor.
  void Decay(RowHeader* h, double factor) const;
  // S < delete_threshold or unseen_days > delete_after_unseen_days.
  bool ShouldDelete(const RowHeader& h) const;
  // SavedScore and delta_score >= 0 (the reference's delta predicate with delta_threshold := 0).
  bool SaveBase(const RowHeader& h) const;
  // SavedScore and delta_score >= delta_threshold, compared in float32.
  bool SaveDelta(const RowHeader& h) const;

 private:
  // S >= base_threshold and unseen_days <= delta_keep_days: what base and delta saves share.
  bool SavedScore(const RowHeader& h) const;

  const TableOptions options_;
  std::unique_ptr<SparseRule> lr_rule_;
  std::unique_ptr<SparseRule> mf_rule_;
  RowLayout layout_;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_CTR_ACCESSOR_H_
