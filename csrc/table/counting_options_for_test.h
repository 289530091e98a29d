// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// CountingOptions (tests only): a table whose numbers stay small exact integers under concurrency, so a
// test can check totals exactly. SGD with lr = 1 and no init noise on both parts, mf from the first push,
// decay 1 and no deletion: pushing gradient -1 with show 1 per key occurrence makes every row's show,
// lr weight and mf components equal the number of times its key was pushed.

#ifndef PSEMBED_TABLE_COUNTING_OPTIONS_FOR_TEST_H_
#define PSEMBED_TABLE_COUNTING_OPTIONS_FOR_TEST_H_

#include "table/accessor_options.h"

namespace psembed {

inline TableOptions CountingOptions(int num_threads, int num_shards = 16, int dim = 4) {
  TableOptions o;
  o.dim = dim;
  o.num_shards = num_shards;
  o.num_threads = num_threads;
  RuleOptions sgd;
  sgd.kind = RuleOptions::kSgd;
  sgd.learning_rate = 1.0;
  sgd.initial_range = 0.0;
  sgd.min_bound = -1e9;
  sgd.max_bound = 1e9;
  o.lr_rule = sgd;
  o.mf_rule = sgd;
  o.accessor.embedx_threshold = 0.0;
  o.accessor.show_click_decay_rate = 1.0;
  o.accessor.delete_threshold = 0.0;
  o.accessor.delete_after_unseen_days = 1 << 20;
  return o;
}

}  // namespace psembed

#endif  // PSEMBED_TABLE_COUNTING_OPTIONS_FOR_TEST_H_
