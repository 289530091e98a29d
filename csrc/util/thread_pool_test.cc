// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ThreadPool: every index runs exactly once, and a task's exception reaches the caller (never
// std::terminate on a worker), so a std::bad_alloc inside a table call becomes a Python MemoryError;
// whether the threads poll or sleep between loops changes neither. A pool whose threads cannot all be
// started throws (no std::terminate, no thread left running), and a ParallelFor that fails to queue
// its helpers runs every index on the caller (this binary's operator new fails on request).

#include "util/thread_pool.h"

#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "util/failing_new_for_test.h"
#include "util/testharness.h"

namespace psembed {
namespace {

void TestEveryIndexRunsOnce() {
  for (int spin : {0, 50, 20000}) {
    ThreadPool pool(4, spin);
    for (bool more : {false, true}) {  // whether the workers poll for a next loop afterwards
      for (size_t n : {0u, 1u, 3u, 1000u}) {
        std::vector<std::atomic<int>> hits(n);
        pool.ParallelFor(n, [&](size_t i) { hits[i].fetch_add(1, std::memory_order_relaxed); }, 1 << 30, more);
        for (size_t i = 0; i < n; ++i) CHECK_EQ(hits[i].load(), 1);
      }
    }
  }
}

// The caller may end its wait by polling the loop's done count instead of on the condition variable:
// the tasks' plain (non-atomic) writes must still be visible to it when ParallelFor returns (TSan
// reports a race if nothing orders them before the caller's reads).
void TestPollingCallerSeesEveryTaskWrite() {
  ThreadPool pool(4, 20000);  // a poll long enough to end every wait below
  std::vector<int> out(256);
  for (int round = 0; round < 200; ++round) {
    pool.ParallelFor(out.size(), [&](size_t i) { out[i] = round * 1000 + static_cast<int>(i); }, 1 << 30,
                     /*more_loops_follow=*/round % 2 == 0);
    for (size_t i = 0; i < out.size(); ++i) CHECK_EQ(out[i], round * 1000 + static_cast<int>(i));
  }
}

// Loops further apart than the poll: the workers have gone to sleep each time and must be woken.
// The caller's tasks wait (up to 10 s) for another thread to run one, so the check does not depend on
// how soon the OS schedules a woken worker; a pool that never wakes its workers fails it.
void TestWorkersSleepingPastThePollAreWoken() {
  ThreadPool pool(2, 100);
  const std::thread::id caller = std::this_thread::get_id();
  for (int round = 0; round < 5; ++round) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    std::vector<std::atomic<int>> hits(32);
    std::atomic<bool> other{false};
    pool.ParallelFor(hits.size(), [&](size_t i) {
      if (std::this_thread::get_id() != caller) {
        other.store(true);
      } else {
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (!other.load() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
      }
      hits[i].fetch_add(1);
    });
    for (auto& h : hits) CHECK_EQ(h.load(), 1);
    CHECK(other.load());  // a worker woke and ran a task of this loop
  }
}

void TestExceptionReachesTheCaller() {
  ThreadPool pool(4);
  for (int round = 0; round < 50; ++round) {
    // Odd rounds take the serial path (max_parallel 1), which keeps the same contract.
    const int max_parallel = round % 2 == 0 ? 1 << 30 : 1;
    std::atomic<int> ran{0};
    bool caught = false;
    try {
      pool.ParallelFor(64, [&](size_t i) {
        ran.fetch_add(1, std::memory_order_relaxed);
        if (i % 7 == 3) throw std::bad_alloc();
      }, max_parallel);
    } catch (const std::bad_alloc&) {
      caught = true;
    }
    CHECK(caught);
    CHECK_EQ(ran.load(), 64);  // the other indices still ran
  }
  // The pool is still usable afterwards.
  std::atomic<int> ran{0};
  pool.ParallelFor(100, [&](size_t) { ran.fetch_add(1); });
  CHECK_EQ(ran.load(), 100);
}

// A forked child (a DataLoader worker) has the pool but not its workers: its loops run on the calling
// thread and destroying the pool there returns (joining the parent's threads would abort the child).
void TestUsableAndDestructibleInAForkedChild() {
  auto pool = std::make_unique<ThreadPool>(4);
  std::atomic<int> warm{0};
  pool->ParallelFor(100, [&](size_t) { warm.fetch_add(1); });  // the workers exist and have run
  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    std::vector<int> hits(1000, 0);
    pool->ParallelFor(hits.size(), [&](size_t i) { hits[i] += 1; });
    int bad = 0;
    for (int h : hits) bad += h != 1;
    pool.reset();
    _exit(bad == 0 ? 0 : 1);
  }
  int status = 0;
  CHECK_EQ(waitpid(pid, &status, 0), pid);
  CHECK(WIFEXITED(status));
  CHECK_EQ(WEXITSTATUS(status), 0);
  std::atomic<int> ran{0};
  pool->ParallelFor(100, [&](size_t) { ran.fetch_add(1); });  // the parent's pool is untouched
  CHECK_EQ(ran.load(), 100);
}

void FailAllocation(long k) { failing_new::FailFrom(k); }
void AllocationsSucceed() { failing_new::Stop(); }

// The threads of this process (Threads: in /proc/self/status).
int ThreadCount() {
  FILE* f = std::fopen("/proc/self/status", "r");
  CHECK(f != nullptr);
  char line[256];
  int n = -1;
  while (std::fgets(line, sizeof(line), f)) {
    if (std::strncmp(line, "Threads:", 8) == 0) n = std::atoi(line + 8);
  }
  std::fclose(f);
  CHECK(n > 0);
  return n;
}

// A worker that cannot be started (here std::thread's own allocation fails) used to leave the started
// ones joinable, and destroying them called std::terminate: a Python process creating a Table died.
// Now the constructor stops and joins them and rethrows: with the k-th allocation failing for every k
// up to past the last thread, construction either succeeds or throws std::bad_alloc, and no thread is
// left behind.
void TestFailedThreadStartJoinsTheStartedOnes() {
  const int threads_before = ThreadCount();
  int failed_after_some_started = 0;
  for (long k = 0; k < 24; ++k) {
    bool threw = false;
    FailAllocation(k);
    try {
      ThreadPool pool(12);
      AllocationsSucceed();
      std::atomic<int> ran{0};
      pool.ParallelFor(100, [&](size_t) { ran.fetch_add(1); });
      CHECK_EQ(ran.load(), 100);
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    AllocationsSucceed();
    if (threw && k >= 6) ++failed_after_some_started;  // ~4 allocations precede the first thread's
    CHECK_EQ(ThreadCount(), threads_before);
  }
  CHECK(failed_after_some_started >= 5);
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
// A thread that the system refuses (EAGAIN: a pids limit, or `ulimit -v` with 8 MiB stacks) gives a
// std::system_error that names what could not be done; the binding turns it into a RuntimeError. In a
// child process whose address space is capped just above what it uses now. (Not under ASan or TSan:
// their runtimes need address space of their own and abort instead.)
void TestThreadsTheSystemRefusesGiveANamedError() {
  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    long vm_kib = -1;
    if (FILE* f = std::fopen("/proc/self/status", "r")) {
      char line[256];
      while (std::fgets(line, sizeof(line), f)) {
        if (std::strncmp(line, "VmSize:", 7) == 0) vm_kib = std::atol(line + 7);
      }
      std::fclose(f);
    }
    if (vm_kib <= 0) _exit(2);
    const rlim_t cap = (static_cast<rlim_t>(vm_kib) << 10) + (rlim_t{64} << 20);
    struct rlimit rl;
    getrlimit(RLIMIT_AS, &rl);
    rl.rlim_cur = cap;
    if (setrlimit(RLIMIT_AS, &rl) != 0) _exit(2);
    try {
      ThreadPool pool(1024);
      _exit(3);  // 1023 stacks fitted in 64 MiB?
    } catch (const std::system_error& e) {
      const std::string what = e.what();
      if (what.find("cannot start 1023 worker threads") == std::string::npos) {
        std::fprintf(stderr, "unexpected message: %s\n", what.c_str());
        _exit(4);
      }
      _exit(0);
    } catch (...) {
      _exit(5);
    }
  }
  int status = 0;
  CHECK_EQ(waitpid(pid, &status, 0), pid);
  CHECK(WIFEXITED(status));
  CHECK_EQ(WEXITSTATUS(status), 0);
}
#endif

// ParallelFor queues one entry per helper, each pointing at the caller's fn. A std::bad_alloc from the
// queue (a new deque block: libstdc++ holds 32 entries per block, so 63 helpers cross one) used to leave
// the entries queued before it, and after the caller's fn was gone a worker called it
// (heap-use-after-free). Now the entries queued before the failure are taken back and the caller runs
// every index itself: nothing throws, nothing stays queued, and each index runs once.
void TestFailedQueueingRunsEveryIndexOnTheCaller() {
  // Queueing used to throw with entries queued that pointed at fn, destroyed as the exception unwound
  // (a use-after-free by the workers); then it threw cleanly, which left a bulk load's phase 2 half done.
  // Now the caller runs every index itself, once, and nothing stays queued.
  for (long k = 0; k < 4; ++k) {
    auto pool = std::make_unique<ThreadPool>(64);
    constexpr size_t kN = 10000;
    std::vector<std::atomic<int>> hits(kN);
    const std::function<void(size_t)> fn = [&](size_t i) { hits[i].fetch_add(1); };
    FailAllocation(k);  // the Loop's allocation, a deque block with helpers already queued, ...
    pool->ParallelFor(kN, fn);
    AllocationsSucceed();
    pool.reset();  // the workers run whatever is still queued before they exit
    for (size_t i = 0; i < kN; ++i) CHECK_EQ(hits[i].load(), 1);
  }
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestEveryIndexRunsOnce);
  RUN_TEST(psembed::TestPollingCallerSeesEveryTaskWrite);
  RUN_TEST(psembed::TestWorkersSleepingPastThePollAreWoken);
  RUN_TEST(psembed::TestExceptionReachesTheCaller);
  RUN_TEST(psembed::TestFailedQueueingRunsEveryIndexOnTheCaller);
  RUN_TEST(psembed::TestFailedThreadStartJoinsTheStartedOnes);
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  RUN_TEST(psembed::TestThreadsTheSystemRefusesGiveANamedError);
#endif
#if defined(__SANITIZE_THREAD__)
  // TSan does not support a child of a multithreaded process running on (it may hang or report).
#else
  RUN_TEST(psembed::TestUsableAndDestructibleInAForkedChild);
#endif
  return 0;
}
