// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// The fast path's own cases; tests/test_data.py checks it against the Python parser line by line.

#include "data/criteo_line.h"

#include <string>

#include "util/testharness.h"

namespace psembed {
namespace {

// A line from its label, 13 integer and 26 categorical columns (empty strings for missing ones).
std::string Line(const std::string& label, const std::string& ints, const std::string& cats) {
  std::string s = label;
  for (int i = 0; i < 13; ++i) s += "\t" + (i == 0 ? ints : std::string());
  for (int j = 0; j < 26; ++j) s += "\t" + (j == 0 ? cats : std::string());
  return s;
}

bool Parse(const std::string& s, float* label, uint64_t* v) { return ParseCriteoLine(s.data(), s.size(), label, v); }

void TestColumns() {
  float label = -1;
  uint64_t v[kCriteoSlots];
  CHECK(Parse(Line("1", "5", "68fd1e64") + "\r\n", &label, v));
  CHECK_EQ(label, 1.0f);
  CHECK_EQ(v[0], uint64_t{3} + kCriteoIntOffset);  // bit_length(5)
  for (int i = 1; i < 13; ++i) CHECK_EQ(v[i], kCriteoMissing);
  CHECK_EQ(v[13], 0x68fd1e64ULL);
  for (int j = 14; j < kCriteoSlots; ++j) CHECK_EQ(v[j], kCriteoMissing);
  CHECK(Parse(Line("0", "-2", "FFFFFFFFFFFFFFFF"), &label, v));
  CHECK_EQ(label, 0.0f);
  CHECK_EQ(v[0], kCriteoIntOffset - 2);  // v <= 0: v + offset
  CHECK_EQ(v[13], ~uint64_t{0});
  CHECK(Parse(Line("0", "0", "0"), &label, v));
  CHECK_EQ(v[0], kCriteoIntOffset);
  CHECK_EQ(v[13], 0u);
  CHECK(Parse(Line("0", "999999999999999999", ""), &label, v));  // 18 digits: bit_length 60
  CHECK_EQ(v[0], uint64_t{60} + kCriteoIntOffset);
}

void TestRefusedLinesGoToPython() {
  float label;
  uint64_t v[kCriteoSlots];
  const char* bad_ints[] = {"+5", " 5", "5 ", "1_000", "1234567890123456789", "-8589934593", "5a", "-"};
  for (const char* s : bad_ints) CHECK_EQ(Parse(Line("0", s, ""), &label, v), false);
  CHECK(Parse(Line("0", "-8589934592", ""), &label, v));  // exactly -offset: value 0
  CHECK_EQ(v[0], 0u);
  const char* bad_cats[] = {"0x1f", "12345678901234567", "zz", "-1f", "a b"};
  for (const char* s : bad_cats) CHECK_EQ(Parse(Line("0", "", s), &label, v), false);
  CHECK_EQ(Parse(Line("2", "", ""), &label, v), false);
  CHECK_EQ(Parse(Line("", "", ""), &label, v), false);
  CHECK_EQ(Parse(Line("01", "", ""), &label, v), false);
  CHECK_EQ(Parse(Line("0", "", "") + "\textra", &label, v), false);  // 41 columns
  const std::string short_line = Line("0", "", "");
  CHECK_EQ(Parse(short_line.substr(0, short_line.size() - 1), &label, v), false);  // 39 columns
  CHECK_EQ(Parse(Line("0", "", "caf\xc3\xa9"), &label, v), false);  // not ASCII
  CHECK_EQ(Parse("", &label, v), false);
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestColumns);
  RUN_TEST(psembed::TestRefusedLinesGoToPython);
  return 0;
}
