// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Options of one sparse table, mirroring torch_psembed/config.py field by field. bindings/ fills them
// from TableConfig.to_dict() and validates them; the core only asserts.

#ifndef PSEMBED_TABLE_ACCESSOR_OPTIONS_H_
#define PSEMBED_TABLE_ACCESSOR_OPTIONS_H_

#include <cfloat>
#include <cstdint>
#include <string>

namespace psembed {

// The show/click lifecycle. score S(show, click) = (show - click) * nonclk_coeff + click * click_coeff.
struct AccessorOptions {
  // -------- affects behavior
  // Weight of a non-clicked show in the score. Default: 0.1. REQUIRES: finite, >= 0.
  double nonclk_coeff = 0.1;
  // Weight of a click in the score. Default: 1.0. REQUIRES: finite, >= 0.
  double click_coeff = 1.0;
  // A row gets its mf block once its post-push score reaches this. Default: 10.
  double embedx_threshold = 10.0;
  // export("base"/"delta") keeps rows with S >= base_threshold. Default: 1.5.
  double base_threshold = 1.5;
  // export("delta") also needs delta_score >= delta_threshold. Default: 0.25.
  double delta_threshold = 0.25;
  // base/delta keep rows with unseen_days <= delta_keep_days. Default: 16.
  int64_t delta_keep_days = 16;
  // shrink/end_day multiply show and click by this (per elapsed day). Default: 0.98. REQUIRES: [0, 1].
  double show_click_decay_rate = 0.98;
  // shrink/end_day delete rows with S < delete_threshold. Default: 0.8.
  double delete_threshold = 0.8;
  // ... or with unseen_days > delete_after_unseen_days. Default: 30.
  int64_t delete_after_unseen_days = 30;
  // AdaGrad-family rules divide the gradient by the merged show (when > 0). Default: true.
  bool show_scale = true;
  // Unknown keys are admitted on push with probability S(show, click) (see CtrAccessor::Admit).
  // Default: false (always admit).
  bool create_probability_from_score = false;
};

// One sparse rule (the lr block uses one, the mf block another).
struct RuleOptions {
  // Rule names; stored in checkpoint manifests: do not rename.
  enum Kind { kSgd = 0, kAdaGrad = 1, kStdAdaGrad = 2, kAdam = 3, kFtrl = 4 };
  Kind kind = kAdaGrad;
  double learning_rate = 0.05;
  // Initial weights are U(-initial_range, initial_range), then clipped to the bounds.
  double initial_range = 1e-4;
  double min_bound = -10.0;
  double max_bound = 10.0;
  double initial_g2sum = 3.0;  // AdaGrad, StdAdaGrad
  double beta1 = 0.9;          // Adam
  double beta2 = 0.999;        // Adam
  double epsilon = 1e-8;       // Adam
  double alpha = 0.05;         // FTRL (the effective alpha: learning_rate when unset in Python)
  double beta = 1.0;           // FTRL
  double l1 = 0.0;             // FTRL
  double l2 = 0.0;             // FTRL
};

struct TableOptions {
  // -------- affects behavior
  int dim = 8;  // mf width. REQUIRES: 1 <= dim <= 4096.
  AccessorOptions accessor;
  RuleOptions lr_rule;
  RuleOptions mf_rule;
  uint64_t seed = 0;  // seed of the counter-based generator (util/hash.h Uniform01)
  // true: NaN/Inf gradient rows are skipped and counted; false: the binding raises before any work.
  bool nan_skip = false;
  // The most rows this table may hold, 0 = no limit. Each shard holds at most max_keys / num_shards
  // (rounded down) rows: a push does not insert a new key into a full shard (Shard::Push). Loads are
  // not limited. REQUIRES: 0 or >= num_shards.
  uint64_t max_keys = 0;

  // -------- affects performance
  int num_shards = 64;  // hash maps with their own mutex. REQUIRES: 1..65536.
  int num_threads = 0;  // threads of one call; 0 = UsableCpus() (util/thread_pool.h).
  // Microseconds the pool's threads poll for the next step of a call before sleeping (ThreadPool;
  // 0 = sleep at once). REQUIRES: >= 0.
  int spin_wait_us = 0;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_ACCESSOR_OPTIONS_H_
