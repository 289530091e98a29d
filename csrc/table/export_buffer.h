// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// ExportBuffer: an uninitialised, page-aligned byte buffer for the bulk outputs of a table export
// (hundreds of MB per save), mapped with mmap and advised to use transparent huge pages.
//
// Why not std::vector: vector::resize value-initialises, i.e. one thread first-touches (and zeroes)
// every page before the parallel copy writes it again. On this project's VMs first-touching fresh
// memory on 4 KiB pages runs at ~1 GB/s, which made it the largest single cost of a save. Here the
// kernel hands out zeroed pages lazily, on the first write of the thread that fills that part, and
// 2 MiB pages (MADV_HUGEPAGE) take ~500x fewer faults. Untouched pages cost no memory at all.
//
// Thread safety: none (a value type); distinct bytes may be written from many threads.

#ifndef PSEMBED_TABLE_EXPORT_BUFFER_H_
#define PSEMBED_TABLE_EXPORT_BUFFER_H_

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <new>
#include <utility>

namespace psembed {

class ExportBuffer {
 public:
  ExportBuffer() = default;
  // Throws std::bad_alloc. bytes == 0 gives an empty buffer (data() == nullptr).
  explicit ExportBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes == 0) return;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      bytes_ = 0;
      throw std::bad_alloc();
    }
#ifdef MADV_HUGEPAGE
    if (bytes >= (size_t{2} << 20)) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure is fine
#endif
    data_ = static_cast<char*>(p);
  }
  ~ExportBuffer() { Reset(); }
  ExportBuffer(ExportBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  ExportBuffer& operator=(ExportBuffer&& o) noexcept {
    if (this != &o) {
      Reset();
      data_ = std::exchange(o.data_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  ExportBuffer(const ExportBuffer&) = delete;
  ExportBuffer& operator=(const ExportBuffer&) = delete;

  template <typename T>
  T* as() const {
    return reinterpret_cast<T*>(data_);
  }
  char* data() const { return data_; }
  size_t bytes() const { return bytes_; }

  void Reset() {
    if (data_ != nullptr) munmap(data_, bytes_);
    data_ = nullptr;
    bytes_ = 0;
  }

 private:
  char* data_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_EXPORT_BUFFER_H_
