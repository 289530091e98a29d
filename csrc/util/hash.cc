// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Everything in hash.h is inline (it sits on the pull/push fast path); this file only anchors the
// translation unit so the library layout mirrors the headers.

#include "util/hash.h"

namespace psembed {
namespace {
static_assert(sizeof(uint64_t) == 8, "feasigns are 64-bit");
}  // namespace
}  // namespace psembed
