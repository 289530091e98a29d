// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "net/data_server.h"

#include <sys/uio.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <system_error>
#include <thread>
#include <utility>

#include "net/socket.h"
#include "net/wire.h"
#include "table/checked_push.h"

namespace psembed {
namespace {

static_assert(wire::kMaxKeys == SparseTable::kMaxKeysPerCall, "a frame carries at most one table call's keys");

// A body of up to kTrustedBody bytes is read into a buffer of its announced size at once; beyond that the
// buffer grows with the bytes that actually arrived (to at most twice them, at most kReadStep a step). So a
// header that lies about its length holds at most max(kTrustedBody, 2 x the bytes sent) until the
// connection ends, while a real request of any size costs a few reallocations at most.
constexpr uint64_t kTrustedBody = uint64_t{1} << 20;
constexpr uint64_t kReadStep = uint64_t{64} << 20;

// How long the accept loop waits before it tries again after a failed accept() (out of descriptors).
constexpr int kAcceptRetryMs = 50;

// A request that threw (std::bad_alloc: memory ran out for its body, its reply or the table's rows) as the
// error its reply carries; the connection goes on.
Status FromException(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr) {
    return Status::ResourceExhausted("the data server ran out of memory serving the request");
  }
  return Status::IOError(std::string("the data server failed to serve the request: ") + e.what());
}

// The name as it may appear in a message: printable ASCII kept, other bytes as \xNN (replies are UTF-8).
std::string PrintableName(const std::string& name) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : name) {
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

Status SendReply(int fd, const wire::ReplyHeader& h, const void* payload) {
  struct iovec iov[2];
  iov[0].iov_base = const_cast<wire::ReplyHeader*>(&h);
  iov[0].iov_len = sizeof(h);
  iov[1].iov_base = const_cast<void*>(payload);
  iov[1].iov_len = h.payload_bytes;
  return net::WriteAll(fd, iov, h.payload_bytes ? 2 : 1);
}

wire::ReplyHeader MakeReply(uint64_t id, Status::Code code) {
  wire::ReplyHeader h;
  std::memset(&h, 0, sizeof(h));
  h.magic = wire::kReplyMagic;
  h.code = static_cast<uint8_t>(code);
  h.id = id;
  return h;
}

Status SendError(int fd, uint64_t id, const Status& error) {
  wire::ReplyHeader h = MakeReply(id, error.code());
  h.payload_bytes = error.message().size();
  return SendReply(fd, h, error.message().data());
}

// Why a header cannot be served, or OK.
Status CheckHeader(const wire::RequestHeader& h) {
  if (h.magic != wire::kRequestMagic) return Status::Corruption("not a psembed data-plane frame (bad magic)");
  if (h.op != wire::kPull && h.op != wire::kPush) {
    return Status::Corruption("unknown op " + std::to_string(h.op) + " in a data-plane frame");
  }
  if (h.name_len == 0 || h.name_len > wire::kMaxNameLen) {
    return Status::Corruption("table name length " + std::to_string(h.name_len) + " out of [1, " +
                              std::to_string(wire::kMaxNameLen) + "]");
  }
  if (h.n > wire::kMaxKeys) return Status::Corruption("key count " + std::to_string(h.n) + " beyond the limit");
  if (h.op == wire::kPush && (h.width == 0 || h.width > wire::kMaxWidth)) {
    return Status::Corruption("push width " + std::to_string(h.width) + " out of [1, " +
                              std::to_string(wire::kMaxWidth) + "]");
  }
  return Status::OK();
}

}  // namespace

Status DataServer::Start(const std::string& host, int port, std::unique_ptr<DataServer>* out) {
  int fd = -1, bound = 0;
  Status s = net::Listen(host, port, &fd, &bound);
  if (!s.ok()) return s;
  out->reset(new DataServer(fd, bound));
  return Status::OK();
}

DataServer::DataServer(int listen_fd, int port) : listen_fd_(listen_fd), port_(port) {
  accept_thread_ = std::thread([this] { AcceptLoop(); });
}

DataServer::~DataServer() { Stop(); }

void DataServer::Register(const std::string& name, std::shared_ptr<SparseTable> table) {
  MutexLock l(&mu_);
  tables_[name] = std::move(table);
}

