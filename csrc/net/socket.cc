// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "net/socket.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstring>
#include <thread>

namespace psembed {
namespace net {
namespace {

Status Errno(const std::string& what) { return Status::IOError(what + ": " + std::strerror(errno)); }

Status Address(const std::string& host, int port, sockaddr_in* addr) {
  std::memset(addr, 0, sizeof(*addr));
  addr->sin_family = AF_INET;
  addr->sin_port = htons(static_cast<uint16_t>(port));
  if (port < 0 || port > 65535 || inet_pton(AF_INET, host.c_str(), &addr->sin_addr) != 1) {
    return Status::InvalidArgument("not an IPv4 address and port: " + host + ":" + std::to_string(port));
  }
  return Status::OK();
}

void SetTimeout(int fd, int option, double seconds) {
  timeval tv;
  tv.tv_sec = static_cast<time_t>(seconds);
  tv.tv_usec = static_cast<suseconds_t>((seconds - static_cast<double>(tv.tv_sec)) * 1e6);
  if (tv.tv_sec == 0 && tv.tv_usec == 0) tv.tv_usec = 1000;  // 0 would mean "no timeout"
  setsockopt(fd, SOL_SOCKET, option, &tv, sizeof(tv));
}

void NoDelay(int fd) {
  // Frames are written whole; Nagle's algorithm would only hold a small reply back for ~40 ms.
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

}  // namespace

Status Listen(const std::string& host, int port, int* fd, int* bound_port) {
  sockaddr_in addr;
  Status s = Address(host, port, &addr);
  if (!s.ok()) return s;
  int f = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (f < 0) return Errno("socket");
  int one = 1;
  setsockopt(f, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(f, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    s = Errno("bind " + host + ":" + std::to_string(port));
    close(f);
    return s;
  }
  if (listen(f, 128) != 0) {
    s = Errno("listen");
    close(f);
    return s;
  }
  socklen_t len = sizeof(addr);
  getsockname(f, reinterpret_cast<sockaddr*>(&addr), &len);
  *fd = f;
  *bound_port = ntohs(addr.sin_port);
  return Status::OK();
}

Status Accept(int listen_fd, int* fd) {
  for (;;) {
    int f = accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (f >= 0) {
      NoDelay(f);
      *fd = f;
      return Status::OK();
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    return Errno("accept");
  }
}

Status Connect(const std::string& host, int port, double timeout_s, double send_timeout_s, int* fd) {
  sockaddr_in addr;
  Status s = Address(host, port, &addr);
  if (!s.ok()) return s;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    int f = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (f < 0) return Errno("socket");
    // Linux bounds a blocking connect by the send timeout: an unreachable host fails at the deadline
    // instead of after the kernel's SYN retries (minutes).
    const double left = std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
    SetTimeout(f, SO_SNDTIMEO, left > 0 ? left : 0.0);
    if (connect(f, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
      NoDelay(f);
      SetTimeout(f, SO_SNDTIMEO, send_timeout_s);
      *fd = f;
      return Status::OK();
    }
    s = Errno("connect to " + host + ":" + std::to_string(port));
    close(f);
    // A server starts listening before its address is published, so a refusal is final unless the
    // deadline allows a retry (a transient failure while the peer's backlog is full).
    if (std::chrono::steady_clock::now() >= deadline) return s;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Status ReadFull(int fd, void* buf, size_t n, bool* eof) {
  char* p = static_cast<char*>(buf);
  size_t got = 0;
  if (eof != nullptr) *eof = false;
  while (got < n) {
    const ssize_t r = recv(fd, p + got, n - got, 0);
    if (r > 0) {
      got += static_cast<size_t>(r);
      continue;
    }
    if (r == 0) {
      if (got == 0 && eof != nullptr) *eof = true;
      return Status::IOError(got == 0 ? "connection closed by the peer"
                                      : "connection closed by the peer in the middle of a frame");
    }
    if (errno == EINTR) continue;
    return Errno("recv");
  }
  return Status::OK();
}

Status Discard(int fd, uint64_t n) {
  char sink[1 << 16];
  while (n > 0) {
    const size_t step = static_cast<size_t>(std::min<uint64_t>(n, sizeof(sink)));
    Status s = ReadFull(fd, sink, step);
    if (!s.ok()) return s;
    n -= step;
  }
  return Status::OK();
}

Status WriteAll(int fd, struct iovec* iov, int iovcnt) {
  while (iovcnt > 0) {
    msghdr msg;
    std::memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(iovcnt < IOV_MAX ? iovcnt : IOV_MAX);
    const ssize_t w = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Status::IOError("send timed out (the peer stopped reading)");
      return Errno("send");
    }
    size_t left = static_cast<size_t>(w);
    while (iovcnt > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --iovcnt;
    }
    if (iovcnt > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return Status::OK();
}

void ShutdownBoth(int fd) {
  if (fd >= 0) shutdown(fd, SHUT_RDWR);
}

void Close(int fd) {
  if (fd >= 0) close(fd);
}

}  // namespace net
}  // namespace psembed
