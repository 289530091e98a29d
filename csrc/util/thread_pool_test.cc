// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ThreadPool: every index runs exactly once, and a task's exception reaches the caller (never
// std::terminate on a worker), so a std::bad_alloc inside a table call becomes a Python MemoryError;
// whether the threads poll or sleep between loops changes neither.

#include "util/thread_pool.h"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>
#include <vector>

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

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestEveryIndexRunsOnce);
  RUN_TEST(psembed::TestPollingCallerSeesEveryTaskWrite);
  RUN_TEST(psembed::TestWorkersSleepingPastThePollAreWoken);
  RUN_TEST(psembed::TestExceptionReachesTheCaller);
#if defined(__SANITIZE_THREAD__)
  // TSan does not support a child of a multithreaded process running on (it may hang or report).
#else
  RUN_TEST(psembed::TestUsableAndDestructibleInAForkedChild);
#endif
  return 0;
}
