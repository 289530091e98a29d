// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// PrefetchBytes: hints the cache about every 64-byte line of a small object read (or written) soon.
// TouchWord: reads the line of one word, for a loop whose only job is to bring a batch of lines in.
// PrefetchAfterFirstLine: the rest of an object after such a loop.
//
// Why not just its first and last byte: that covers an object of up to two lines, such as a dim-8
// AdaGrad record (64 bytes) or a gradient row of dim 8 (36 bytes), but an Adam record (144 bytes at dim 8)
// or a dim-32 row spans three to five lines, and the ones in between were then demand misses in the
// middle of the update (docs/benchmarks.md, "Table", session 15). Objects of up to two lines get the
// same two prefetches as before.
//
// always_inline: GCC 12 finds a function whose only effect is a prefetch "pure" and deletes calls to it
// that it has not inlined (the record prefetches of Pull and Push once vanished that way).

#ifndef PSEMBED_UTIL_PREFETCH_H_
#define PSEMBED_UTIL_PREFETCH_H_

#include <cstddef>
#include <cstdint>

namespace psembed {

constexpr size_t kCacheLineBytes = 64;

// Prefetches the lines of [p, p + bytes), bytes > 0; kWrite: for writing (rw = 1 of __builtin_prefetch).
template <int kWrite = 0>
__attribute__((always_inline)) inline void PrefetchBytes(const void* p, size_t bytes) {
  const char* first = static_cast<const char*>(p);
  const char* last = first + bytes - 1;
  __builtin_prefetch(first, kWrite);
  // Each step lands in the next line; the first step at or past `last` is not needed: `last` is next.
  for (const char* q = first + kCacheLineBytes; q < last; q += kCacheLineBytes) __builtin_prefetch(q, kWrite);
  __builtin_prefetch(last, kWrite);
}

// PrefetchBytes for the lines of [p, p + bytes) after p's own line (none for an object within one line):
// for an object whose first line a TouchWord loop has brought in already.
template <int kWrite = 0>
__attribute__((always_inline)) inline void PrefetchAfterFirstLine(const void* p, size_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p);
  const uintptr_t next_line = (first | (kCacheLineBytes - 1)) + 1;
  const uintptr_t end = first + bytes;
  if (next_line < end) PrefetchBytes<kWrite>(reinterpret_cast<const void*>(next_line), end - next_line);
}

// Loads the 4-byte word at p (4-byte aligned): a demand load where PrefetchBytes only hints. A loop of
// nothing but these keeps many misses in flight at once, as the core's out-of-order window spans many
// of its iterations; volatile keeps the compiler from dropping a load whose value is unused. Its few
// instructions are the point: a version that touched every line of a record, with the record's size
// worked out in the loop, lost most of the gain (docs/benchmarks.md, "Table", session 20).
inline void TouchWord(const void* p) { (void)*static_cast<const volatile uint32_t*>(p); }

}  // namespace psembed

#endif  // PSEMBED_UTIL_PREFETCH_H_
