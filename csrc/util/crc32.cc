// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "util/crc32.h"

#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PSEMBED_CRC32_CLMUL 1
#include <immintrin.h>
#endif

namespace psembed {

namespace {

// Slicing-by-8 tables of the reflected polynomial.
struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int k = 1; k < 8; ++k) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
    }
  }
};

const Tables& GetTables() {
  static const Tables tables;
  return tables;
}

// c is the register (already XORed with 0xffffffff); returns the register after data.
uint32_t UpdateTables(uint32_t c, const uint8_t* p, size_t n) {
  const auto& t = GetTables().t;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    c = t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    --n;
  }
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);  // little-endian (x86-64, aarch64)
    v ^= c;
    c = t[7][v & 0xff] ^ t[6][(v >> 8) & 0xff] ^ t[5][(v >> 16) & 0xff] ^ t[4][(v >> 24) & 0xff] ^
        t[3][(v >> 32) & 0xff] ^ t[2][(v >> 40) & 0xff] ^ t[1][(v >> 48) & 0xff] ^ t[0][v >> 56];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) c = t[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return c;
}

#ifdef PSEMBED_CRC32_CLMUL
// Folding constants of the reflected polynomial (x^k mod P, bit-reflected, as in Gopal et al.):
// fold 512 bits, fold 128 bits, 64 -> 32 bits, and Barrett's P' and mu.
constexpr uint64_t kFold512Lo = 0x0154442bd4, kFold512Hi = 0x01c6e41596;
constexpr uint64_t kFold128Lo = 0x01751997d0, kFold128Hi = 0x00ccaa009e;
constexpr uint64_t kFold64 = 0x0163cd6124;
constexpr uint64_t kPoly = 0x01db710641, kMu = 0x01f7011641;

#define PSEMBED_CLMUL_TARGET __attribute__((target("pclmul,sse4.1")))

PSEMBED_CLMUL_TARGET inline __m128i Load(const uint8_t* q) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
}

// One fold: x's 128 bits carried forward by the distance k encodes (its low half times k's low half,
// its high half times k's high half).
PSEMBED_CLMUL_TARGET inline __m128i Fold(__m128i x, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

// The register after data[0, n). REQUIRES: n >= 64 and a multiple of 16.
PSEMBED_CLMUL_TARGET uint32_t UpdateClmul(uint32_t c, const uint8_t* p, size_t n) {
  auto& load = Load;
  auto& fold = Fold;
  __m128i acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = load(p + 16 * i);
  acc[0] = _mm_xor_si128(acc[0], _mm_cvtsi32_si128(static_cast<int>(c)));
  p += 64;
  n -= 64;
  const __m128i k512 = _mm_set_epi64x(static_cast<long long>(kFold512Hi), static_cast<long long>(kFold512Lo));
  for (; n >= 64; p += 64, n -= 64) {
    for (int i = 0; i < 4; ++i) acc[i] = _mm_xor_si128(fold(acc[i], k512), load(p + 16 * i));
  }
  const __m128i k128 = _mm_set_epi64x(static_cast<long long>(kFold128Hi), static_cast<long long>(kFold128Lo));
  __m128i x = acc[0];
  for (int i = 1; i < 4; ++i) x = _mm_xor_si128(fold(x, k128), acc[i]);
  for (; n >= 16; p += 16, n -= 16) x = _mm_xor_si128(fold(x, k128), load(p));
  // 128 -> 64 bits: the low half times x^64-ish constant (k128's high), added to the high half.
  const __m128i low32 = _mm_setr_epi32(-1, 0, -1, 0);
  x = _mm_xor_si128(_mm_srli_si128(x, 8), _mm_clmulepi64_si128(x, k128, 0x10));
  // 64 -> 32 bits.
  const __m128i k64 = _mm_set_epi64x(0, static_cast<long long>(kFold64));
  x = _mm_xor_si128(_mm_srli_si128(x, 4), _mm_clmulepi64_si128(_mm_and_si128(x, low32), k64, 0x00));
  // Barrett reduction to the 32-bit remainder.
  const __m128i pmu = _mm_set_epi64x(static_cast<long long>(kMu), static_cast<long long>(kPoly));
  __m128i q = _mm_clmulepi64_si128(_mm_and_si128(x, low32), pmu, 0x10);
  q = _mm_clmulepi64_si128(_mm_and_si128(q, low32), pmu, 0x00);
  x = _mm_xor_si128(x, q);
  return static_cast<uint32_t>(_mm_extract_epi32(x, 1));
}

bool DetectClmul() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}
#endif

}  // namespace

uint32_t Crc32Portable(const void* data, size_t n, uint32_t crc) {
  return ~UpdateTables(~crc, static_cast<const uint8_t*>(data), n);
}

bool Crc32IsAccelerated() {
#ifdef PSEMBED_CRC32_CLMUL
  static const bool has = DetectClmul();
  return has;
#else
  return false;
#endif
}

uint32_t Crc32(const void* data, size_t n, uint32_t crc) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
#ifdef PSEMBED_CRC32_CLMUL
  if (n >= 64 && Crc32IsAccelerated()) {
    const size_t bulk = n & ~size_t{15};
    c = UpdateClmul(c, p, bulk);
    p += bulk;
    n -= bulk;
  }
#endif
  return ~UpdateTables(c, p, n);
}

}  // namespace psembed
