// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/ctr_accessor.h"

#include <algorithm>
#include <cfloat>

#include "util/hash.h"
#include "util/saturate.h"

namespace psembed {

CtrAccessor::CtrAccessor(const TableOptions& options)
    : options_(options),
      lr_rule_(SparseRule::Create(options.lr_rule, 1)),
      mf_rule_(SparseRule::Create(options.mf_rule, options.dim)),
      layout_(options.dim, lr_rule_->StateDim(), mf_rule_->StateDim()) {}

bool CtrAccessor::Admit(uint64_t key, double show, double click, uint64_t draw) const {
  if (!options_.accessor.create_probability_from_score) return true;
  const double s = Score(show, click);
  if (!(s > 0.0)) return false;
  if (s >= 1.0) return true;
  return Uniform01(options_.seed, key, kStreamAdmission, draw) < s;
}

void CtrAccessor::InitRow(RowHeader* h, uint64_t key) const {
  h->show = 0.0f;
  h->click = 0.0f;
  h->delta_score = 0.0f;
  h->slot = -1;
  h->unseen_days = 0;
  h->reserved = 0;
  float* lr = RowLayout::Lr(h);
  lr_rule_->Init(lr, lr + 1, options_.seed, key, kStreamLrInit);
}

void CtrAccessor::InitMf(float* mf, uint64_t key) const {
  mf_rule_->Init(mf, mf + layout_.dim(), options_.seed, key, kStreamMfInit);
}

bool CtrAccessor::Update(RowHeader* h, float* mf, const float* g, float show, float click,
                         const int32_t* slot) const {
  h->show = std::min(h->show + show, FLT_MAX);  // both >= 0: saturating at the top is enough
  h->click = std::min(h->click + click, FLT_MAX);
  h->delta_score = SaturateToFloat(double{h->delta_score} + Score(show, click));
  h->unseen_days = 0;
  if (slot != nullptr) h->slot = *slot;
  const double inv_scale = (options_.accessor.show_scale && show > 0.0f) ? 1.0 / double{show} : 1.0;
  float* lr = RowLayout::Lr(h);
  lr_rule_->Update(lr, lr + 1, g, inv_scale);
  if (mf != nullptr) {
    mf_rule_->Update(mf, mf + layout_.dim(), g + 1, inv_scale);
    return false;
  }
  return ReachesMfThreshold(h->show, h->click);
}

void CtrAccessor::Decay(RowHeader* h, double factor) const {
  h->show = static_cast<float>(h->show * factor);
  h->click = static_cast<float>(h->click * factor);
}

bool CtrAccessor::ShouldDelete(const RowHeader& h) const {
  return Score(h.show, h.click) < options_.accessor.delete_threshold ||
         static_cast<int64_t>(h.unseen_days) > options_.accessor.delete_after_unseen_days;
}

bool CtrAccessor::SavedScore(const RowHeader& h) const {
  return Score(h.show, h.click) >= options_.accessor.base_threshold &&
         static_cast<int64_t>(h.unseen_days) <= options_.accessor.delta_keep_days;
}

bool CtrAccessor::SaveBase(const RowHeader& h) const { return SavedScore(h) && h.delta_score >= 0.0f; }

bool CtrAccessor::SaveDelta(const RowHeader& h) const {
  // In float32, as the reference compares them: delta_score is stored in float32, so a row pushed to exactly
  // the threshold holds float32(S), which may fall under a double threshold that float32 does not represent.
  return SavedScore(h) && h.delta_score >= static_cast<float>(options_.accessor.delta_threshold);
}

}  // namespace psembed
