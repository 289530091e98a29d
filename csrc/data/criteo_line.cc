// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "data/criteo_line.h"

namespace psembed {

namespace {

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// An integer column: "-"? then 1 to 18 decimal digits (so it fits int64 with room to spare).
bool IntColumn(const char* s, const char* e, uint64_t* out) {
  if (s == e) {
    *out = kCriteoMissing;
    return true;
  }
  const bool negative = *s == '-';
  if (negative) ++s;
  if (s == e || e - s > 18) return false;
  int64_t v = 0;
  for (; s < e; ++s) {
    if (*s < '0' || *s > '9') return false;
    v = v * 10 + (*s - '0');
  }
  if (negative) v = -v;
  if (v > 0) {
    uint64_t bits = 0;  // bit_length(v)
    for (uint64_t u = static_cast<uint64_t>(v); u != 0; u >>= 1) ++bits;
    *out = bits + kCriteoIntOffset;
    return true;
  }
  if (v < -static_cast<int64_t>(kCriteoIntOffset)) return false;  // the Python parser refuses it
  *out = static_cast<uint64_t>(v + static_cast<int64_t>(kCriteoIntOffset));
  return true;
}

// A categorical column: "" or 1 to 16 hex digits; anything else is hashed in Python.
bool CatColumn(const char* s, const char* e, uint64_t* out) {
  if (s == e) {
    *out = kCriteoMissing;
    return true;
  }
  if (e - s > 16) return false;
  uint64_t v = 0;
  for (; s < e; ++s) {
    const int d = HexDigit(*s);
    if (d < 0) return false;
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  *out = v;
  return true;
}

}  // namespace

bool ParseCriteoLine(const char* line, size_t len, float* label, uint64_t* values) {
  while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) --len;
  const char* end = line + len;
  const char* field = line;
  int column = 0;  // 0 = label, 1..13 integer, 14..39 categorical
  for (const char* p = line;; ++p) {
    if (p < end && static_cast<unsigned char>(*p) >= 0x80) return false;
    if (p < end && *p != '\t') continue;
    // [field, p) is column `column`
    if (column == 0) {
      if (p - field != 1 || (*field != '0' && *field != '1')) return false;
      *label = *field == '1' ? 1.0f : 0.0f;
    } else if (column <= 13) {
      if (!IntColumn(field, p, &values[column - 1])) return false;
    } else if (column < 40) {
      if (!CatColumn(field, p, &values[column - 1])) return false;
    }
    ++column;
    if (column > 40) return false;
    if (p == end) break;
    field = p + 1;
  }
  return column == 40;
}

}  // namespace psembed
