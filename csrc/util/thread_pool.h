// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ThreadPool: a fixed set of worker threads that help callers run ParallelFor loops.
//
// Thread safety: ParallelFor may be called from many threads at once. The calling thread always
// takes part in its own loop, so a loop finishes even if every worker is busy with other loops (no
// deadlock when pools are saturated, and nested use from inside a task cannot starve).
//
// Fork: a child process (a DataLoader worker, say) gets a copy of the pool but none of its worker
// threads, and possibly a copy of a mutex taken by one of them. There, ParallelFor runs every index on
// the calling thread, and the destructor neither locks, joins nor destroys the shared state (it leaks
// the thread handles, which name threads of the parent, and the state the parent's threads wait on), so
// a pool garbage-collected in a forked child neither aborts nor hangs it.

#ifndef PSEMBED_UTIL_THREAD_POOL_H_
#define PSEMBED_UTIL_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace psembed {

// The CPUs this process may run on (its affinity mask), or hardware_concurrency() if that is unknown.
int UsableCpus();

class ThreadPool {
 public:
  // spin_micros: how long a worker polls for the next loop of the same call (see ParallelFor's
  // more_loops_follow), and a caller for its loop's last tasks, before sleeping on a condition variable.
  // One pull or push runs three loops back to back, and each wake-up (an IPI, and on a VM a halted vCPU
  // to reschedule) is on the call's critical path: in a process doing only table calls, 50 us made
  // 2-thread calls 0-14% faster. Beside other busy threads (torch's, in a training step) polling workers
  // take their cores, so the default is 0: a worker sleeps at once (docs/benchmarks.md, "Table",
  // sessions 15 and 18).
  static constexpr int kDefaultSpinMicros = 0;
  // The caller polls at least this long whatever spin_micros is. It waits only for the last tasks of
  // its own loop (at most one chunk of work), on a core that has nothing else of the call to do, and
  // then skips being woken: 2-thread pulls and pushes faster in 15 of 16 paired runs (0.98x-1.05x), with
  // PSEmbedding steps beside torch's threads no slower (docs/benchmarks.md, "Table", session 18).
  static constexpr int kMinCallerPollMicros = 50;

  // num_threads: total parallelism of one loop, the caller included (so num_threads - 1 workers).
  // 0 means UsableCpus(). spin_micros >= 0: see kDefaultSpinMicros.
  //
  // Throws std::system_error if the system refuses a worker thread (EAGAIN: a pids limit, `ulimit -v`
  // with 8 MiB stacks), its message naming the count ("cannot start 4095 worker threads ..."), or
  // std::bad_alloc; the workers already started are stopped and joined first (a joinable std::thread
  // destroyed by the unwinding would std::terminate the process). It does not run with fewer threads:
  // num_threads is the pool's size, what num_threads() reports and what a table's settable thread
  // count is capped at, so a smaller pool would quietly differ from the configuration; the caller can
  // ask for fewer.
  explicit ThreadPool(int num_threads, int spin_micros = kDefaultSpinMicros);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Runs fn(i) for every i in [0, n), on at most max_parallel threads (the caller included), and
  // returns when all calls returned. If some fn(i) threw (std::bad_alloc, say), the other indices still
  // run and the first exception is rethrown here, on the calling thread, after all calls returned.
  // Allocates nothing it cannot do without: if the loop cannot be set up (std::bad_alloc for it or a
  // queue block), nothing is queued and the caller runs every index itself, so a caller that must not
  // fail half-way (a bulk load's phase 2) can count on ParallelFor to throw only what fn throws.
  // more_loops_follow: the caller starts another loop right after this one, so the workers that ran
  // this one poll for it (up to the spin time) instead of going to sleep.
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn, int max_parallel = 1 << 30,
                   bool more_loops_follow = false);

 private:
  struct Loop;
  void WorkerMain();
  // Sets stop, wakes the workers and joins them (each first drains the queue).
  void StopAndJoinWorkers();

  bool InForkedChild() const;

  // What the workers share. On the heap, so that a forked child can leak it: destroying a condition
  // variable that the parent's (absent) workers were waiting on blocks forever in glibc.
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::shared_ptr<Loop>> queue;  // guarded by mu
    bool stop = false;                        // guarded by mu
    // queue.size(), written under mu; read without it only by a polling worker, as a hint (the
    // worker then takes mu and checks the queue itself).
    std::atomic<size_t> queued{0};
  };

  int num_threads_;  // immutable after construction
  const int owner_pid_;  // the process that started the workers
  const int spin_micros_;
  std::unique_ptr<Shared> shared_;
  std::vector<std::thread> workers_;
};

}  // namespace psembed

#endif  // PSEMBED_UTIL_THREAD_POOL_H_
