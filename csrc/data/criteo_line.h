// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// The fast path of the Criteo reader: one tab-separated line (label, 13 integer columns, 26 categorical
// columns) to its 39 slot values, as torch_psembed/data/readers.py's CriteoParser.parse computes them:
//   label          "0" or "1"
//   integer I      "" -> kMissing; v > 0 -> bit_length(v) + kIntOffset; v <= 0 -> v + kIntOffset
//   categorical C  "" -> kMissing; 1 to 16 hex digits -> their value
//
// Contract: ParseCriteoLine returns true only when its answer is exactly the Python parser's. It returns
// false for every line it does not handle, bad or merely unusual (another column count, a label other
// than 0/1, an integer with a sign '+', spaces, underscores or more than 18 digits, one below
// -kIntOffset, a categorical value that is not plain hex (those are hashed with blake2b in Python), any
// byte >= 0x80): the caller then parses that line with the Python parser, which either gives the value
// or raises the error that names the problem. So the Python parser stays the one definition of the format.
//
// Why hand-written: the lines of a day are parsed on the training ranks (or their DataLoader workers), and
// the Python parser costs ~15 us a line (a sixth of a batch-256 step on 2 cores; docs/benchmarks.md,
// "Main job", session 7); no parser in the standard library does this format.
//
// Thread safety: a pure function.

#ifndef PSEMBED_DATA_CRITEO_LINE_H_
#define PSEMBED_DATA_CRITEO_LINE_H_

#include <cstddef>
#include <cstdint>

namespace psembed {

constexpr int kCriteoSlots = 39;
constexpr uint64_t kCriteoMissing = uint64_t{1} << 63;
constexpr uint64_t kCriteoIntOffset = uint64_t{1} << 33;

// Parses line[0, len) (a trailing run of '\r'/'\n' is ignored). On true, *label is 0 or 1 and values[0, 39)
// hold the slot values; on false, both are unspecified.
bool ParseCriteoLine(const char* line, size_t len, float* label, uint64_t* values);

}  // namespace psembed

#endif  // PSEMBED_DATA_CRITEO_LINE_H_
