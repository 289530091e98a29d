// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "util/thread_pool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <string>
#include <system_error>

namespace psembed {

namespace {

// A hint to the core that this is a polling loop (x86 PAUSE, AArch64 YIELD): it saves power and
// lets the other hyperthread run.
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Polls ready() until it is true or `micros` have passed; returns its last value.
template <typename Ready>
bool PollFor(int micros, Ready&& ready) {
  if (micros <= 0) return ready();
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(micros);
  for (;;) {
    if (ready()) return true;
    if (std::chrono::steady_clock::now() >= until) return ready();
    for (int i = 0; i < 16; ++i) CpuRelax();
  }
}

}  // namespace

// One ParallelFor call. Indices are claimed with fetch_add (relaxed is enough: the claim itself
// carries no data). `done` is written under mu, so the caller's condition-variable wait cannot miss the
// last task; it is atomic only so that the caller may poll it without mu. The caller takes mu after
// polling all the same (to read `error`), and that orders every task's writes before its return.
struct ThreadPool::Loop {
  size_t n = 0;
  const std::function<void(size_t)>* fn = nullptr;
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<size_t> done{0};   // written under mu
  std::exception_ptr error;      // guarded by mu: the first exception a task threw
  bool more_loops_follow = false;  // set before the loop is queued

  // Runs claimed indices until none remain. A throwing task still counts as done (so the caller's
  // wait ends); its exception is kept for the caller instead of reaching std::terminate on a worker.
  void Work() {
    size_t mine = 0;
    std::exception_ptr first;
    for (;;) {
      const size_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      try {
        (*fn)(i);
      } catch (...) {
        if (!first) first = std::current_exception();
      }
      ++mine;
    }
    if (mine > 0) {
      std::lock_guard<std::mutex> l(mu);
      if (first && !error) error = first;
      const size_t now_done = done.load(std::memory_order_relaxed) + mine;
      done.store(now_done, std::memory_order_relaxed);
      if (now_done == n) cv.notify_all();
    }
  }
};

int UsableCpus() {
  // The CPUs this process may run on (taskset, a container's cpuset): hardware_concurrency() counts the
  // host's, and a pool larger than the CPUs it may use only adds context switches. A CPU quota (cgroup
  // cpu.max) is not seen here.
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return static_cast<int>(std::thread::hardware_concurrency());
}

ThreadPool::ThreadPool(int num_threads, int spin_micros)
    : owner_pid_(static_cast<int>(getpid())), spin_micros_(std::max(0, spin_micros)), shared_(new Shared) {
  if (num_threads <= 0) num_threads = UsableCpus();
  if (num_threads <= 0) num_threads = 1;
  num_threads_ = num_threads;
  workers_.reserve(static_cast<size_t>(num_threads_ - 1));  // so only starting a thread can fail below
  try {
    for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this] { WorkerMain(); });
  } catch (const std::system_error& e) {
    const size_t started = workers_.size();
    StopAndJoinWorkers();
    throw std::system_error(e.code(), "cannot start " + std::to_string(num_threads_ - 1) +
                                          " worker threads for num_threads=" + std::to_string(num_threads_) +
                                          " (" + std::to_string(started) + " started)");
  } catch (...) {  // std::bad_alloc for a thread's state
    StopAndJoinWorkers();
    throw;
  }
}

bool ThreadPool::InForkedChild() const { return static_cast<int>(getpid()) != owner_pid_; }

ThreadPool::~ThreadPool() {
  if (InForkedChild()) {
    // The workers are threads of the parent: joining them here is undefined (and may abort), and a
    // std::thread destroyed while joinable terminates the process; their condition variable may still
    // count them as waiters (destroying it would block). Leak both instead.
    new std::vector<std::thread>(std::move(workers_));
    shared_.release();
    return;
  }
  StopAndJoinWorkers();
}

void ThreadPool::StopAndJoinWorkers() {
  {
    std::lock_guard<std::mutex> l(shared_->mu);
    shared_->stop = true;
  }
  shared_->cv.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::WorkerMain() {
  int poll_micros = 0;  // after a loop whose caller said another follows: spin_micros_
  for (;;) {
    std::shared_ptr<Loop> loop;
    {
      Shared& sh = *shared_;
      // The next loop of the same call usually comes within microseconds. (A pool being destroyed
      // meanwhile waits at most spin_micros_ longer for this worker.)
      PollFor(poll_micros, [&sh] { return sh.queued.load(std::memory_order_relaxed) > 0; });
      std::unique_lock<std::mutex> l(sh.mu);
      sh.cv.wait(l, [&sh] { return sh.stop || !sh.queue.empty(); });
      if (sh.queue.empty()) return;  // stop and nothing left
      loop = std::move(sh.queue.front());
      sh.queue.pop_front();
      sh.queued.store(sh.queue.size(), std::memory_order_relaxed);
    }
    loop->Work();
    poll_micros = loop->more_loops_follow ? spin_micros_ : 0;
  }
}

namespace {

// Every index on the calling thread, with the parallel path's contract: every index runs, and the first
// exception is rethrown after the last.
void RunOnCaller(size_t n, const std::function<void(size_t)>& fn) {
  std::exception_ptr error;
  for (size_t i = 0; i < n; ++i) {
    try {
      fn(i);
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace

void ThreadPool::ParallelFor(size_t n, const std::function<void(size_t)>& fn, int max_parallel,
                             bool more_loops_follow) {
  if (n == 0) return;
  if (n == 1 || workers_.empty() || max_parallel <= 1 || InForkedChild()) {
    RunOnCaller(n, fn);
    return;
  }
  std::shared_ptr<Loop> loop;
  const size_t helpers = std::min({workers_.size(), n - 1, static_cast<size_t>(max_parallel - 1)});
  try {
    loop = std::make_shared<Loop>();
    loop->n = n;
    loop->fn = &fn;  // fn outlives the loop's work: we wait for done == n below
    loop->more_loops_follow = more_loops_follow;
    std::lock_guard<std::mutex> l(shared_->mu);
    std::deque<std::shared_ptr<Loop>>& queue = shared_->queue;
    size_t queued = 0;
    try {
      for (; queued < helpers; ++queued) queue.push_back(loop);
    } catch (...) {
      // std::bad_alloc for a new deque block (push_back itself leaves the queue as it was). The
      // entries queued so far point at fn: take them back. They are the last `queued` ones, since mu has
      // been held throughout and no worker popped any. (No cost when nothing throws.)
      for (; queued > 0; --queued) queue.pop_back();
      throw;
    }
    shared_->queued.store(queue.size(), std::memory_order_relaxed);
  } catch (const std::bad_alloc&) {
    // Nothing is queued and no index ran: the caller runs them all, which allocates nothing.
    RunOnCaller(n, fn);
    return;
  }
  if (helpers == 1) {
    shared_->cv.notify_one();
  } else {
    shared_->cv.notify_all();
  }
  loop->Work();
  PollFor(std::max(spin_micros_, kMinCallerPollMicros),
          [&] { return loop->done.load(std::memory_order_relaxed) == n; });
  std::unique_lock<std::mutex> l(loop->mu);  // see Loop: orders the tasks' writes, guards error
  loop->cv.wait(l, [&] { return loop->done.load(std::memory_order_relaxed) == n; });
  // A helper that pops `loop` later finds no index left and never touches fn.
  if (loop->error) std::rethrow_exception(loop->error);
}

}  // namespace psembed
