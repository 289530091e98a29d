// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Key mixing, routing and the counter-based random numbers. Saved files and the rank that owns a key
// depend on these functions: they are FROZEN (tests/test_table_api.py pins golden values).
//
// Thread safety: pure functions.

#ifndef PSEMBED_UTIL_HASH_H_
#define PSEMBED_UTIL_HASH_H_

#include <cstddef>
#include <cstdint>

namespace psembed {

// The splitmix64 finalizer (Steele, Lea, Flood 2014): a bijection of uint64 with full avalanche.
// Server routing is Mix64(key) % num_parts.
inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// One full splitmix64 step on state x: Mix64(x + golden gamma).
inline uint64_t SplitMix64(uint64_t x) { return Mix64(x + 0x9e3779b97f4a7c15ULL); }

// The owner part of a key among num_parts servers. REQUIRES: num_parts > 0.
inline uint32_t Route(uint64_t key, uint32_t num_parts) {
  return static_cast<uint32_t>(Mix64(key) % num_parts);
}

// The hash used *inside* one table: a second mix, so that shard choice and hash-index position are
// independent of the server routing (Mix64(k) % num_parts). High 32 bits pick the shard, low bits
// the probe start.
inline uint64_t TableHash(uint64_t key) { return Mix64(key ^ 0x5851f42d4c957f2dULL); }

// Shard of a TableHash value among num_shards (multiply-shift range reduction of the high half).
inline uint32_t ShardOf(uint64_t table_hash, uint32_t num_shards) {
  return static_cast<uint32_t>(((table_hash >> 32) * num_shards) >> 32);
}

// Random stream ids (do not renumber: initial values depend on them).
enum RandomStream : uint64_t { kStreamLrInit = 1, kStreamMfInit = 2, kStreamAdmission = 3 };

// The counter-based generator: u in [0, 1) with 24 random bits,
//   u(seed, key, stream, i) = (SplitMix64(seed ^ Mix64(key) ^ ((stream << 56) + i)) >> 40) * 2^-24.
// Results depend only on the arguments, never on threads or call order.
inline double Uniform01(uint64_t seed, uint64_t key, uint64_t stream, uint64_t i) {
  const uint64_t x = SplitMix64(seed ^ Mix64(key) ^ ((stream << 56) + i));
  return static_cast<double>(x >> 40) * (1.0 / 16777216.0);
}

// Hash dedup of keys[0..n): writes the distinct keys to unique (room for n) in order of first
// occurrence and, for each i, inverse[i] = the position of keys[i] in unique. Returns the count.
size_t Dedup(const uint64_t* keys, size_t n, uint64_t* unique, int64_t* inverse);

// The positions grouped by distinct key, from Dedup's inverse (u distinct keys): for each j < u,
// order[starts[j] .. starts[j + 1]) (starts[u] = n implied) are the i with inverse[i] == j,
// ascending. A counting sort: O(n + u). REQUIRES: every inverse[i] in [0, u).
void GroupByInverse(const int64_t* inverse, size_t n, size_t u, int64_t* order, int64_t* starts);

// Dedup with the distinct keys grouped by owner Route(key, num_parts): unique[starts[p] .. starts[p + 1])
// are the distinct keys of part p in order of first occurrence, starts has num_parts + 1 entries
// (starts[num_parts] = the count returned), and unique[inverse[i]] == keys[i]. A sharded client's request
// plan in one call: each owner's keys are one contiguous slice, so requests need no gather and replies
// no scatter. REQUIRES: num_parts >= 1; unique and inverse have room for n.
size_t DedupByOwner(const uint64_t* keys, size_t n, uint32_t num_parts, uint64_t* unique, int64_t* inverse,
                    int64_t* starts);

}  // namespace psembed

#endif  // PSEMBED_UTIL_HASH_H_
