// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// The frames of the TCP data plane (docs/distributed.md, "The TCP data plane"): pulls and pushes of a
// sharded table, sent by a trainer's DataChannel to a server's DataServer over one TCP connection.
// A connection carries requests one way and replies the other, each reply naming its request. The
// server serves a connection's pulls in arrival order and applies its pushes in arrival order, but a
// pull may be answered before an earlier push is applied: a sender that needs a push applied waits for
// its reply first.
//
// Fields are in host byte order: both ends run this same build on little-endian hosts (x86-64,
// aarch64); a peer of another order fails the magic check on its first frame.
//
// Request: RequestHeader, then the table name (name_len bytes, zero-padded to a multiple of 8 so
// that the arrays after it are aligned), then keys u64[n]; a push adds grads f32[n x width],
// shows f32[n], clicks f32[n], and slots i32[n] when kHasSlots.
// Reply: ReplyHeader, then payload_bytes of payload: a pull's rows f32[value x width]; an error's
// message (UTF-8). A push's reply has no payload; value = rows skipped.

#ifndef PSEMBED_NET_WIRE_H_
#define PSEMBED_NET_WIRE_H_

#include <cstdint>

namespace psembed {
namespace wire {

constexpr uint32_t kRequestMagic = 0x31455350;  // "PSE1" on a little-endian host
constexpr uint32_t kReplyMagic = 0x52455350;    // "PSER"

enum Op : uint8_t { kPull = 1, kPush = 2 };
enum Flags : uint8_t { kWithStats = 1, kHasSlots = 2, kHasPushId = 4 };

// Limits a server enforces before it reads a body (a frame beyond them is refused and the
// connection closed: its length cannot be trusted, so the stream cannot be resynchronised).
constexpr uint32_t kMaxNameLen = 1024;
constexpr uint64_t kMaxKeys = (uint64_t{1} << 31) - 1;  // as a table call (SparseTable::kMaxKeysPerCall)
constexpr uint32_t kMaxWidth = 1 << 16;
constexpr uint64_t kMaxPayload = uint64_t{1} << 40;  // a reply's payload, checked by the client

struct RequestHeader {
  uint32_t magic;
  uint8_t op;
  uint8_t flags;
  uint16_t name_len;
  uint32_t width;  // push: columns of grads (1 + dim); pull: 0
  uint32_t reserved;  // 0
  uint64_t id;        // the sender's number for this request, echoed by the reply
  uint64_t n;         // keys
  uint64_t push_id;   // with kHasPushId: names the push for admission draws
};
static_assert(sizeof(RequestHeader) == 40, "RequestHeader is a wire format");

struct ReplyHeader {
  uint32_t magic;
  uint8_t code;  // a Status::Code: 0 = OK
  uint8_t reserved[3];
  uint32_t width;  // pull: floats per row
  uint32_t reserved2;
  uint64_t id;             // the request's id (0: a frame the server could not read)
  uint64_t value;          // pull: rows; push: rows skipped
  uint64_t payload_bytes;  // bytes after this header
};
static_assert(sizeof(ReplyHeader) == 40, "ReplyHeader is a wire format");

inline uint64_t PaddedNameLen(uint32_t name_len) { return (uint64_t{name_len} + 7) & ~uint64_t{7}; }

// Body bytes after a RequestHeader; REQUIRES the header's fields within the limits above.
inline uint64_t RequestBodyBytes(const RequestHeader& h) {
  uint64_t bytes = PaddedNameLen(h.name_len) + 8 * h.n;
  if (h.op == kPush) bytes += 4 * h.n * (uint64_t{h.width} + 2 + ((h.flags & kHasSlots) ? 1 : 0));
  return bytes;
}

}  // namespace wire
}  // namespace psembed

#endif  // PSEMBED_NET_WIRE_H_
