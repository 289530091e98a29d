// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "net/data_channel.h"

#include <sys/uio.h>

#include <chrono>
#include <cstring>
#include <new>
#include <utility>

#include "net/socket.h"
#include "net/wire.h"

namespace psembed {

Status DataChannel::Connect(const std::string& host, int port, double connect_timeout_s, double send_timeout_s,
                            std::unique_ptr<DataChannel>* out) {
  int fd = -1;
  Status s = net::Connect(host, port, connect_timeout_s, send_timeout_s, &fd);
  if (!s.ok()) return s;
  out->reset(new DataChannel(fd));
  return Status::OK();
}

DataChannel::DataChannel(int fd) : fd_(fd) {
  receiver_ = std::thread([this] { ReceiveLoop(); });
}

DataChannel::~DataChannel() { Close(); }

void DataChannel::Close() {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (closed_) return;
    closed_ = true;
  }
  Fail(Status::IOError("the channel was closed"));  // first, so that no new frame starts
  net::ShutdownBoth(fd_);  // wakes the receiver and a sender blocked in a write
  receiver_.join();
  std::lock_guard<std::mutex> l(send_mu_);  // a sender past its check of failed_ is done with fd_
  net::Close(fd_);
}

void DataChannel::Fail(const Status& s) {
  std::lock_guard<std::mutex> l(mu_);
  if (failed_.ok()) failed_ = s;
  cv_.notify_all();
}

Status DataChannel::Send(const void* header, const std::string& table, const void* const* arrays,
                         const size_t* sizes, int num_arrays) {
  static const char kZeros[8] = {0};
  struct iovec iov[8];
  iov[0].iov_base = const_cast<void*>(header);
  iov[0].iov_len = sizeof(wire::RequestHeader);
  iov[1].iov_base = const_cast<char*>(table.data());
  iov[1].iov_len = table.size();
  iov[2].iov_base = const_cast<char*>(kZeros);
  iov[2].iov_len = wire::PaddedNameLen(static_cast<uint32_t>(table.size())) - table.size();
  for (int i = 0; i < num_arrays; ++i) {
    iov[3 + i].iov_base = const_cast<void*>(arrays[i]);
    iov[3 + i].iov_len = sizes[i];
  }
  Status s = net::WriteAll(fd_, iov, 3 + num_arrays);
  // A frame cut short leaves the stream unreadable for the server: the channel is done either way.
  if (!s.ok()) Fail(s);
  return s;
}

Status DataChannel::NewHeader(uint8_t op, const std::string& table, uint64_t n, wire::RequestHeader* h) {
  if (table.empty() || table.size() > wire::kMaxNameLen) {
    return Status::InvalidArgument("table name must have 1 to " + std::to_string(wire::kMaxNameLen) + " bytes");
  }
  if (n > wire::kMaxKeys) return Status::InvalidArgument("too many keys in one request");
  std::memset(h, 0, sizeof(*h));
  h->magic = wire::kRequestMagic;
  h->op = op;
  h->name_len = static_cast<uint16_t>(table.size());
  h->n = n;
  return Status::OK();
}

Status DataChannel::Register(wire::RequestHeader* h, uint64_t* id) {
  std::lock_guard<std::mutex> m(mu_);
  if (!failed_.ok()) return failed_;
  h->id = next_id_++;
  sent_[h->id] = Sent{h->op, h->n};
  *id = h->id;
  return Status::OK();
}

Status DataChannel::SendPull(const std::string& table, const uint64_t* keys, size_t n, bool with_stats,
                             uint64_t* id) {
  wire::RequestHeader h;
  Status s = NewHeader(wire::kPull, table, n, &h);
  if (!s.ok()) return s;
  h.flags = with_stats ? wire::kWithStats : 0;
  const void* arrays[] = {keys};
  const size_t sizes[] = {8 * n};
  std::lock_guard<std::mutex> l(send_mu_);
  s = Register(&h, id);
  return s.ok() ? Send(&h, table, arrays, sizes, 1) : s;
}

Status DataChannel::SendPush(const std::string& table, const PushArgs& a, uint32_t width, uint64_t* id) {
  if (width == 0 || width > wire::kMaxWidth) return Status::InvalidArgument("push width out of range");
  wire::RequestHeader h;
  Status s = NewHeader(wire::kPush, table, a.n, &h);
  if (!s.ok()) return s;
  h.flags = (a.slots ? wire::kHasSlots : 0) | (a.push_id != SparseTable::kOwnPushId ? wire::kHasPushId : 0);
  h.width = width;
  h.push_id = a.push_id;
  const void* arrays[] = {a.keys, a.grads, a.shows, a.clicks, a.slots};
  const size_t sizes[] = {8 * a.n, 4 * a.n * width, 4 * a.n, 4 * a.n, a.slots ? 4 * a.n : 0};
  std::lock_guard<std::mutex> l(send_mu_);
  s = Register(&h, id);
  return s.ok() ? Send(&h, table, arrays, sizes, a.slots ? 5 : 4) : s;
}

