// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// A tiny test macro set for the C++ tests (no gtest: the build has no network to fetch it).
// CHECK* abort the process with the failing expression and location, so ctest and
// scripts/sanitize.sh see a failure.

#ifndef PSEMBED_UTIL_TESTHARNESS_H_
#define PSEMBED_UTIL_TESTHARNESS_H_

#include <cstdio>
#include <cstdlib>
#include <sstream>

#define PSEMBED_CHECK_MSG(cond, msg)                                                     \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::ostringstream psembed_os_;                                                    \
      psembed_os_ << msg;                                                                \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s %s\n", __FILE__, __LINE__, #cond,    \
                   psembed_os_.str().c_str());                                           \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

#define CHECK(cond) PSEMBED_CHECK_MSG(cond, "")
#define CHECK_EQ(a, b) PSEMBED_CHECK_MSG((a) == (b), "(" << (a) << " vs " << (b) << ")")
#define CHECK_NE(a, b) PSEMBED_CHECK_MSG((a) != (b), "(" << (a) << " vs " << (b) << ")")
#define CHECK_LE(a, b) PSEMBED_CHECK_MSG((a) <= (b), "(" << (a) << " vs " << (b) << ")")
#define CHECK_LT(a, b) PSEMBED_CHECK_MSG((a) < (b), "(" << (a) << " vs " << (b) << ")")

#define RUN_TEST(fn)                                  \
  do {                                                \
    std::fprintf(stderr, "[ RUN  ] %s\n", #fn);       \
    fn();                                             \
    std::fprintf(stderr, "[  OK  ] %s\n", #fn);       \
  } while (0)

#endif  // PSEMBED_UTIL_TESTHARNESS_H_
