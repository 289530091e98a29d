// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "data/criteo_line.h"

#include <cstring>

namespace psembed {

namespace {

// Hex digit values by byte, -1 for every other byte (non-ASCII included): a table, not compares, because
// random hex ids mix digits and letters and the compares' branches then mispredict on most characters.
struct HexTable {
  int8_t value[256];
  constexpr HexTable() : value() {
    for (int c = 0; c < 256; ++c) value[c] = -1;
    for (int c = '0'; c <= '9'; ++c) value[c] = static_cast<int8_t>(c - '0');
    for (int c = 'a'; c <= 'f'; ++c) value[c] = static_cast<int8_t>(c - 'a' + 10);
    for (int c = 'A'; c <= 'F'; ++c) value[c] = static_cast<int8_t>(c - 'A' + 10);
  }
};
constexpr HexTable kHex;

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
    const unsigned d = static_cast<unsigned char>(*s) - unsigned{'0'};
    if (d > 9) return false;
    v = v * 10 + static_cast<int64_t>(d);
  }
  if (negative) v = -v;
  if (v > 0) {
    const uint64_t bit_length = 64 - static_cast<uint64_t>(__builtin_clzll(static_cast<uint64_t>(v)));
    *out = bit_length + kCriteoIntOffset;
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
  int bad = 0;
  for (; s < e; ++s) {
    const int d = kHex.value[static_cast<unsigned char>(*s)];
    bad |= d;  // -1 sets the sign bit
    v = (v << 4) | static_cast<uint64_t>(d & 15);
  }
  if (bad < 0) return false;
  *out = v;
  return true;
}

}  // namespace

bool ParseCriteoLine(const char* line, size_t len, float* label, uint64_t* values) {
  while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) --len;
  const char* const end = line + len;
  // Fields end at tabs (memchr: a vectorized scan). Every byte a field may hold is an ASCII digit, hex
  // letter or '-', so a non-ASCII byte fails its field's parse: no separate check is needed.
  const char* field = line;
  for (int column = 0; column < 40; ++column) {
    const char* tab = static_cast<const char*>(std::memchr(field, '\t', static_cast<size_t>(end - field)));
    const char* stop = tab != nullptr ? tab : end;
    if ((tab == nullptr) != (column == 39)) return false;  // fewer or more than 40 columns
    if (column == 0) {
      if (stop - field != 1 || (*field != '0' && *field != '1')) return false;
      *label = *field == '1' ? 1.0f : 0.0f;
    } else if (column <= 13) {
      if (!IntColumn(field, stop, &values[column - 1])) return false;
    } else if (!CatColumn(field, stop, &values[column - 1])) {
      return false;
    }
    field = stop + 1;
  }
  return true;
}

}  // namespace psembed
