// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// An annotated mutex and its RAII guard (after LevelDB's port/port_stdcxx.h and util/mutexlock.h).
// Under Clang, -Wthread-safety checks GUARDED_BY / EXCLUSIVE_LOCKS_REQUIRED; under GCC the
// annotations compile to nothing and serve as documentation.

#ifndef PSEMBED_UTIL_MUTEX_H_
#define PSEMBED_UTIL_MUTEX_H_

#include <condition_variable>
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
#define TRY_ACQUIRE(...) PSEMBED_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
#define TRY_ACQUIRE_SHARED(...) PSEMBED_THREAD_ANNOTATION(try_acquire_shared_capability(__VA_ARGS__))
#define SHARED_LOCKS_REQUIRED(...) PSEMBED_THREAD_ANNOTATION(requires_shared_capability(__VA_ARGS__))
#define NO_THREAD_SAFETY_ANALYSIS PSEMBED_THREAD_ANNOTATION(no_thread_safety_analysis)

namespace psembed {

class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }
  // Takes the lock only if it is free now; true if taken.
  bool TryLock() TRY_ACQUIRE(true) { return mu_.try_lock(); }
  std::mutex* native() { return &mu_; }

 private:
  std::mutex mu_;
};

// Tag for MutexLock: the caller already holds the mutex (e.g. taken by TryLock); the guard releases it.
struct AdoptLock {};
constexpr AdoptLock kAdoptLock{};

// Holds *mu for its lifetime.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ACQUIRE(mu) : mu_(mu) { mu_->Lock(); }
  MutexLock(Mutex* mu, AdoptLock) EXCLUSIVE_LOCKS_REQUIRED(mu) : mu_(mu) {}
  ~MutexLock() RELEASE() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

// A writer-preferring reader/writer lock. Many holders in shared mode, or one in exclusive mode; a
// waiting writer blocks new readers, so a stream of overlapping readers cannot starve it (glibc's
// default rwlock prefers readers). Not reentrant: a thread holding it in shared mode must not take it
// again (a waiting writer would deadlock them both).
class CAPABILITY("shared_mutex") SharedMutex {
 public:
  SharedMutex() = default;
  SharedMutex(const SharedMutex&) = delete;
  SharedMutex& operator=(const SharedMutex&) = delete;

  void LockShared() PSEMBED_THREAD_ANNOTATION(acquire_shared_capability()) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [this] { return !writer_ && writers_waiting_ == 0; });
    ++readers_;
  }
  // Takes it in shared mode only if no writer holds it or waits for it now; true if taken.
  bool TryLockShared() TRY_ACQUIRE_SHARED(true) {
    std::lock_guard<std::mutex> l(mu_);
    if (writer_ || writers_waiting_ > 0) return false;
    ++readers_;
    return true;
  }
  void UnlockShared() PSEMBED_THREAD_ANNOTATION(release_shared_capability()) {
    std::lock_guard<std::mutex> l(mu_);
    if (--readers_ == 0 && writers_waiting_ > 0) cv_.notify_all();
  }
  void Lock() ACQUIRE() {
    std::unique_lock<std::mutex> l(mu_);
    ++writers_waiting_;
    cv_.wait(l, [this] { return !writer_ && readers_ == 0; });
    --writers_waiting_;
    writer_ = true;
  }
  void Unlock() RELEASE() {
    std::lock_guard<std::mutex> l(mu_);
    writer_ = false;
    cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int readers_ = 0;          // guarded by mu_
  int writers_waiting_ = 0;  // guarded by mu_
  bool writer_ = false;      // guarded by mu_
};

class SCOPED_CAPABILITY ReaderMutexLock {
 public:
  explicit ReaderMutexLock(SharedMutex* mu) PSEMBED_THREAD_ANNOTATION(acquire_shared_capability(mu)) : mu_(mu) {
    mu_->LockShared();
  }
  // The caller already holds *mu in shared mode (e.g. taken by TryLockShared); the guard releases it.
  ReaderMutexLock(SharedMutex* mu, AdoptLock) SHARED_LOCKS_REQUIRED(mu) : mu_(mu) {}
  ~ReaderMutexLock() RELEASE() { mu_->UnlockShared(); }
  ReaderMutexLock(const ReaderMutexLock&) = delete;
  ReaderMutexLock& operator=(const ReaderMutexLock&) = delete;

 private:
  SharedMutex* const mu_;
};

class SCOPED_CAPABILITY WriterMutexLock {
 public:
  explicit WriterMutexLock(SharedMutex* mu) ACQUIRE(mu) : mu_(mu) { mu_->Lock(); }
  ~WriterMutexLock() RELEASE() { mu_->Unlock(); }
  WriterMutexLock(const WriterMutexLock&) = delete;
  WriterMutexLock& operator=(const WriterMutexLock&) = delete;

 private:
  SharedMutex* const mu_;
};

}  // namespace psembed

#endif  // PSEMBED_UTIL_MUTEX_H_