void DataServer::Clear() {
  MutexLock l(&mu_);
  tables_.clear();
}

Status DataServer::Find(const std::string& name, std::shared_ptr<SparseTable>* table) {
  MutexLock l(&mu_);
  auto it = tables_.find(name);
  if (it == tables_.end()) return Status::NotFound("no table named '" + PrintableName(name) + "' on this server");
  *table = it->second;
  return Status::OK();
}

void DataServer::Stop() {
  MutexLock stop(&stop_mu_);
  if (stopped_) return;
  stopped_ = true;
  std::vector<std::unique_ptr<Connection>> conns;
  {
    MutexLock l(&mu_);
    stopping_ = true;  // the accept loop closes what it accepts from now on
    net::ShutdownBoth(listen_fd_);  // wakes accept()
  }
  accept_thread_.join();
  {
    MutexLock l(&mu_);
    conns.swap(connections_);
    tables_.clear();
  }
  for (auto& c : conns) net::ShutdownBoth(c->fd);  // wakes reads and writes
  for (auto& c : conns) {
    c->thread.join();
    net::Close(c->fd);
  }
  net::Close(listen_fd_);
}

void DataServer::ReapFinished() {
  for (auto it = connections_.begin(); it != connections_.end();) {
    if ((*it)->finished.load(std::memory_order_acquire)) {
      (*it)->thread.join();
      net::Close((*it)->fd);
      it = connections_.erase(it);
    } else {
      ++it;
    }
  }
}

void DataServer::AcceptLoop() {
  for (;;) {
    int fd = -1;
    if (!net::Accept(listen_fd_, &fd).ok()) {
      {
        MutexLock l(&mu_);
        if (stopping_) return;  // Stop shut the listening socket down
      }
      // Out of descriptors, buffers or memory (EMFILE, ENOBUFS, ...): the listening socket is still good and
      // the connection waits in its backlog, so try again once some may have been freed.
      std::this_thread::sleep_for(std::chrono::milliseconds(kAcceptRetryMs));
      continue;
    }
    MutexLock l(&mu_);
    if (stopping_) {
      net::Close(fd);
      return;
    }
    ReapFinished();
    auto c = std::make_unique<Connection>();
    c->fd = fd;
    Connection* raw = c.get();
    connections_.push_back(std::move(c));
    try {
      raw->thread = std::thread([this, raw] { Serve(raw); });
    } catch (const std::system_error&) {
      // No thread for it (EAGAIN): refuse this one connection; its client sees the connection closed.
      connections_.pop_back();
      net::Close(fd);
    }
  }
}

// One connection's requests. The connection's thread (Serve) reads every frame and serves pulls itself;
// pushes go, in arrival order, to the connection's push thread (PushWorker). So a pull does not wait behind a
// push still being applied: the trainer's staleness window already decided which pushes a pull must see (it
// waits for their replies before it sends the pull), and pushes stay in order among themselves.
struct DataServer::Session {
  struct Push {
    wire::RequestHeader header;
    std::vector<uint64_t> body;
  };
  int fd = -1;
  std::mutex write_mu;  // one reply at a time on the socket
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Push> pushes;  // received, not yet applied; at most kMaxQueuedPushes
  std::vector<std::vector<uint64_t>> spare;  // bodies of applied pushes, reused by the reader (no regrowth)
  bool closing = false;     // the reader is done: apply what is queued, then stop
};

namespace {

// Pushes a connection may queue before its reader stops reading (the sender then blocks in TCP).
constexpr size_t kMaxQueuedPushes = 16;

// Reads one request. False when the connection is done: closed, cut short, or an unreadable header (answered
// with an error reply with id 0 first; *bad counts it). *no_memory: the body could not be allocated; it was
// read and dropped, and the caller answers the request with an error.
bool ReadRequest(int fd, wire::RequestHeader* h, std::vector<uint64_t>* body, std::mutex* write_mu, bool* bad,
                 bool* no_memory) {
  *bad = false;
  *no_memory = false;
  if (!net::ReadFull(fd, h, sizeof(*h)).ok()) return false;  // the client left (or Stop)
  Status s = CheckHeader(*h);
  if (!s.ok()) {
    *bad = true;
    std::lock_guard<std::mutex> l(*write_mu);
    SendError(fd, 0, s);
    return false;
  }
  // The body in steps (see kTrustedBody).
  const uint64_t bytes = wire::RequestBodyBytes(*h);
  uint64_t got = 0;
  while (got < bytes) {
    const uint64_t step = bytes <= kTrustedBody ? bytes : std::min({kReadStep, bytes - got, std::max(kTrustedBody, got)});
    if (body->size() * 8 < got + step) {
      try {
        body->resize((got + step + 7) / 8);
      } catch (const std::bad_alloc&) {
        *no_memory = true;
        std::vector<uint64_t>().swap(*body);
        return net::Discard(fd, bytes - got).ok();
      }
    }
    if (!net::ReadFull(fd, reinterpret_cast<char*>(body->data()) + got, step).ok()) return false;
    got += step;
  }
  return true;
}

uint64_t ElapsedNs(std::chrono::steady_clock::time_point since) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - since).count());
}

