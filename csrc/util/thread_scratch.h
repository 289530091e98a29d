// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ScratchBuffer: a per-thread buffer reused across calls. A fresh multi-megabyte buffer per call costs
// more than the work it serves: its first touch page-faults (at 106k keys a dedup's 3 MB of slots took
// ~770 faults, 1-4 ms on a VM, against ~1 ms of probing). Reused, a buffer only grows.

#ifndef PSEMBED_UTIL_THREAD_SCRATCH_H_
#define PSEMBED_UTIL_THREAD_SCRATCH_H_

#include <cstddef>
#include <vector>

namespace psembed {

// Lends the caller's thread_local vector for one call, grown to at least n elements (contents
// unspecified: whatever an earlier call left). When the lease ends, a vector of more than
// kKeepElements is freed, so one huge call does not pin its scratch in the thread for good.
//
//   thread_local std::vector<uint64_t> tls_keys;
//   ScratchBuffer<uint64_t> keys(&tls_keys, n);  // keys.data()[0, n) usable until keys goes out of scope
//
// REQUIRES: one lease of a given vector at a time (the vector is thread_local, so: no recursion).
template <typename T>
class ScratchBuffer {
 public:
  static constexpr size_t kKeepElements = size_t{1} << 20;

  ScratchBuffer(std::vector<T>* slot, size_t n) : slot_(slot) {
    if (slot_->size() < n) slot_->resize(n);
  }
  ~ScratchBuffer() {
    if (slot_->size() > kKeepElements) std::vector<T>().swap(*slot_);
  }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;

  T* data() const { return slot_->data(); }

 private:
  std::vector<T>* const slot_;
};

}  // namespace psembed

#endif  // PSEMBED_UTIL_THREAD_SCRATCH_H_
