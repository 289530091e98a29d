// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// DataServer: serves pulls and pushes of the tables registered with it over TCP (frames: wire.h), with
// no Python on the path: a thread per connection reads the requests and serves the pulls, and a second
// thread per connection applies its pushes in arrival order, so a pull never waits behind a push (the
// trainer decides which pushes a pull must see by waiting for their replies first; see Session in the .cc).
// A server process runs one, beside the RPC agent that carries control calls.
//
// Errors: a request naming an unknown table, or whose values a table refuses (CheckedPush), gets an
// error reply with the message and the connection goes on. A frame that cannot be read (bad magic, an
// unknown op, a length beyond the limits of wire.h) gets an error reply with id 0, then the server
// closes that connection, whose stream can no longer be trusted; other connections are not affected.
// Running out of memory (a request's body, a pull's reply, a push's new rows) gets an error reply
// (ResourceExhausted) and the connection goes on; no failure of one request ends the process.
//
// Thread safety: Register, Clear and Stop may be called from any thread while connections are served.

#ifndef PSEMBED_NET_DATA_SERVER_H_
#define PSEMBED_NET_DATA_SERVER_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "net/wire.h"
#include "table/sparse_table.h"
#include "util/mutex.h"
#include "util/status.h"

namespace psembed {

class DataServer {
 public:
  // Listens on host:port (an IPv4 address; port 0 = any free port) and starts accepting.
  static Status Start(const std::string& host, int port, std::unique_ptr<DataServer>* out);
  ~DataServer();  // Stop()
  DataServer(const DataServer&) = delete;
  DataServer& operator=(const DataServer&) = delete;

  int port() const { return port_; }

  // Serves `table` under `name` from now on (replacing a table of that name).
  void Register(const std::string& name, std::shared_ptr<SparseTable> table);
  // Forgets every table (requests in progress finish on the table they found).
  void Clear();
  // Stops accepting, closes every connection and joins the threads. Idempotent.
  void Stop();

  // Requests answered so far, and how many of them with an error (tests).
  uint64_t requests() const { return requests_.load(std::memory_order_relaxed); }
  uint64_t errors() const { return errors_.load(std::memory_order_relaxed); }
  // Seconds spent inside the table's Pull and in CheckedPush, summed over connections (benchmarks split a
  // trainer's wait into the server's table work and the transport's share).
  double pull_seconds() const { return 1e-9 * static_cast<double>(pull_ns_.load(std::memory_order_relaxed)); }
  double push_seconds() const { return 1e-9 * static_cast<double>(push_ns_.load(std::memory_order_relaxed)); }

 private:
  struct Connection {
    int fd = -1;
    std::thread thread;
    std::atomic<bool> finished{false};
  };

  struct Session;  // one connection's queue of pushes and its reply lock

  DataServer(int listen_fd, int port);
  void AcceptLoop();
  void Serve(Connection* c);  // a connection's thread: starts its PushWorker, then ServeRequests
  void ServeRequests(Session* session);  // reads until the connection ends; serves pulls, queues pushes
  void PushWorker(Session* session);
  void ServePull(Session* session, const wire::RequestHeader& h, const std::vector<uint64_t>& body,
                 std::vector<float>* rows);
  void ServePush(Session* session, const wire::RequestHeader& h, const std::vector<uint64_t>& body);
  // Writes the reply (or, when !s.ok(), an error reply for id) under the session's write lock.
  Status Reply(Session* session, uint64_t id, const Status& s, wire::ReplyHeader* reply, const void* payload);
  // The table registered as `name`, or NotFound naming it.
  Status Find(const std::string& name, std::shared_ptr<SparseTable>* table);
  // Joins and drops connections whose thread has finished. REQUIRES: mu_ held.
  void ReapFinished() EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const int listen_fd_;
  const int port_;
  std::thread accept_thread_;

  Mutex mu_;
  bool stopping_ GUARDED_BY(mu_) = false;
  std::vector<std::unique_ptr<Connection>> connections_ GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<SparseTable>> tables_ GUARDED_BY(mu_);

  Mutex stop_mu_;  // serializes Stop()
  bool stopped_ GUARDED_BY(stop_mu_) = false;

  std::atomic<uint64_t> requests_{0};  // relaxed: statistics
  std::atomic<uint64_t> errors_{0};
  std::atomic<uint64_t> pull_ns_{0};
  std::atomic<uint64_t> push_ns_{0};
};

}  // namespace psembed

#endif  // PSEMBED_NET_DATA_SERVER_H_