std::string TableName(const wire::RequestHeader& h, const std::vector<uint64_t>& body) {
  return std::string(reinterpret_cast<const char*>(body.data()), h.name_len);
}

const char* Arrays(const wire::RequestHeader& h, const std::vector<uint64_t>& body) {
  return reinterpret_cast<const char*>(body.data()) + wire::PaddedNameLen(h.name_len);
}

}  // namespace

Status DataServer::Reply(Session* session, uint64_t id, const Status& s, wire::ReplyHeader* reply,
                         const void* payload) {
  std::lock_guard<std::mutex> l(session->write_mu);
  if (!s.ok()) {
    errors_.fetch_add(1, std::memory_order_relaxed);
    return SendError(session->fd, id, s);
  }
  return SendReply(session->fd, *reply, payload);
}

void DataServer::ServePull(Session* session, const wire::RequestHeader& h, const std::vector<uint64_t>& body,
                           std::vector<float>* rows) {
  const std::string name = TableName(h, body);
  std::shared_ptr<SparseTable> table;
  Status s = Find(name, &table);
  wire::ReplyHeader reply = MakeReply(h.id, Status::kOk);
  if (s.ok()) {
    const bool with_stats = (h.flags & wire::kWithStats) != 0;
    const int width = table->pull_width(with_stats);
    const size_t n = static_cast<size_t>(h.n);
    if (4 * uint64_t{h.n} * static_cast<uint64_t>(width) > wire::kMaxPayload) {
      Reply(session, h.id,
            Status::InvalidArgument("a pull of " + std::to_string(n) + " keys of " + std::to_string(width) +
                                    " floats would reply more than the data plane's 2**40 bytes; pull fewer keys"),
            nullptr, nullptr);
      return;
    }
    rows->resize(n * static_cast<size_t>(width));
    const auto t0 = std::chrono::steady_clock::now();
    table->Pull(reinterpret_cast<const uint64_t*>(Arrays(h, body)), n, with_stats, rows->data());
    pull_ns_.fetch_add(ElapsedNs(t0), std::memory_order_relaxed);
    reply.width = static_cast<uint32_t>(width);
    reply.value = n;
    reply.payload_bytes = rows->size() * sizeof(float);
  }
  Reply(session, h.id, s, &reply, rows->data());
}

void DataServer::ServePush(Session* session, const wire::RequestHeader& h, const std::vector<uint64_t>& body) {
  const std::string name = TableName(h, body);
  std::shared_ptr<SparseTable> table;
  Status s = Find(name, &table);
  wire::ReplyHeader reply = MakeReply(h.id, Status::kOk);
  if (s.ok() && (h.flags & wire::kHasPushId) && (h.push_id >> 63) != 0) {
    s = Status::InvalidArgument("push_id must be < 2**63, got " + std::to_string(h.push_id));
  }
  if (s.ok() && h.width != 1 + static_cast<uint32_t>(table->options().dim)) {
    s = Status::InvalidArgument("grads must have " + std::to_string(1 + table->options().dim) +
                                " columns (1 + dim) for table '" + PrintableName(name) + "', got " +
                                std::to_string(h.width));
  }
  if (s.ok()) {
    const size_t n = static_cast<size_t>(h.n);
    const char* arrays = Arrays(h, body);
    PushArgs a;
    a.keys = reinterpret_cast<const uint64_t*>(arrays);
    a.n = n;
    a.grads = reinterpret_cast<const float*>(arrays + 8 * n);
    a.shows = a.grads + n * h.width;
    a.clicks = a.shows + n;
    a.slots = (h.flags & wire::kHasSlots) ? reinterpret_cast<const int32_t*>(a.clicks + n) : nullptr;
    if (h.flags & wire::kHasPushId) a.push_id = h.push_id;
    size_t skipped = 0;
    const auto t0 = std::chrono::steady_clock::now();
    s = CheckedPush(table.get(), a, &skipped);
    push_ns_.fetch_add(ElapsedNs(t0), std::memory_order_relaxed);
    reply.value = skipped;
  }
  Reply(session, h.id, s, &reply, nullptr);
}

