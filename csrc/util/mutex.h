// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// An annotated mutex and its RAII guard (after LevelDB's port/port_stdcxx.h and util/mutexlock.h).
// Under Clang, -Wthread-safety checks GUARDED_BY / EXCLUSIVE_LOCKS_REQUIRED; under GCC the
// annotations compile to nothing and serve as documentation.

#ifndef PSEMBED_UTIL_MUTEX_H_
#define PSEMBED_UTIL_MUTEX_H_

#include <mutex>

#if defined(__clang__)
#define PSEMBED_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define PSEMBED_THREAD_ANNOTATION(x)
#endif

#define CAPABILITY(x) PSEMBED_THREAD_ANNOTATION(capability(x))
#define SCOPED_CAPABILITY PSEMBED_THREAD_ANNOTATION(scoped_lockable)
#define GUARDED_BY(x) PSEMBED_THREAD_ANNOTATION(guarded_by(x))
#define EXCLUSIVE_LOCKS_REQUIRED(...) PSEMBED_THREAD_ANNOTATION(exclusive_locks_required(__VA_ARGS__))
#define LOCKS_EXCLUDED(...) PSEMBED_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
#define ACQUIRE(...) PSEMBED_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define RELEASE(...) PSEMBED_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define NO_THREAD_SAFETY_ANALYSIS PSEMBED_THREAD_ANNOTATION(no_thread_safety_analysis)

namespace psembed {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }
  std::mutex* native() { return &mu_; }

 private:
  std::mutex mu_;
};

// Holds *mu for its lifetime.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ACQUIRE(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() RELEASE() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

}  // namespace psembed

#endif  // PSEMBED_UTIL_MUTEX_H_
