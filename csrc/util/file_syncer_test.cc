// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// FileSyncer: files submitted from several threads are all synced, a failure names its file, an idle
// syncer stops.

#include "util/file_syncer.h"

#include <unistd.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "util/testharness.h"

namespace psembed {
namespace {

std::string TempDir() {
  char tmpl[] = "/tmp/file_syncer_test.XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  CHECK(d != nullptr);
  return d;
}

void WriteFile(const std::string& path, const std::string& data) {
  FILE* f = std::fopen(path.c_str(), "wb");
  CHECK(f != nullptr);
  CHECK(std::fwrite(data.data(), 1, data.size(), f) == data.size());
  CHECK(std::fclose(f) == 0);
}

// Many files submitted from several threads at once are all synced; Finish is OK and idempotent.
void TestSyncsFilesSubmittedFromManyThreads() {
  const std::string dir = TempDir();
  std::vector<std::string> paths;
  {
    FileSyncer syncer(4);
    std::vector<std::thread> writers;
    for (int w = 0; w < 4; ++w) {
      writers.emplace_back([&, w] {
        for (int i = 0; i < 25; ++i) {
          const std::string p = dir + "/f" + std::to_string(w) + "_" + std::to_string(i);
          WriteFile(p, std::string(4096 + i, 'x'));
          syncer.Submit(p);
        }
      });
    }
    for (auto& t : writers) t.join();
    CHECK(syncer.Finish().ok());
    CHECK(syncer.Finish().ok());
  }
  for (int w = 0; w < 4; ++w) {
    for (int i = 0; i < 25; ++i) CHECK(::unlink((dir + "/f" + std::to_string(w) + "_" + std::to_string(i)).c_str()) == 0);
  }
  CHECK(::rmdir(dir.c_str()) == 0);
}

// A file that cannot be synced (here: it does not exist) makes Finish return IOError naming it.
void TestFailureNamesTheFile() {
  const std::string dir = TempDir();
  const std::string good = dir + "/good";
  WriteFile(good, "abc");
  FileSyncer syncer(2);
  syncer.Submit(good);
  syncer.Submit(dir + "/missing");
  const Status st = syncer.Finish();
  CHECK(!st.ok());
  CHECK(st.code() == Status::kIOError);
  CHECK(st.message().find(dir + "/missing") != std::string::npos);
  CHECK(::unlink(good.c_str()) == 0);
  CHECK(::rmdir(dir.c_str()) == 0);
}

// A syncer that is never given work stops cleanly in its destructor.
void TestIdleSyncerStops() { FileSyncer syncer(3); }

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestSyncsFilesSubmittedFromManyThreads);
  RUN_TEST(psembed::TestFailureNamesTheFile);
  RUN_TEST(psembed::TestIdleSyncerStops);
  return 0;
}
