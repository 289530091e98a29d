// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Thin helpers over POSIX TCP sockets for the data plane. Every failure is a Status::IOError naming
// what failed and errno's text; no call raises a signal (sends use MSG_NOSIGNAL).
//
// Why our own: the data plane needs only blocking reads and writes of whole frames on a few long-lived
// connections, a thread per connection; an event library (asio, libuv) would add a dependency and a
// reactor for nothing this needs.

#ifndef PSEMBED_NET_SOCKET_H_
#define PSEMBED_NET_SOCKET_H_

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "util/status.h"

namespace psembed {
namespace net {

// A socket listening on host:port (IPv4 dotted address; port 0 = any free one). *port gets the port.
Status Listen(const std::string& host, int port, int* fd, int* bound_port);
// Waits for a connection on listen_fd; *fd gets it, with TCP_NODELAY. Fails once listen_fd is shut down.
Status Accept(int listen_fd, int* fd);
// Connects to host:port within timeout_s; *fd gets the socket, with TCP_NODELAY and a send timeout of
// send_timeout_s (a send that cannot make progress for that long fails instead of blocking forever).
Status Connect(const std::string& host, int port, double timeout_s, double send_timeout_s, int* fd);
// Reads exactly n bytes. *eof (may be null) is set when the peer closed before the first byte.
Status ReadFull(int fd, void* buf, size_t n, bool* eof = nullptr);
// Reads and drops exactly n bytes (a body or payload there is no memory for; the stream stays readable).
Status Discard(int fd, uint64_t n);
// Writes all of iov[0..iovcnt) (modified in place as it goes).
Status WriteAll(int fd, struct iovec* iov, int iovcnt);
// shutdown(SHUT_RDWR): wakes a thread blocked in accept/read/write on fd. close() is separate.
void ShutdownBoth(int fd);
void Close(int fd);

}  // namespace net
}  // namespace psembed

#endif  // PSEMBED_NET_SOCKET_H_
