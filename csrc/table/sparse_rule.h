// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Sparse rules: the per-row optimizers applied on push. One class per rule, one interface.
// Each rule owns a block of `dim` weights plus StateDim() floats of state, stored float32.
// Arithmetic is done in double and rounded to float32 once per stored value, except the per-weight
// loops of AdaGrad and FTRL, which run in float32 (sparse_rule.cc says why). Every stored value stays
// finite: weights are clipped to the bounds, which are themselves clipped to +-FLT_MAX, and state that
// passes float32's range saturates at +-FLT_MAX (util/saturate.h). REQUIRES of every update: g finite.
//
// Thread safety: rules are immutable after construction; Init/Update only touch the row they are
// given, which the caller protects (shard mutex).

#ifndef PSEMBED_TABLE_SPARSE_RULE_H_
#define PSEMBED_TABLE_SPARSE_RULE_H_

#include <cstdint>
#include <memory>

#include "table/accessor_options.h"

namespace psembed {

// FTRL's settings as its float32 loop uses them (sparse_rule.cc), each saturated at FLT_MAX: a setting is any
// finite double >= 0, and a cast of one past float32's range is undefined. The loop divides by
// (beta + sqrt(n)) * inv_alpha + l2 and float32 n rounds to 0 for tiny gradients, so beta * inv_alpha + l2 must
// be > 0 in float32, which the config parser checks with DenominatorPositive().
struct FtrlFloats {
  explicit FtrlFloats(const RuleOptions& o);
  bool DenominatorPositive() const { return beta * inv_alpha > 0.0f || l2 > 0.0f; }
  float inv_alpha, beta, l1, l2;
};

class SparseRule {
 public:
  SparseRule(const RuleOptions& options, int dim) : options_(WithFiniteBounds(options)), dim_(dim) {}
  virtual ~SparseRule() = default;
  SparseRule(const SparseRule&) = delete;
  SparseRule& operator=(const SparseRule&) = delete;

  int dim() const { return dim_; }
  const RuleOptions& options() const { return options_; }
  // Floats of optimizer state after the dim weights.
  virtual int StateDim() const = 0;

  // w[i] = clip((2 u(seed, key, stream, i) - 1) * initial_range); state = its initial value.
  void Init(float* w, float* state, uint64_t seed, uint64_t key, uint64_t stream) const;

  // One step with the merged gradient g[dim]. inv_scale is 1 / the show scale (AdaGrad family only;
  // the others ignore it), which the caller works out once for both of a row's rules: a division is
  // one of the longest steps of an AdaGrad update. REQUIRES: inv_scale > 0.
  virtual void Update(float* w, float* state, const float* g, double inv_scale) const = 0;

  // Clips to [min_bound, max_bound] (within +-FLT_MAX, so the result rounds to a finite float32); NaN
  // becomes min_bound (tests are !(w >= lo), !(w <= hi)).
  double Bound(double w) const {
    if (!(w >= options_.min_bound)) w = options_.min_bound;
    if (!(w <= options_.max_bound)) w = options_.max_bound;
    return w;
  }
  // The same clip for float32 arithmetic, against the bounds rounded to float32.
  float Bound(float w) const {
    const float lo = static_cast<float>(options_.min_bound);
    const float hi = static_cast<float>(options_.max_bound);
    if (!(w >= lo)) w = lo;
    if (!(w <= hi)) w = hi;
    return w;
  }

  static std::unique_ptr<SparseRule> Create(const RuleOptions& options, int dim);

 protected:
  virtual void InitState(float* state) const = 0;

  // options with its weight bounds clipped to [-FLT_MAX, FLT_MAX]: bounds of +-inf (allowed) would let
  // a weight become an infinity, which a checkpoint refuses.
  static RuleOptions WithFiniteBounds(RuleOptions options);

  const RuleOptions options_;
  const int dim_;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_SPARSE_RULE_H_
