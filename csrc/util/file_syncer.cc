// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "util/file_syncer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace psembed {

namespace {
Status SyncPath(const std::string& path) {
  int fd;
  do {
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return Status::IOError(path + ": open for fsync: " + std::strerror(errno));
  // No retry on EINTR: after a failed fsync the page state is unspecified, so the save must fail.
  const int rc = ::fsync(fd);
  const int e = errno;
  ::close(fd);
  if (rc != 0) return Status::IOError(path + ": fsync: " + std::strerror(e));
  return Status::OK();
}
}  // namespace

FileSyncer::FileSyncer(int num_threads) {
  if (num_threads < 1) num_threads = 1;
  threads_.reserve(num_threads);
  try {
    for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { ThreadMain(); });
  } catch (...) {
    // Out of threads (std::system_error): stop the ones started, so that no joinable std::thread is
    // destroyed (std::terminate), then let the caller see the error.
    Finish();
    throw;
  }
}

FileSyncer::~FileSyncer() { Finish(); }

void FileSyncer::Submit(std::string path) {
  {
    MutexLock l(&mu_);
    queue_.push_back(std::move(path));
  }
  cv_.notify_one();
}

Status FileSyncer::Finish() {
  if (!finished_) {
    {
      MutexLock l(&mu_);
      closing_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
    finished_ = true;
  }
  MutexLock l(&mu_);
  return first_error_;
}

void FileSyncer::ThreadMain() {
  std::unique_lock<std::mutex> l(*mu_.native());
  for (;;) {
    cv_.wait(l, [this] { return closing_ || !queue_.empty(); });
    if (queue_.empty()) return;  // closing and drained
    std::string path = std::move(queue_.front());
    queue_.pop_front();
    const bool skip = !first_error_.ok();  // the save fails anyway: do not wait for the disk
    l.unlock();
    const Status st = skip ? Status::OK() : SyncPath(path);
    l.lock();
    if (!st.ok() && first_error_.ok()) first_error_ = st;
  }
}

}  // namespace psembed
