// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "net/data_server.h"

#include <sys/uio.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "net/socket.h"
#include "net/wire.h"
#include "table/checked_push.h"

namespace psembed {
namespace {

// A body is read in steps of at most this many bytes, growing the buffer as data arrives, so a header
// that lies about its length costs no more memory than the bytes actually sent.
constexpr uint64_t kReadStep = uint64_t{64} << 20;

Status SendReply(int fd, const wire::ReplyHeader& h, const void* payload) {
  struct iovec iov[2];
  iov[0].iov_base = const_cast<wire::ReplyHeader*>(&h);
  iov[0].iov_len = sizeof(h);
  iov[1].iov_base = const_cast<void*>(payload);
  iov[1].iov_len = h.payload_bytes;
  return net::WriteAll(fd, iov, h.payload_bytes ? 2 : 1);
}

wire::ReplyHeader Reply(uint64_t id, Status::Code code) {
  wire::ReplyHeader h;
  std::memset(&h, 0, sizeof(h));
  h.magic = wire::kReplyMagic;
  h.code = static_cast<uint8_t>(code);
  h.id = id;
  return h;
}

Status SendError(int fd, uint64_t id, const Status& error) {
  wire::ReplyHeader h = Reply(id, error.code());
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

std::shared_ptr<SparseTable> DataServer::Find(const std::string& name) {
  MutexLock l(&mu_);
  auto it = tables_.find(name);
  return it == tables_.end() ? nullptr : it->second;
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
    if (!net::Accept(listen_fd_, &fd).ok()) return;  // shut down (Stop) or a fatal error
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
    raw->thread = std::thread([this, raw] { Serve(raw); });
  }
}

void DataServer::Serve(Connection* c) {
  const int fd = c->fd;
  std::vector<uint64_t> body;  // reused across requests; uint64_t for the keys' alignment
  std::vector<float> rows;     // a pull's reply, reused
  for (;;) {
    wire::RequestHeader h;
    if (!net::ReadFull(fd, &h, sizeof(h)).ok()) break;  // the client left (or Stop)
    Status bad = CheckHeader(h);
    if (!bad.ok()) {
      errors_.fetch_add(1, std::memory_order_relaxed);
      SendError(fd, 0, bad);
      break;
    }
    // Read the body in steps (see kReadStep).
    const uint64_t bytes = wire::RequestBodyBytes(h);
    uint64_t got = 0;
    bool read_ok = true;
    while (got < bytes) {
      const uint64_t step = std::min(kReadStep, bytes - got);
      if (body.size() * 8 < got + step) body.resize((got + step + 7) / 8);
      if (!net::ReadFull(fd, reinterpret_cast<char*>(body.data()) + got, step).ok()) {
        read_ok = false;
        break;
      }
      got += step;
    }
    if (!read_ok) break;
    requests_.fetch_add(1, std::memory_order_relaxed);
    const char* base = reinterpret_cast<const char*>(body.data());
    const std::string name(base, h.name_len);
    const char* arrays = base + wire::PaddedNameLen(h.name_len);
    const uint64_t* keys = reinterpret_cast<const uint64_t*>(arrays);
    const size_t n = static_cast<size_t>(h.n);

    std::shared_ptr<SparseTable> table = Find(name);
    Status s;
    wire::ReplyHeader reply = Reply(h.id, Status::kOk);
    if (table == nullptr) {
      s = Status::NotFound("no table named '" + name + "' on this server");
    } else if (h.op == wire::kPull) {
      const bool with_stats = (h.flags & wire::kWithStats) != 0;
      const int width = table->pull_width(with_stats);
      rows.resize(n * static_cast<size_t>(width));
      table->Pull(keys, n, with_stats, rows.data());
      reply.width = static_cast<uint32_t>(width);
      reply.value = n;
      reply.payload_bytes = rows.size() * sizeof(float);
    } else {
      const uint32_t gw = 1 + static_cast<uint32_t>(table->options().dim);
      if ((h.flags & wire::kHasPushId) && (h.push_id >> 63) != 0) {
        s = Status::InvalidArgument("push_id must be < 2**63, got " + std::to_string(h.push_id));
      } else if (h.width != gw) {
        s = Status::InvalidArgument("grads must have " + std::to_string(gw) + " columns (1 + dim) for table '" +
                                    name + "', got " + std::to_string(h.width));
      } else {
        PushArgs a;
        a.keys = keys;
        a.n = n;
        a.grads = reinterpret_cast<const float*>(arrays + 8 * n);
        a.shows = a.grads + n * gw;
        a.clicks = a.shows + n;
        a.slots = (h.flags & wire::kHasSlots) ? reinterpret_cast<const int32_t*>(a.clicks + n) : nullptr;
        if (h.flags & wire::kHasPushId) a.push_id = h.push_id;
        size_t skipped = 0;
        s = CheckedPush(table.get(), a, &skipped);
        reply.value = skipped;
      }
    }
    Status sent;
    if (!s.ok()) {
      errors_.fetch_add(1, std::memory_order_relaxed);
      sent = SendError(fd, h.id, s);
    } else {
      sent = SendReply(fd, reply, rows.data());
    }
    if (!sent.ok()) break;
  }
  // The peer sees EOF now; the descriptor is closed when the thread is reaped (or at Stop).
  net::ShutdownBoth(fd);
  c->finished.store(true, std::memory_order_release);
}

}  // namespace psembed