void DataServer::PushWorker(Session* session) {
  for (;;) {
    Session::Push push;
    {
      std::unique_lock<std::mutex> l(session->mu);
      session->cv.wait(l, [session] { return !session->pushes.empty() || session->closing; });
      if (session->pushes.empty()) return;  // closing, and everything received was applied
      push = std::move(session->pushes.front());
      session->pushes.pop_front();
    }
    session->cv.notify_all();  // room for the reader
    try {
      ServePush(session, push.header, push.body);
    } catch (const std::exception& e) {  // the table's push ran out of memory (keys before that may be applied)
      Reply(session, push.header.id, FromException(e), nullptr, nullptr);
    }
    std::lock_guard<std::mutex> l(session->mu);
    if (session->spare.size() < 2) session->spare.push_back(std::move(push.body));
  }
}

void DataServer::Serve(Connection* c) {
  Session session;
  session.fd = c->fd;
  std::thread push_thread;
  try {
    push_thread = std::thread([this, &session] { PushWorker(&session); });
  } catch (const std::system_error&) {
    std::lock_guard<std::mutex> l(session.write_mu);
    SendError(session.fd, 0, Status::ResourceExhausted("the data server could not start a thread for the connection"));
  }
  if (push_thread.joinable()) {
    try {
      ServeRequests(&session);
    } catch (const std::exception& e) {  // e.g. no memory to queue a push: this connection ends, the server goes on
      errors_.fetch_add(1, std::memory_order_relaxed);
      std::lock_guard<std::mutex> l(session.write_mu);
      SendError(session.fd, 0, FromException(e));
    }
    {
      std::lock_guard<std::mutex> l(session.mu);
      session.closing = true;
    }
    session.cv.notify_all();
    push_thread.join();
  }
  // The peer sees EOF now; the descriptor is closed when the thread is reaped (or at Stop).
  net::ShutdownBoth(session.fd);
  c->finished.store(true, std::memory_order_release);
}

void DataServer::ServeRequests(Session* session) {
  std::vector<uint64_t> body;  // a pull's request, reused; uint64_t for the keys' alignment
  std::vector<float> rows;     // a pull's reply, reused
  for (;;) {
    wire::RequestHeader h;
    bool bad = false, no_memory = false;
    if (!ReadRequest(session->fd, &h, &body, &session->write_mu, &bad, &no_memory)) {
      if (bad) errors_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    requests_.fetch_add(1, std::memory_order_relaxed);
    if (no_memory) {
      Reply(session, h.id,
            Status::ResourceExhausted("the data server ran out of memory for a request of " +
                                      std::to_string(wire::RequestBodyBytes(h)) + " bytes"),
            nullptr, nullptr);
      continue;
    }
    if (h.op == wire::kPull) {
      try {
        ServePull(session, h, body, &rows);
      } catch (const std::exception& e) {  // no memory for the reply's rows
        std::vector<float>().swap(rows);
        Reply(session, h.id, FromException(e), nullptr, nullptr);
      }
      continue;
    }
    std::unique_lock<std::mutex> l(session->mu);
    session->cv.wait(l, [session] { return session->pushes.size() < kMaxQueuedPushes; });
    session->pushes.push_back(Session::Push{h, std::move(body)});
    body = std::vector<uint64_t>();  // the queued push owns its buffer; take a spare one if any
    if (!session->spare.empty()) {
      body = std::move(session->spare.back());
      session->spare.pop_back();
    }
    l.unlock();
    session->cv.notify_all();
  }
}

}  // namespace psembed
