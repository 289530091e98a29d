// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Status: errors are values in the core (as in LevelDB); bindings/ turns them into Python exceptions.

#ifndef PSEMBED_UTIL_STATUS_H_
#define PSEMBED_UTIL_STATUS_H_

#include <string>
#include <utility>

namespace psembed {

class Status {
 public:
  // Do not renumber: bindings map codes to exception types.
  enum Code { kOk = 0, kInvalidArgument = 1, kNotFound = 2, kCorruption = 3, kIOError = 4,
              kResourceExhausted = 5 };

  Status() = default;
  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string msg) { return Status(kInvalidArgument, std::move(msg)); }
  static Status NotFound(std::string msg) { return Status(kNotFound, std::move(msg)); }
  static Status Corruption(std::string msg) { return Status(kCorruption, std::move(msg)); }
  static Status IOError(std::string msg) { return Status(kIOError, std::move(msg)); }
  // Memory (or threads) ran out: Python sees MemoryError.
  static Status ResourceExhausted(std::string msg) { return Status(kResourceExhausted, std::move(msg)); }

  bool ok() const { return code_ == kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return msg_; }

 private:
  Status(Code code, std::string msg) : code_(code), msg_(std::move(msg)) {}
  Code code_ = kOk;
  std::string msg_;
};

}  // namespace psembed

#endif  // PSEMBED_UTIL_STATUS_H_
