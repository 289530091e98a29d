// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Test only. Replaces the global operator new and delete of the test binary whose one .cc includes this
// header (include it in exactly one translation unit of a binary), so that a test can make allocations
// fail as they do when memory runs out, and check that what it calls stays consistent. The deletes are
// replaced too, so that a sanitizer's own operator delete never frees what this malloc returned.

#ifndef PSEMBED_UTIL_FAILING_NEW_FOR_TEST_H_
#define PSEMBED_UTIL_FAILING_NEW_FOR_TEST_H_

#include <atomic>
#include <cstdlib>
#include <new>

namespace psembed {
namespace failing_new {

inline std::atomic<long> countdown{-1};  // < 0: no allocation fails
inline std::atomic<bool> failing{false};  // every allocation fails (set by a persistent failure once it began)
inline std::atomic<bool> persistent{false};

// The k-th operator new from now on (0: the next) throws std::bad_alloc; with persistent, so does every
// one after it, until Stop().
inline void FailFrom(long k, bool persist = false) {
  failing.store(false);
  persistent.store(persist);
  countdown.store(k);
}
inline void Stop() {
  countdown.store(-1);
  failing.store(false);
  persistent.store(false);
}
inline bool ShouldFail() {
  if (failing.load(std::memory_order_relaxed)) return true;
  if (countdown.load(std::memory_order_relaxed) < 0) return false;
  if (countdown.fetch_sub(1) != 0) return false;
  if (persistent.load()) failing.store(true);
  return true;
}

// Every allocation fails for this object's lifetime.
class FailAll {
 public:
  FailAll() { FailFrom(0, /*persist=*/true); }
  ~FailAll() { Stop(); }
  FailAll(const FailAll&) = delete;
  FailAll& operator=(const FailAll&) = delete;
};

}  // namespace failing_new
}  // namespace psembed

void* operator new(std::size_t n) {
  if (psembed::failing_new::ShouldFail()) throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return ::operator new(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return ::operator new(n, std::nothrow); }
// These deletes free what the operator new above took from malloc; GCC, seeing free() of a pointer from a
// new-expression where it inlines one, warns anyway.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpragmas"
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }
#pragma GCC diagnostic pop

#endif  // PSEMBED_UTIL_FAILING_NEW_FOR_TEST_H_
