// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Sparse rules: the per-row optimizers applied on push. One class per rule, one interface.
// Each rule owns a block of `dim` weights plus StateDim() floats of state, stored float32.
// Arithmetic is done in double and rounded to float32 once per stored value.
//
// Thread safety: rules are immutable after construction; Init/Update only touch the row they are
// given, which the caller protects (shard mutex).

#ifndef PSEMBED_TABLE_SPARSE_RULE_H_
#define PSEMBED_TABLE_SPARSE_RULE_H_

#include <cstdint>
#include <memory>

#include "table/accessor_options.h"

namespace psembed {

class SparseRule {
 public:
  SparseRule(const RuleOptions& options, int dim) : options_(options), dim_(dim) {}
  virtual ~SparseRule() = default;
  SparseRule(const SparseRule&) = delete;
  SparseRule& operator=(const SparseRule&) = delete;

  int dim() const { return dim_; }
  const RuleOptions& options() const { return options_; }
  // Floats of optimizer state after the dim weights.
  virtual int StateDim() const = 0;

  // w[i] = clip((2 u(seed, key, stream, i) - 1) * initial_range); state = its initial value.
  void Init(float* w, float* state, uint64_t seed, uint64_t key, uint64_t stream) const;

  // One step with the merged gradient g[dim]; `scale` is the show scale (AdaGrad family only;
  // the others ignore it). REQUIRES: scale > 0.
  virtual void Update(float* w, float* state, const float* g, double scale) const = 0;

  // Clips to [min_bound, max_bound]; NaN becomes min_bound (BoundTo below).
  double Bound(double w) const;

  static std::unique_ptr<SparseRule> Create(const RuleOptions& options, int dim);

 protected:
  virtual void InitState(float* state) const = 0;

  const RuleOptions options_;
  const int dim_;
};

// Clips w to [o.min_bound, o.max_bound]; NaN becomes min_bound (tests are !(w >= lo), !(w <= hi)).
inline double BoundTo(double w, const RuleOptions& o) {
  if (!(w >= o.min_bound)) w = o.min_bound;
  if (!(w <= o.max_bound)) w = o.max_bound;
  return w;
}

// One AdaGrad step on a row's lr block (lr[0] = w, lr[1] = G) and mf block (mf[0, dim) = w, mf[dim] = G)
// at once, for a table whose two rules are both AdaGrad: the same arithmetic, bit for bit, as the two
// rules' Update calls, but both divide -> square root chains start before either block is written, so
// they overlap, and 1 / scale is computed once. A timing build alternating whole pushes with and without
// it on one table: a push 3-4% faster on uniform keys, 2-3% on Zipf ones (docs/benchmarks.md, "Table",
// session 12). scale as in Update.
void AdaGradPairUpdate(const RuleOptions& lr_options, const RuleOptions& mf_options, int dim, float* lr,
                       float* mf, const float* g, double scale);

}  // namespace psembed

#endif  // PSEMBED_TABLE_SPARSE_RULE_H_
