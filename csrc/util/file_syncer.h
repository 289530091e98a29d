// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// FileSyncer: fsyncs files on background threads while the caller goes on writing others.
//
// Why: a save writes its files into the page cache at CPU speed, and the kernel does not start writing
// them back before dirty memory reaches its background threshold (10% of RAM by default), so an fsync
// of every file at the end waits for the whole save to reach the disk with the CPUs idle. Syncing each
// file as soon as it is complete overlaps that disk time with the copying of the next files.
// Several threads on purpose: fsyncs of different files then share journal commits.
//
// Thread safety: Submit may be called from many threads at once; Finish from one, after the last
// Submit. The destructor calls Finish if the owner did not.

#ifndef PSEMBED_UTIL_FILE_SYNCER_H_
#define PSEMBED_UTIL_FILE_SYNCER_H_

#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "util/mutex.h"
#include "util/status.h"

namespace psembed {

class FileSyncer {
 public:
  // num_threads >= 1 background threads.
  explicit FileSyncer(int num_threads);
  ~FileSyncer();
  FileSyncer(const FileSyncer&) = delete;
  FileSyncer& operator=(const FileSyncer&) = delete;

  // Queues path (a written and closed file) for open + fsync + close on a background thread.
  void Submit(std::string path);

  // Waits until every submitted file is synced and the threads have stopped. Returns the first failure
  // (IOError naming the file) or OK; after a failure the files still queued are not synced (the save
  // fails anyway). Later calls return the same status.
  Status Finish();

 private:
  void ThreadMain() NO_THREAD_SAFETY_ANALYSIS;  // waits on cv_ with mu_'s native mutex

  Mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> queue_ GUARDED_BY(mu_);  // files waiting for a thread, oldest first
  bool closing_ GUARDED_BY(mu_) = false;
  Status first_error_ GUARDED_BY(mu_);
  std::vector<std::thread> threads_;  // joined by Finish
  bool finished_ = false;             // touched by the Finish caller only
};

}  // namespace psembed

#endif  // PSEMBED_UTIL_FILE_SYNCER_H_