Status DataChannel::Wait(uint64_t id, double timeout_s, DataReply* out) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  std::unique_lock<std::mutex> l(mu_);
  if (replies_.count(id) == 0 && sent_.count(id) == 0 && failed_.ok()) {
    return Status::InvalidArgument("request " + std::to_string(id) + " was not sent or was already waited for");
  }
  for (;;) {
    auto it = replies_.find(id);
    if (it != replies_.end()) {
      *out = std::move(it->second);
      replies_.erase(it);
      return Status::OK();
    }
    if (!failed_.ok()) return failed_;
    if (cv_.wait_until(l, deadline) == std::cv_status::timeout && replies_.count(id) == 0 && failed_.ok()) {
      // The peer is hung (or its replies are lost): fail the whole channel, so that every other request
      // waiting on it fails now too instead of each waiting its own timeout, and replies that come late
      // are not kept. closed_ is false, so fd_ is still open (Close sets closed_ under mu_ first).
      failed_ = Status::IOError("no reply within " + std::to_string(timeout_s) + " s");
      cv_.notify_all();
      if (!closed_) net::ShutdownBoth(fd_);  // ends the receiver
      return failed_;
    }
  }
}

bool DataChannel::Ready(uint64_t id) {
  std::lock_guard<std::mutex> l(mu_);
  return replies_.count(id) != 0 || !failed_.ok();
}

void DataChannel::ReceiveLoop() {
  Status s;
  try {
    s = ReceiveReplies();
  } catch (const std::bad_alloc&) {
    s = Status::IOError("the trainer ran out of memory receiving a reply");
  }
  Fail(s);
}

// Reads replies until the connection fails; returns why. Every reply is checked against the request it
// answers before anything is allocated for it, so a corrupt or hostile header cannot make us allocate more
// than the request asked for.
Status DataChannel::ReceiveReplies() {
  for (;;) {
    wire::ReplyHeader h;
    Status s = net::ReadFull(fd_, &h, sizeof(h));
    if (!s.ok()) return s;
    if (h.magic != wire::kReplyMagic) return Status::IOError("not a psembed data-plane reply (bad magic)");
    const bool ok = h.code == Status::kOk;
    if (!ok && h.payload_bytes > kMaxErrorMessage) {
      return Status::IOError("an error reply of " + std::to_string(h.payload_bytes) + " bytes (at most " +
                             std::to_string(kMaxErrorMessage) + ")");
    }
    DataReply r;
    r.code = static_cast<Status::Code>(h.code);
    r.value = h.value;
    r.width = h.width;
    if (!ok) {
      r.message.resize(h.payload_bytes);
      s = net::ReadFull(fd_, &r.message[0], h.payload_bytes);
      if (!s.ok()) return s;
      // The server could not read one of our frames (or serve the connection) and closes it.
      if (h.id == 0) return Status::IOError("the server closed the connection: " + r.message);
    }
    Sent sent;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = sent_.find(h.id);
      if (it == sent_.end()) {
        return Status::IOError("a reply to request " + std::to_string(h.id) + ", which is not waiting for one");
      }
      sent = it->second;  // erased with the reply's arrival in replies_ (Wait looks in one or the other)
    }
    if (ok) {
      s = CheckReply(h, sent);
      if (!s.ok()) return s;
      if (h.payload_bytes) {
        try {
          r.rows.reset(new float[h.payload_bytes / 4]);  // uninitialised: the payload fills it
        } catch (const std::bad_alloc&) {
          // This request fails alone: its rows are read and dropped, the channel goes on.
          r = DataReply();
          r.code = Status::kResourceExhausted;
          r.message = "the trainer ran out of memory for a reply of " + std::to_string(h.payload_bytes) + " bytes";
          s = net::Discard(fd_, h.payload_bytes);
          if (!s.ok()) return s;
        }
        if (r.rows) {
          s = net::ReadFull(fd_, r.rows.get(), h.payload_bytes);
          if (!s.ok()) return s;
        }
      }
    }
    std::lock_guard<std::mutex> l(mu_);
    sent_.erase(h.id);
    replies_.emplace(h.id, std::move(r));
    cv_.notify_all();
  }
}

Status DataChannel::CheckReply(const wire::ReplyHeader& h, const Sent& sent) {
  auto what = [&] {  // for the message only: a reply that checks out builds no string
    return std::string(sent.op == wire::kPull ? "pull" : "push") + " of " + std::to_string(sent.n) + " keys";
  };
  if (sent.op == wire::kPull) {
    if (h.value != sent.n || (sent.n > 0 && h.width == 0) || h.width > wire::kMaxWidth ||
        h.payload_bytes != 4 * h.value * uint64_t{h.width}) {
      return Status::IOError("a reply of " + std::to_string(h.value) + " rows of " + std::to_string(h.width) +
                             " floats in " + std::to_string(h.payload_bytes) + " bytes to a " + what());
    }
  } else if (h.width != 0 || h.payload_bytes != 0 || h.value > sent.n) {
    return Status::IOError("a reply of " + std::to_string(h.value) + " rows skipped in " +
                           std::to_string(h.payload_bytes) + " bytes to a " + what());
  }
  return Status::OK();
}

}  // namespace psembed
