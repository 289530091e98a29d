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

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and take the loop below
#endif

// A zero written into every 4 KiB page of [p, p + len), which reads zero: changes nothing but makes
// each page resident and writable.
void WritePages(char* p, size_t len) {
  for (size_t off = 0; off < len; off += 4096) static_cast<volatile char*>(p)[off] = 0;
  if (len > 0) static_cast<volatile char*>(p)[len - 1] = 0;
}

// WritePages of fresh anonymous memory (p page-aligned), in one call where the kernel can.
void Prefault(char* p, size_t len) {
  if (madvise(p, len, MADV_POPULATE_WRITE) == 0) return;
  WritePages(p, len);
}
}  // namespace

void* HugePageAlloc(size_t bytes, bool prefault) {
  if (bytes < kMapThreshold) {
    void* p = std::calloc(1, bytes);
    if (p == nullptr) throw std::bad_alloc();
    // calloc may hand out fresh mmap'd pages that it does not write (and a compiler may turn malloc +
    // memset into calloc): write each page with volatile stores, which nothing can elide.
    if (prefault) WritePages(static_cast<char*>(p), bytes);
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
  if (prefault) Prefault(reinterpret_cast<char*>(aligned), len);
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
