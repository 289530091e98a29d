// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ThreadPool: a fixed set of worker threads that help callers run ParallelFor loops.
//
// Thread safety: ParallelFor may be called from many threads at once. The calling thread always
// takes part in its own loop, so a loop finishes even if every worker is busy with other loops (no
// deadlock when pools are saturated, and nested use from inside a task cannot starve).

#ifndef PSEMBED_UTIL_THREAD_POOL_H_
#define PSEMBED_UTIL_THREAD_POOL_H_

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace psembed {

class ThreadPool {
 public:
  // num_threads: total parallelism of one loop, the caller included (so num_threads - 1 workers).
  // 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Runs fn(i) for every i in [0, n), on at most max_parallel threads (the caller included), and
  // returns when all calls returned. If some fn(i) threw (std::bad_alloc, say), the other indices still
  // run and the first exception is rethrown here, on the calling thread, after all calls returned.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn, int max_parallel = 1 << 30);

 private:
  struct Loop;
  void WorkerMain();

  int num_threads_;  // immutable after construction
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Loop>> queue_;  // guarded by mu_
  bool stop_ = false;                        // guarded by mu_
  std::vector<std::thread> workers_;
};

}  // namespace psembed

#endif  // PSEMBED_UTIL_THREAD_POOL_H_
