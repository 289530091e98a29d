// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/sparse_rule.h"

#include <cmath>

#include "util/hash.h"

namespace psembed {

void SparseRule::Init(float* w, float* state, uint64_t seed, uint64_t key, uint64_t stream) const {
  for (int i = 0; i < dim_; ++i) {
    const double u = Uniform01(seed, key, stream, static_cast<uint64_t>(i));
    w[i] = static_cast<float>(Bound((2.0 * u - 1.0) * options_.initial_range));
  }
  InitState(state);
}

namespace {

// w -= lr * g (raw gradient). State: none.
class SgdRule final : public SparseRule {
 public:
  using SparseRule::SparseRule;
  int StateDim() const override { return 0; }
  void Update(float* w, float*, const float* g, double) const override {
    for (int i = 0; i < dim_; ++i) {
      w[i] = static_cast<float>(Bound(double{w[i]} - options_.learning_rate * g[i]));
    }
  }

 protected:
  void InitState(float*) const override {}
};

// One accumulator G shared by the block: w_i -= lr * ĝ_i * sqrt(G0 / (G0 + G)) with the old G,
// then G += mean(ĝ²); ĝ = g / scale.
class AdaGradRule final : public SparseRule {
 public:
  using SparseRule::SparseRule;
  int StateDim() const override { return 1; }
  void Update(float* w, float* state, const float* g, double scale) const override {
    // The row's factors and the accumulator in double; the per-weight loop in float32 (as Paddle's
    // rule does), which the compiler vectorizes 4 wide: the loop in double made the whole push 6-9%
    // slower (paired two-build runs, 10M keys; docs/benchmarks.md, "Table", session 14). Against the
    // float64 reference a weight moves by at most ~2 float32 ulps of its update more.
    const double g0 = options_.initial_g2sum;
    const float ratio = static_cast<float>(options_.learning_rate * std::sqrt(g0 / (g0 + double{state[0]})));
    const float inv_scale = static_cast<float>(1.0 / scale);
    float sum = 0.0f;
    for (int i = 0; i < dim_; ++i) {
      const float gs = g[i] * inv_scale;
      w[i] = Bound(w[i] - gs * ratio);  // the float overload
      sum += gs * gs;
    }
    double mean = double{sum} / dim_;
    if (!std::isfinite(sum)) {
      // The squares passed float32's range (|ĝ| > ~1.8e19); their mean may not have: redo it in double.
      double s = 0.0;
      for (int i = 0; i < dim_; ++i) {
        const double gs = g[i] * inv_scale;
        s += gs * gs;
      }
      mean = s / dim_;
    }
    state[0] = static_cast<float>(double{state[0]} + mean);
  }

 protected:
  void InitState(float* state) const override { state[0] = 0.0f; }
};

// One accumulator per dimension: w_i -= lr * ĝ_i * sqrt(G0 / (G0 + G_i)); G_i += ĝ_i².
class StdAdaGradRule final : public SparseRule {
 public:
  using SparseRule::SparseRule;
  int StateDim() const override { return dim_; }
  void Update(float* w, float* state, const float* g, double scale) const override {
    const double g0 = options_.initial_g2sum;
    const double inv_scale = 1.0 / scale;
    for (int i = 0; i < dim_; ++i) {
      const double gs = g[i] * inv_scale;
      const double ratio = options_.learning_rate * std::sqrt(g0 / (g0 + double{state[i]}));
      w[i] = static_cast<float>(Bound(double{w[i]} - gs * ratio));
      state[i] = static_cast<float>(double{state[i]} + gs * gs);
    }
  }

 protected:
  void InitState(float* state) const override {
    for (int i = 0; i < dim_; ++i) state[i] = 0.0f;
  }
};

// State: m[d], v[d], beta1^t, beta2^t (powers start at beta1, beta2). Raw gradient.
// lr_t = lr * sqrt(1 - b2pow) / (1 - b1pow); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
// w -= lr_t * m / (sqrt(v) + eps); then the powers are multiplied by the betas.
class AdamRule final : public SparseRule {
 public:
  using SparseRule::SparseRule;
  int StateDim() const override { return 2 * dim_ + 2; }
  void Update(float* w, float* state, const float* g, double) const override {
    float* m = state;
    float* v = state + dim_;
    float* pow1 = state + 2 * dim_;
    float* pow2 = pow1 + 1;
    const double b1 = options_.beta1, b2 = options_.beta2;
    const double lr_t = options_.learning_rate * std::sqrt(1.0 - double{*pow2}) / (1.0 - double{*pow1});
    for (int i = 0; i < dim_; ++i) {
      const double mi = b1 * m[i] + (1.0 - b1) * g[i];
      const double vi = b2 * v[i] + (1.0 - b2) * double{g[i]} * g[i];
      m[i] = static_cast<float>(mi);
      v[i] = static_cast<float>(vi);
      w[i] = static_cast<float>(Bound(double{w[i]} - lr_t * mi / (std::sqrt(vi) + options_.epsilon)));
    }
    *pow1 = static_cast<float>(double{*pow1} * b1);
    *pow2 = static_cast<float>(double{*pow2} * b2);
  }

 protected:
  void InitState(float* state) const override {
    for (int i = 0; i < 2 * dim_; ++i) state[i] = 0.0f;
    state[2 * dim_] = static_cast<float>(options_.beta1);
    state[2 * dim_ + 1] = static_cast<float>(options_.beta2);
  }
};

// FTRL-Proximal, per coordinate z, n; raw gradient:
// sigma = (sqrt(n + g²) - sqrt(n)) / alpha; z += g - sigma w; n += g²;
// w = 0 if |z| <= l1 else -(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2); then clipped.
class FtrlRule final : public SparseRule {
 public:
  using SparseRule::SparseRule;
  int StateDim() const override { return 2 * dim_; }
  void Update(float* w, float* state, const float* g, double) const override {
    float* z = state;
    float* n = state + dim_;
    const double alpha = options_.alpha;
    for (int i = 0; i < dim_; ++i) {
      const double gi = g[i];
      const double ni = n[i];
      const double nn = ni + gi * gi;
      const double sigma = (std::sqrt(nn) - std::sqrt(ni)) / alpha;
      const double zi = z[i] + gi - sigma * w[i];
      double wi = 0.0;
      if (std::fabs(zi) > options_.l1) {
        const double sgn = zi < 0 ? -1.0 : 1.0;
        wi = -(zi - sgn * options_.l1) / ((options_.beta + std::sqrt(nn)) / alpha + options_.l2);
      }
      z[i] = static_cast<float>(zi);
      n[i] = static_cast<float>(nn);
      w[i] = static_cast<float>(Bound(wi));
    }
  }

 protected:
  void InitState(float* state) const override {
    for (int i = 0; i < 2 * dim_; ++i) state[i] = 0.0f;
  }
};

}  // namespace

std::unique_ptr<SparseRule> SparseRule::Create(const RuleOptions& options, int dim) {
  switch (options.kind) {
    case RuleOptions::kSgd:
      return std::make_unique<SgdRule>(options, dim);
    case RuleOptions::kAdaGrad:
      return std::make_unique<AdaGradRule>(options, dim);
    case RuleOptions::kStdAdaGrad:
      return std::make_unique<StdAdaGradRule>(options, dim);
    case RuleOptions::kAdam:
      return std::make_unique<AdamRule>(options, dim);
    case RuleOptions::kFtrl:
      return std::make_unique<FtrlRule>(options, dim);
  }
  return nullptr;
}

}  // namespace psembed
