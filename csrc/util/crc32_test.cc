// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Crc32 (carry-less multiply path where the CPU has it) against the table-driven reference and known
// zlib values: every length 0..600 at every alignment 0..15, chaining, and large buffers.

#include "util/crc32.h"

#include <cstdio>
#include <random>
#include <vector>

#include "util/testharness.h"

namespace psembed {
namespace {

void TestKnownValues() {
  const char* s = "123456789";
  CHECK_EQ(Crc32(s, 9), 0xCBF43926u);  // the CRC-32/ISO-HDLC check value (zlib.crc32(b"123456789"))
  CHECK_EQ(Crc32Portable(s, 9), 0xCBF43926u);
  CHECK_EQ(Crc32(s, 0), 0u);
  CHECK_EQ(Crc32(s, 0, 1234u), 1234u);
  std::vector<uint8_t> zeros(4096, 0);
  CHECK_EQ(Crc32(zeros.data(), zeros.size()), 0xC71C0011u);  // zlib.crc32(bytes(4096))
  std::printf("crc32 accelerated: %d\n", Crc32IsAccelerated() ? 1 : 0);
}

void TestAgainstTables() {
  std::mt19937_64 rng(1);
  std::vector<uint8_t> buf(600 + 16 + 64);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t align = 0; align < 16; ++align) {
    for (size_t n = 0; n <= 600; ++n) {
      const uint32_t seed = static_cast<uint32_t>(rng());
      CHECK_EQ(Crc32(buf.data() + align, n, seed), Crc32Portable(buf.data() + align, n, seed));
    }
  }
  std::vector<uint8_t> big((size_t{8} << 20) + 77);
  for (auto& b : big) b = static_cast<uint8_t>(rng());
  const uint32_t whole = Crc32(big.data(), big.size());
  CHECK_EQ(whole, Crc32Portable(big.data(), big.size()));
  // Chained over uneven pieces == whole.
  uint32_t c = 0;
  size_t at = 0;
  while (at < big.size()) {
    const size_t piece = std::min<size_t>(big.size() - at, rng() % 100000);
    c = Crc32(big.data() + at, piece, c);
    at += piece;
  }
  CHECK_EQ(c, whole);
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestKnownValues);
  RUN_TEST(psembed::TestAgainstTables);
  return 0;
}
