// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/sparse_rule.h"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "util/hash.h"
#include "util/saturate.h"

namespace psembed {

RuleOptions SparseRule::WithFiniteBounds(RuleOptions options) {
  // Both bounds into float32's range, from both sides: (-inf, -inf) must give -FLT_MAX, not -inf weights.
  options.min_bound = std::clamp(options.min_bound, -double{FLT_MAX}, double{FLT_MAX});
  options.max_bound = std::clamp(options.max_bound, -double{FLT_MAX}, double{FLT_MAX});
  return options;
}

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
  AdaGradRule(const RuleOptions& options, int dim) : SparseRule(options, dim), inv_dim_(1.0 / dim) {}
  int StateDim() const override { return 1; }
  void Update(float* w, float* state, const float* g, double inv_scale) const override {
    // The row's factors and the accumulator in double; the per-weight loop in float32 (as Paddle's
    // rule does), which the compiler vectorizes 4 wide: the loop in double made the whole push 6-9%
    // slower (paired two-build runs, 10M keys; docs/benchmarks.md, "Table", session 14). Against the
    // float64 reference a weight moves by at most ~2 float32 ulps of its update more.
    const double g0 = options_.initial_g2sum;
    const double ratio_d = options_.learning_rate * std::sqrt(g0 / (g0 + double{state[0]}));
    // A scaled gradient past float32's range (g / show, so only with a show under 1) takes a loop in
    // double: in float32 it would be inf, and inf * a ratio of 0 (lr 0) is NaN. So do a 1 / show or a
    // ratio past it (a show under ~2.9e-39, a learning rate over FLT_MAX): 0 * inf is NaN for a zero g.
    if (inv_scale > double{FLT_MAX} || ratio_d > double{FLT_MAX} ||
        (inv_scale > 1.0 && ScaledPastFloat(g, inv_scale))) {
      UpdateDouble(w, state, g, inv_scale, ratio_d);
      return;
    }
    const float ratio = static_cast<float>(ratio_d);
    const float inv_scale_f = static_cast<float>(inv_scale);
    float sum = 0.0f;
    for (int i = 0; i < dim_; ++i) {
      const float gs = g[i] * inv_scale_f;
      w[i] = Bound(w[i] - gs * ratio);  // the float overload
      sum += gs * gs;
    }
    // Times 1 / dim rather than a division (exact for a power-of-two dim; otherwise within an ulp).
    double mean = double{sum} * inv_dim_;
    if (!std::isfinite(sum)) {
      // The squares passed float32's range (|ĝ| > ~1.8e19); their mean may not have: redo it in double.
      double s = 0.0;
      for (int i = 0; i < dim_; ++i) {
        const double gs = g[i] * inv_scale;
        s += gs * gs;
      }
      mean = s * inv_dim_;
    }
    state[0] = SaturateToFloat(double{state[0]} + mean);
  }

 protected:
  void InitState(float* state) const override { state[0] = 0.0f; }

 private:
  bool ScaledPastFloat(const float* g, double inv_scale) const {
    bool past = false;
    for (int i = 0; i < dim_; ++i) past |= std::fabs(double{g[i]}) * inv_scale > double{FLT_MAX};
    return past;
  }

  void UpdateDouble(float* w, float* state, const float* g, double inv_scale, double ratio) const {
    double s = 0.0;
    for (int i = 0; i < dim_; ++i) {
      const double gs = g[i] * inv_scale;
      w[i] = static_cast<float>(Bound(double{w[i]} - gs * ratio));
      s += gs * gs;
    }
    state[0] = SaturateToFloat(double{state[0]} + s * inv_dim_);
  }

  const double inv_dim_;
};

// One accumulator per dimension: w_i -= lr * ĝ_i * sqrt(G0 / (G0 + G_i)); G_i += ĝ_i².
class StdAdaGradRule final : public SparseRule {
 public:
  using SparseRule::SparseRule;
  int StateDim() const override { return dim_; }
  void Update(float* w, float* state, const float* g, double inv_scale) const override {
    const double g0 = options_.initial_g2sum;
    for (int i = 0; i < dim_; ++i) {
      const double gs = g[i] * inv_scale;
      const double ratio = options_.learning_rate * std::sqrt(g0 / (g0 + double{state[i]}));
      w[i] = static_cast<float>(Bound(double{w[i]} - gs * ratio));
      state[i] = SaturateToFloat(double{state[i]} + gs * gs);
    }
  }

 protected:
  void InitState(float* state) const override {
    for (int i = 0; i < dim_; ++i) state[i] = 0.0f;
  }
};

