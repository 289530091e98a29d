// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "util/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <new>

namespace psembed {

namespace {
// Below this, calloc: a mapping per small array would cost a syscall and a VMA for nothing.
constexpr size_t kMapThreshold = kHugePageBytes;

size_t RoundUp(size_t x, size_t to) { return (x + to - 1) / to * to; }
}  // namespace

void* HugePageAlloc(size_t bytes) {
  if (bytes < kMapThreshold) {
    void* p = std::calloc(1, bytes);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  // Over-map by one huge page, then trim both ends so the start is 2 MiB-aligned.
  const size_t len = RoundUp(bytes, 4096);
  const size_t span = len + kHugePageBytes;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = RoundUp(start, kHugePageBytes);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t end = start + span;
  if (end > aligned + len) munmap(reinterpret_cast<void*>(aligned + len), end - (aligned + len));
#ifdef MADV_HUGEPAGE
  const size_t whole = len / kHugePageBytes * kHugePageBytes;
  // Advice only: failure (THP compiled out, old kernel) leaves ordinary pages, which still work.
  if (whole > 0) (void)madvise(reinterpret_cast<void*>(aligned), whole, MADV_HUGEPAGE);
#endif
  return reinterpret_cast<void*>(aligned);
}

void HugePageFree(void* p, size_t bytes) {
  if (p == nullptr) return;
  if (bytes < kMapThreshold) {
    std::free(p);
    return;
  }
  munmap(p, RoundUp(bytes, 4096));
}

}  // namespace psembed
