// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// DataChannel: a trainer's connection to one DataServer (data_server.h). Requests are sent at once and
// answered asynchronously: Send* returns the request's id, Wait(id) its reply. A receiver thread reads
// replies as they come and keeps each until it is waited for, so the server never blocks writing to us
// (which could otherwise deadlock against our own blocking send).
//
// Failures: a lost connection (peer died, a frame we cannot read, a reply that does not match its
// request) fails every request not yet answered and every later call, with IOError naming the cause. So
// does a Wait that times out: a peer that does not answer one request is taken for hung, and every other
// request on the channel fails at once instead of each waiting its own timeout. The server's own refusal
// of a request (unknown table, bad values, no memory) is not a failure of the channel: it is the reply's
// code and message. A reply is checked against its request before anything is allocated for it.
//
// Thread safety: every method may be called from many threads at once.

#ifndef PSEMBED_NET_DATA_CHANNEL_H_
#define PSEMBED_NET_DATA_CHANNEL_H_

#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "net/wire.h"
#include "table/checked_push.h"
#include "util/status.h"

namespace psembed {

struct DataReply {
  Status::Code code = Status::kOk;  // the server's verdict on the request
  std::string message;              // when code != kOk
  uint64_t value = 0;               // pull: rows; push: rows skipped
  uint32_t width = 0;               // pull: floats per row
  std::unique_ptr<float[]> rows;    // pull: value x width floats
};

class DataChannel {
 public:
  // Connects within connect_timeout_s. A send that makes no progress for send_timeout_s fails.
  static Status Connect(const std::string& host, int port, double connect_timeout_s, double send_timeout_s,
                        std::unique_ptr<DataChannel>* out);
  ~DataChannel();  // Close()
  DataChannel(const DataChannel&) = delete;
  DataChannel& operator=(const DataChannel&) = delete;

  // Send a pull of keys[0..n) from `table`; *id names it for Wait.
  Status SendPull(const std::string& table, const uint64_t* keys, size_t n, bool with_stats, uint64_t* id);
  // Send a push; width = columns of grads (1 + dim); push_id as in SparseTable::Push (kOwnPushId: none).
  Status SendPush(const std::string& table, const PushArgs& args, uint32_t width, uint64_t* id);
  // Waits up to timeout_s for the reply to `id` (each id can be waited for once; InvalidArgument for an id
  // not sent or already waited for). On timeout the channel fails (see above).
  Status Wait(uint64_t id, double timeout_s, DataReply* out);
  // Whether Wait(id) would return at once (its reply came, or the channel failed).
  bool Ready(uint64_t id);
  // Closes the connection (replies not yet waited for are dropped). Idempotent.
  void Close();

 private:
  // A request sent and not yet answered: what its reply must match.
  struct Sent {
    uint8_t op = 0;  // wire::Op
    uint64_t n = 0;  // keys
  };
  // An error reply's message is a line of text; a longer one means a corrupt stream.
  static constexpr uint64_t kMaxErrorMessage = uint64_t{1} << 16;

  explicit DataChannel(int fd);
  // The header of an `op` request for n keys of `table` (id still unset), or why it cannot be sent.
  static Status NewHeader(uint8_t op, const std::string& table, uint64_t n, wire::RequestHeader* h);
  // Numbers the request and records what its reply must match, unless the channel failed.
  // REQUIRES: send_mu_ held (ids go out in the order they are taken).
  Status Register(wire::RequestHeader* h, uint64_t* id);
  Status Send(const void* header, const std::string& table, const void* const* arrays, const size_t* sizes,
              int num_arrays);
  void ReceiveLoop();
  Status ReceiveReplies();
  static Status CheckReply(const wire::ReplyHeader& h, const Sent& sent);
  void Fail(const Status& s);

  const int fd_;
  std::thread receiver_;

  std::mutex send_mu_;  // one frame at a time on the socket
  uint64_t next_id_ = 1;  // guarded by send_mu_

  std::mutex mu_;  // guards the rest
  std::condition_variable cv_;
  std::map<uint64_t, Sent> sent_;          // sent, reply not yet received
  std::map<uint64_t, DataReply> replies_;  // received, not yet waited for
  Status failed_;                          // not OK once the connection is lost or closed
  bool closed_ = false;
};

}  // namespace psembed

#endif  // PSEMBED_NET_DATA_CHANNEL_H_