// State: m[d], v[d], beta1^t, beta2^t (powers start at beta1, beta2). Raw gradient.
// lr_t = lr * sqrt(1 - b2pow) / (1 - b1pow); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
// w -= lr_t * m / (sqrt(v) + eps) with m, v as stored; then the powers are multiplied by the betas.
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
      m[i] = SaturateToFloat(mi);
      v[i] = SaturateToFloat(vi);
      // The step from m and v as stored (rounded, saturated), so that it agrees with the row's state.
      w[i] = static_cast<float>(Bound(double{w[i]} - lr_t * m[i] / (std::sqrt(double{v[i]}) + options_.epsilon)));
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

}  // namespace

FtrlFloats::FtrlFloats(const RuleOptions& o)
    : inv_alpha(SaturateToFloat(1.0 / o.alpha)),
      beta(SaturateToFloat(o.beta)),
      l1(SaturateToFloat(o.l1)),
      l2(SaturateToFloat(o.l2)) {}

namespace {

// FTRL-Proximal, per coordinate z, n; raw gradient:
// sigma = (sqrt(n + g²) - sqrt(n)) / alpha; z += g - sigma w; n += g²;
// w = 0 if |z| <= l1 else -(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2); then clipped.
// sigma is computed as g² / (sqrt(n + g²) + sqrt(n)) / alpha: the same value, without subtracting two
// close square roots (in float32 that difference is 0 whenever g² < n * 2^-23).
// The per-weight loop runs in float32: three square roots and two divisions a weight made the
// rule's double loop the bottleneck of an FTRL push (1.4x-1.8x faster pushes in float32, paired
// two-build runs; docs/benchmarks.md, "Table", session 15). A row whose gradient passes
// kFloatLoopMaxGrad takes the double loop, so that no square overflows float32 where double's did not.
class FtrlRule final : public SparseRule {
 public:
  FtrlRule(const RuleOptions& options, int dim) : SparseRule(options, dim), floats_(options) {}
  int StateDim() const override { return 2 * dim_; }
  void Update(float* w, float* state, const float* g, double) const override {
    if (FitsFloatLoop(g)) {
      UpdateFloat(w, state, g);
    } else {
      UpdateDouble(w, state, g);
    }
  }

 protected:
  void InitState(float* state) const override {
    for (int i = 0; i < 2 * dim_; ++i) state[i] = 0.0f;
  }

 private:
  static constexpr float kFloatLoopMaxGrad = 1e18f;  // its square stays far inside float32's ~3.4e38

  bool FitsFloatLoop(const float* g) const {
    bool fits = true;
    for (int i = 0; i < dim_; ++i) fits &= std::fabs(g[i]) <= kFloatLoopMaxGrad;  // g is finite (checked)
    return fits;
  }

  void UpdateFloat(float* w, float* state, const float* g) const {
    float* z = state;
    float* n = state + dim_;
    const float inv_alpha = floats_.inv_alpha, beta = floats_.beta, l1 = floats_.l1, l2 = floats_.l2;
    for (int i = 0; i < dim_; ++i) {
      const float gi = g[i];
      const float g2 = gi * gi;
      const float nn = SaturateFloat(n[i] + g2);
      const float root_nn = std::sqrt(nn);
      const float roots = root_nn + std::sqrt(n[i]);
      // Saturated, so that sigma * w is never inf * 0 (a NaN).
      const float sigma = roots > 0.0f ? SaturateFloat(g2 / roots * inv_alpha) : 0.0f;  // g = n = 0: 0
      const float zi = SaturateFloat(z[i] + gi - sigma * w[i]);
      const float shrunk = zi - std::copysign(l1, zi);
      const float wi = std::fabs(zi) > l1 ? -shrunk / ((beta + root_nn) * inv_alpha + l2) : 0.0f;
      z[i] = zi;
      n[i] = nn;
      w[i] = Bound(wi);  // the float overload
    }
  }

  void UpdateDouble(float* w, float* state, const float* g) const {
    float* z = state;
    float* n = state + dim_;
    const double alpha = options_.alpha;
    for (int i = 0; i < dim_; ++i) {
      const double gi = g[i];
      const double ni = n[i];
      const double nn = ni + gi * gi;
      const double roots = std::sqrt(nn) + std::sqrt(ni);
      const double sigma = roots > 0.0 ? std::min(gi * gi / roots / alpha, DBL_MAX) : 0.0;  // as above
      // w from z and n as stored (float32, saturated), as the float loop has them.
      z[i] = SaturateToFloat(z[i] + gi - sigma * w[i]);
      n[i] = SaturateToFloat(nn);
      const double zs = z[i], ns = n[i];
      double wi = 0.0;
      if (std::fabs(zs) > options_.l1) {
        const double sgn = zs < 0 ? -1.0 : 1.0;
        wi = -(zs - sgn * options_.l1) / ((options_.beta + std::sqrt(ns)) / alpha + options_.l2);
      }
      w[i] = static_cast<float>(Bound(wi));
    }
  }

  const FtrlFloats floats_;
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
