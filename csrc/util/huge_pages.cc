// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "util/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <new>

#include "util/round_up.h"

namespace psembed {

namespace {
// Below this, calloc: a mapping per small array would cost a syscall and a VMA for nothing.
constexpr size_t kMapThreshold = kHugePageBytes;

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels answer EINVAL and take the loop below
#endif

// A zero written into every 4 KiB page of [p, p + len) (volatile: nothing can elide it): makes each page
// resident and writable with one write fault (a read first would map the zero page, then fault again).
// In fresh memory, which reads zero, it changes nothing.
void WritePages(char* p, size_t len) {
  for (size_t off = 0; off < len; off += 4096) static_cast<volatile char*>(p)[off] = 0;
  if (len > 0) static_cast<volatile char*>(p)[len - 1] = 0;
}

// len bytes (a multiple of 4 KiB) of fresh anonymous memory starting on a 2 MiB boundary, its whole 2 MiB
// units advised huge; nullptr if mmap fails. noreserve: address space only (MAP_NORESERVE), not counted
// against the overcommit heuristic until touched.
void* MapAligned(size_t len, bool noreserve) {
  // Over-map by one huge page, then trim both ends so the start is 2 MiB-aligned.
  const size_t span = len + kHugePageBytes;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | (noreserve ? MAP_NORESERVE : 0), -1, 0);
  if (raw == MAP_FAILED) return nullptr;
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
  void* p = MapAligned(RoundUp(bytes, 4096), /*noreserve=*/false);
  if (p == nullptr) throw std::bad_alloc();
  if (prefault) HugePagePrefault(p, RoundUp(bytes, 4096));
  return p;
}

void* HugePageReserve(size_t bytes) { return MapAligned(RoundUp(bytes, kHugePageBytes), /*noreserve=*/true); }

void HugePagePrefault(void* p, size_t len) {
  if (len == 0) return;
  // madvise wants page-aligned bounds; the pages around [p, p + len) only become resident, unchanged.
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) / 4096 * 4096;
  const uintptr_t end = RoundUp(reinterpret_cast<uintptr_t>(p) + len, 4096);
  // In one call where the kernel can; else page by page, only in [p, p + len): the bytes around may be
  // someone else's, written concurrently.
  if (madvise(reinterpret_cast<void*>(first), end - first, MADV_POPULATE_WRITE) == 0) return;
  WritePages(static_cast<char*>(p), len);
}

void HugePageRelease(void* p, size_t len) {
  const uintptr_t first = RoundUp(reinterpret_cast<uintptr_t>(p), kHugePageBytes);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + len) / kHugePageBytes * kHugePageBytes;
  if (end > first) (void)madvise(reinterpret_cast<void*>(first), end - first, MADV_DONTNEED);
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
