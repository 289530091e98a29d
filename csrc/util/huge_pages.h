// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Large zeroed allocations backed by transparent huge pages where the kernel allows it.
//
// Why: a table lookup is a few random reads spread over gigabytes. With 4 KiB pages nearly every
// one of them also misses the TLB (and, in a VM, pays a two-level page walk); 2 MiB pages cut the
// page-walk misses by ~500x. scripts/bench_table.py measures the effect (docs/benchmarks.md).
//
// HugePageAlloc maps fresh anonymous memory (mmap: zeroed, page-aligned, start 2 MiB-aligned) and
// asks for huge pages (madvise MADV_HUGEPAGE) on the whole 2 MiB units inside it only, so a tail
// that is not a multiple of 2 MiB stays on 4 KiB pages and never costs a huge page of RSS that the
// caller did not touch. Where THP is off ("never") or unknown, the advice is a no-op and this is a
// plain mmap. Small requests (< 2 MiB) are plain calloc: they would gain nothing.
//
// Thread safety: both functions are thread-safe.

#ifndef PSEMBED_UTIL_HUGE_PAGES_H_
#define PSEMBED_UTIL_HUGE_PAGES_H_

#include <cstddef>

namespace psembed {

constexpr size_t kHugePageBytes = size_t{2} << 20;

// Zeroed memory of `bytes` bytes (bytes > 0): 16-byte aligned (calloc) below 2 MiB, 2 MiB-aligned from
// there on. Throws std::bad_alloc.
//
// prefault: allocate every page now, writable (MADV_POPULATE_WRITE, or a write per page where the
// kernel lacks it), for arrays that will be read and written all over soon (a hash index's slots).
// Why: the first access to a fresh page that is a *read* (a probe looking for an empty slot) maps the
// shared zero page, and the write that follows must replace that mapping, flushing the TLB of every
// CPU running one of the process's threads: an inter-processor interrupt per page, a VM exit each in
// a VM (perf of a checkpoint load: ~15% of its cycles). Not for memory that is carved up gradually
// (slab chunks): prefaulting would make all of it resident at once.
void* HugePageAlloc(size_t bytes, bool prefault = false);

// Releases memory from HugePageAlloc(bytes), with the same `bytes`. p == nullptr is a no-op.
void HugePageFree(void* p, size_t bytes);

// Address space for sub-allocation (table/row_store/index_arena.h): RoundUp(bytes, 2 MiB) bytes, 2 MiB
// aligned, all advised huge, none resident until touched (MAP_NORESERVE). nullptr if the kernel refuses
// (strict overcommit, address space exhausted). Give it back with HugePageFree(p, RoundUp(bytes, 2 MiB)).
void* HugePageReserve(size_t bytes);
// Makes the pages of [p, p + len) resident and writable (in a reserved range: the huge pages that
// overlap it), in one call where the kernel has MADV_POPULATE_WRITE (Linux 5.14), which changes no byte;
// else by writing a zero into each page of [p, p + len), so for memory that reads zero or is zeroed next.
// The bytes around the range are never written. Any alignment.
void HugePagePrefault(void* p, size_t len);
// Gives back the memory of the whole 2 MiB pages inside [p, p + len) (MADV_DONTNEED: they read zero
// when touched again); the partly covered pages at either end stay as they are.
void HugePageRelease(void* p, size_t len);

}  // namespace psembed

#endif  // PSEMBED_UTIL_HUGE_PAGES_H_
