// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Crc32: zlib's crc32 (the reflected IEEE polynomial 0xEDB88320, initial and final XOR 0xffffffff), the
// checksum docs/format.md stores for every file of a save. Crc32(data, n, Crc32(prev, m)) continues a
// checksum like zlib.crc32(data, value).
//
// Why not zlib: the checksum of every saved and loaded byte sits on the save and load paths, and
// Python's zlib.crc32 (zlib 1.2.13, table driven) runs at ~2.2 GB/s here. On x86-64 with PCLMULQDQ this
// folds 64 bytes a step with carry-less multiplies (the method of Gopal et al., "Fast CRC Computation
// for Generic Polynomials Using PCLMULQDQ Instruction", Intel 2009), several times faster; elsewhere it
// is slicing-by-8 tables. The build has no -march, so the PCLMUL path is compiled for its own target
// and chosen at run time (cpuid).
//
// Thread safety: both functions are thread-safe (the tables are built once, thread-safely).

#ifndef PSEMBED_UTIL_CRC32_H_
#define PSEMBED_UTIL_CRC32_H_

#include <cstddef>
#include <cstdint>

namespace psembed {

// zlib.crc32(data[0, n), crc).
uint32_t Crc32(const void* data, size_t n, uint32_t crc = 0);

// The table-driven implementation alone (the reference the tests compare the fast path with).
uint32_t Crc32Portable(const void* data, size_t n, uint32_t crc = 0);

// Whether Crc32 uses the carry-less multiply path on this machine.
bool Crc32IsAccelerated();

}  // namespace psembed

#endif  // PSEMBED_UTIL_CRC32_H_
