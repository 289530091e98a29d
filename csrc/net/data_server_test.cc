// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// DataServer + DataChannel in one process over 127.0.0.1 (run under TSan and ASan/UBSan by
// scripts/sanitize.sh). With SGD lr = 1, every gradient component -1 and show 1 per key occurrence,
// every number is a small exact integer, so concurrent pushes through several channels can be
// checked exactly: the total show equals the occurrences pushed, and no pull sees a torn row.
// Then the failure paths: refused requests keep the connection, an unreadable frame closes only its
// own connection, and a stopped server fails waiting requests instead of hanging them.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "net/data_channel.h"
#include "net/data_server.h"
#include "net/socket.h"
#include "net/wire.h"
#include "table/counting_options_for_test.h"
#include "table/sparse_table.h"
#include "util/testharness.h"

namespace psembed {
namespace {

constexpr int kDim = 4;
constexpr double kTimeout = 30.0;

// A counting table served as "t" on a fresh server (any free port).
struct Served {
  std::shared_ptr<SparseTable> table = std::make_shared<SparseTable>(CountingOptions(2, 8, kDim));
  std::unique_ptr<DataServer> server;
  Served() {
    Status s = DataServer::Start("127.0.0.1", 0, &server);
    PSEMBED_CHECK_MSG(s.ok(), s.message());
    server->Register("t", table);
  }
};

std::unique_ptr<DataChannel> Connect(const DataServer& server) {
  std::unique_ptr<DataChannel> c;
  Status s = DataChannel::Connect("127.0.0.1", server.port(), kTimeout, kTimeout, &c);
  PSEMBED_CHECK_MSG(s.ok(), s.message());
  return c;
}

#define CHECK_OK(s) PSEMBED_CHECK_MSG((s).ok(), (s).message())

DataReply PushOnes(DataChannel* c, const std::string& table, const std::vector<uint64_t>& keys) {
  const size_t n = keys.size();
  std::vector<float> grads(n * (1 + kDim), -1.0f), shows(n, 1.0f), clicks(n, 0.0f);
  PushArgs a;
  a.keys = keys.data();
  a.n = n;
  a.grads = grads.data();
  a.shows = shows.data();
  a.clicks = clicks.data();
  uint64_t id = 0;
  CHECK_OK(c->SendPush(table, a, 1 + kDim, &id));
  DataReply r;
  CHECK_OK(c->Wait(id, kTimeout, &r));
  return r;
}

DataReply Pull(DataChannel* c, const std::string& table, const std::vector<uint64_t>& keys, bool stats) {
  uint64_t id = 0;
  CHECK_OK(c->SendPull(table, keys.data(), keys.size(), stats, &id));
  DataReply r;
  CHECK_OK(c->Wait(id, kTimeout, &r));
  return r;
}

// Pushes through the server equal pushes to the table itself; pulls read what a local pull reads.
void TestRoundTrip() {
  Served served;
  auto& table = served.table;
  auto& server = served.server;
  auto c = Connect(*server);
  std::vector<uint64_t> keys = {1, 2, 2, ~uint64_t{0}, 7};
  DataReply p = PushOnes(c.get(), "t", keys);
  CHECK_EQ(p.code, Status::kOk);
  CHECK_EQ(p.value, 0u);  // nothing skipped
  std::vector<uint64_t> q = {2, 1, 99, ~uint64_t{0}};
  DataReply r = Pull(c.get(), "t", q, true);
  CHECK_EQ(r.code, Status::kOk);
  CHECK_EQ(r.value, q.size());
  CHECK_EQ(r.width, static_cast<uint32_t>(3 + kDim));
  std::vector<float> local(q.size() * (3 + kDim));
  table->Pull(q.data(), q.size(), true, local.data());
  CHECK_EQ(std::memcmp(local.data(), r.rows.get(), local.size() * sizeof(float)), 0);
  CHECK_EQ(r.rows[0], 2.0f);  // key 2: shown twice
  CHECK_EQ(r.rows[2 * (3 + kDim)], 0.0f);  // key 99: unknown, zeros
  DataReply empty = Pull(c.get(), "t", {}, false);
  CHECK_EQ(empty.value, 0u);
  CHECK_EQ(empty.width, static_cast<uint32_t>(1 + kDim));
}

// Threads on several channels push and pull at once; every occurrence is counted exactly once.
void TestConcurrentChannels() {
  Served served;
  auto& server = served.server;
  constexpr int kThreads = 4, kRounds = 60;
  constexpr uint64_t kKeySpace = 5000;
  std::vector<std::unique_ptr<DataChannel>> channels;
  for (int i = 0; i < 2; ++i) channels.push_back(Connect(*server));
  std::atomic<uint64_t> pushed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      DataChannel* c = channels[t % channels.size()].get();
      std::mt19937_64 rng(t);
      for (int round = 0; round < kRounds; ++round) {
        const size_t n = 1 + rng() % (round % 7 == 0 ? 9000 : 300);  // some batches go parallel in the table
        std::vector<uint64_t> keys(n);
        for (auto& k : keys) k = rng() % kKeySpace;
        // Several requests in flight on the channel before the first wait.
        uint64_t pull_id = 0;
        CHECK_OK(c->SendPull("t", keys.data(), n, true, &pull_id));
        DataReply pushed_reply = PushOnes(c, "t", keys);
        CHECK_EQ(pushed_reply.code, Status::kOk);
        pushed += n;
        DataReply r;
        CHECK_OK(c->Wait(pull_id, kTimeout, &r));
        for (size_t i = 0; i < n; ++i) {
          const float* row = r.rows.get() + i * (3 + kDim);
          CHECK_EQ(row[0], row[2]);  // show == lr weight: a row is never seen half-pushed
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  std::vector<uint64_t> all(kKeySpace);
  for (uint64_t k = 0; k < kKeySpace; ++k) all[k] = k;
  DataReply r = Pull(channels[0].get(), "t", all, true);
  double total = 0;
  for (uint64_t k = 0; k < kKeySpace; ++k) total += r.rows[k * (3 + kDim)];
  CHECK_EQ(static_cast<uint64_t>(total), pushed.load());
  CHECK_EQ(server->errors(), 0u);
}

// Refused requests: an error reply with the message, and the connection goes on.
void TestRefusedRequestsKeepTheConnection() {
  Served served;
  auto& table = served.table;
  auto& server = served.server;
  auto c = Connect(*server);
  std::vector<uint64_t> keys = {5, 6};
  DataReply r = Pull(c.get(), "missing", keys, false);
  CHECK_EQ(r.code, Status::kNotFound);
  CHECK(r.message.find("missing") != std::string::npos);
  std::vector<float> grads(2 * (1 + kDim), 0.0f), shows = {1.0f, -1.0f}, clicks(2, 0.0f);
  PushArgs a;
  a.keys = keys.data();
  a.n = 2;
  a.grads = grads.data();
  a.shows = shows.data();
  a.clicks = clicks.data();
  uint64_t id = 0;
  CHECK_OK(c->SendPush("t", a, 1 + kDim, &id));
  CHECK_OK(c->Wait(id, kTimeout, &r));
  CHECK_EQ(r.code, Status::kInvalidArgument);
  CHECK(r.message.find("shows[1]") != std::string::npos);
  CHECK_OK(c->SendPush("t", a, kDim, &id));  // wrong width
  CHECK_OK(c->Wait(id, kTimeout, &r));
  CHECK_EQ(r.code, Status::kInvalidArgument);
  CHECK_EQ(table->Size(), 0u);  // nothing was applied
  DataReply ok = PushOnes(c.get(), "t", keys);
  CHECK_EQ(ok.code, Status::kOk);
  CHECK_EQ(table->Size(), 2u);
  CHECK_EQ(server->errors(), 3u);
}

// Garbage on one connection: an error reply with id 0, that connection closes, others are served.
void TestGarbageFrameClosesOnlyItsConnection() {
  Served served;
  auto& server = served.server;
  auto good = Connect(*server);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr;
  std::memset(&addr, 0, sizeof(addr));
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(server->port()));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  CHECK_EQ(connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  char junk[sizeof(wire::RequestHeader)];
  std::memset(junk, 'x', sizeof(junk));
  CHECK_EQ(send(fd, junk, sizeof(junk), 0), static_cast<ssize_t>(sizeof(junk)));
  wire::ReplyHeader h;
  size_t got = 0;
  while (got < sizeof(h)) {
    ssize_t r = recv(fd, reinterpret_cast<char*>(&h) + got, sizeof(h) - got, 0);
    CHECK(r > 0);
    got += static_cast<size_t>(r);
  }
  CHECK_EQ(h.magic, wire::kReplyMagic);
  CHECK_EQ(h.id, 0u);
  CHECK_EQ(h.code, static_cast<uint8_t>(Status::kCorruption));
  std::string msg(h.payload_bytes, '\0');
  got = 0;
  while (got < msg.size()) {
    ssize_t r = recv(fd, &msg[got], msg.size() - got, 0);
    CHECK(r > 0);
    got += static_cast<size_t>(r);
  }
  CHECK(msg.find("bad magic") != std::string::npos);
  char byte;
  CHECK_EQ(recv(fd, &byte, 1, 0), 0);  // then the server closed this connection
  close(fd);
  CHECK_EQ(PushOnes(good.get(), "t", {1, 2, 3}).code, Status::kOk);  // the other one is still served
}

// A server that goes away fails the requests waiting on it (no hang), and every later call.
void TestStoppedServerFailsWaiters() {
  Served served;
  auto& server = served.server;
  auto c = Connect(*server);
  CHECK_EQ(PushOnes(c.get(), "t", {1}).code, Status::kOk);
  server->Stop();
  std::vector<uint64_t> keys = {1};
  uint64_t id = 0;
  Status s = c->SendPull("t", keys.data(), 1, false, &id);
  if (s.ok()) {
    DataReply r;
    s = c->Wait(id, kTimeout, &r);
  }
  CHECK(!s.ok());
  CHECK_EQ(s.code(), Status::kIOError);
  // Waiting for an id never sent is refused at once.
  auto server2 = std::unique_ptr<DataServer>();
  CHECK_OK(DataServer::Start("127.0.0.1", 0, &server2));
  auto c2 = Connect(*server2);
  DataReply r;
  CHECK_EQ(c2->Wait(12345, 0.05, &r).code(), Status::kInvalidArgument);
}

// A peer that takes requests and never answers (hung): the first wait times out and fails the channel, so the
// other request fails at once instead of waiting its own timeout.
void TestTimeoutFailsTheChannel() {
  int listen_fd = -1, port = 0;
  CHECK_OK(net::Listen("127.0.0.1", 0, &listen_fd, &port));  // never accepts: the kernel's backlog answers
  std::unique_ptr<DataChannel> c;
  CHECK_OK(DataChannel::Connect("127.0.0.1", port, kTimeout, kTimeout, &c));
  std::vector<uint64_t> keys = {1, 2};
  uint64_t first = 0, second = 0;
  CHECK_OK(c->SendPull("t", keys.data(), keys.size(), false, &first));
  CHECK_OK(c->SendPull("t", keys.data(), keys.size(), false, &second));
  DataReply r;
  Status s = c->Wait(first, 0.05, &r);
  CHECK_EQ(s.code(), Status::kIOError);
  CHECK(s.message().find("no reply") != std::string::npos);
  const auto t0 = std::chrono::steady_clock::now();
  s = c->Wait(second, 30.0, &r);
  CHECK_EQ(s.code(), Status::kIOError);
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(10));
  CHECK(c->Ready(second));
  c->Close();
  net::Close(listen_fd);
}

}  // namespace
}  // namespace psembed

int main() {
  RUN_TEST(psembed::TestRoundTrip);
  RUN_TEST(psembed::TestConcurrentChannels);
  RUN_TEST(psembed::TestRefusedRequestsKeepTheConnection);
  RUN_TEST(psembed::TestGarbageFrameClosesOnlyItsConnection);
  RUN_TEST(psembed::TestStoppedServerFailsWaiters);
  RUN_TEST(psembed::TestTimeoutFailsTheChannel);
  return 0;
}
