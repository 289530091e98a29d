// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// HashIndex: an open-addressing map from a uint64 key to a uint32 value (the row's RowRef), one per shard.
//
// Why hand-written: the memory target is ~16 bytes of index per key on top of the row payload
// (scripts/bench_table.py at 10M keys, dim 8, AdaGrad: 84.8 bytes/key with mf against a 72-byte
// payload, 48.3 without mf; docs/benchmarks.md). std::unordered_map costs a heap node
// per key (~40-60 bytes plus the bucket array) and a pointer chase per lookup; good open-addressing
// maps (absl::flat_hash_map, ska, robin_hood) store key+value pairs with per-slot control bytes and
// would have to be vendored, which this build cannot do (no network). This one is small enough to
// read in one sitting and is tested under ASan/TSan (scripts/sanitize.sh).
//
// When to choose it: integer keys, uint32 values, single-writer under an external lock.
//
// Layout (capacity C, a multiple of 16, C = 0 before the first insert): one array of C packed
// 12-byte slots {uint64 key; uint32 value}, key 0 = empty (key 0 itself lives out of line:
// has_zero_, zero_value_). Key and value share a cache line (a slot straddles two lines 1 time in
// 16), so a hit costs one miss; two separate arrays cost two. From 2 MiB on, the array is on huge
// pages: all of it in a table's IndexArena (index_arena.h), its whole 2 MiB units on a mapping of its own.
// Probing: linear (wrapping at C), starting at Home(hash) = ((hash mod 2^32) * C) >> 32, where
// hash = TableHash(key) (util/hash.h; the shard was chosen from its high 32 bits, the probe start uses
// the low 32). Maximum load 0.7, then the capacity grows by 5/4 (a rehash), so the load stays in
// [0.56, 0.7] whatever the key count: 17-22 B of index per key (a power-of-two capacity doubling at 0.7
// would leave it anywhere in [0.35, 0.7]: 17-35 B per key). Why 0.7 and not 0.8: a hit probes
// 0.5 * (1 + 1 / (1 - load)) slots on average, 2.5 at 0.75 and 1.8 at 0.6; the shorter probes made a
// uniform pull ~7% faster and a uniform push ~4% (paired two-build runs at 10M keys, ~4 B more index per
// key; docs/benchmarks.md, "Table", session 13). Erase uses backward-shift deletion: no tombstones,
// so probe lengths do not degrade with churn.
//
// Guarantees: exception safety is strong for Insert (a failed rehash allocation throws bad_alloc and
// leaves the map unchanged); Find/Erase never throw. A rehash invalidates nothing outside (values
// are row indices, not pointers). Erase never rehashes; capacity shrinks only on Clear().
// Iteration (ForEach) is O(capacity) and must not run concurrently with mutation (the shard lock
// guarantees that); mutating inside ForEach is not allowed.
//
// Thread safety: none; the owning shard's mutex protects it.

#ifndef PSEMBED_TABLE_ROW_STORE_HASH_INDEX_H_
#define PSEMBED_TABLE_ROW_STORE_HASH_INDEX_H_

#include <cstddef>
#include <cstdint>

#include "table/row_store/index_arena.h"
#include "util/hash.h"

namespace psembed {

class HashIndex {
 public:
  static constexpr uint32_t kNotFound = 0xffffffffu;

  // The slot arrays come from arena as owner's (index_arena.h: the shards of one table share the huge
  // pages between their arrays); without an arena, each is a mapping of its own (util/huge_pages.h).
  HashIndex() = default;
  HashIndex(IndexArena* arena, uint32_t owner) : arena_(arena), owner_(owner) {}
  ~HashIndex();
  HashIndex(const HashIndex&) = delete;
  HashIndex& operator=(const HashIndex&) = delete;

  size_t size() const { return size_ + (has_zero_ ? 1 : 0); }
  size_t capacity() const { return capacity_; }
  // Bytes held by the slot array.
  size_t bytes() const { return capacity_ * sizeof(Slot); }

  // The value of key, or kNotFound. `hash` must be TableHash(key).
  uint32_t Find(uint64_t key, uint64_t hash) const {
    if (key == 0) return has_zero_ ? zero_value_ : kNotFound;
    if (capacity_ == 0) return kNotFound;
    size_t i = Home(hash);
    for (;;) {
      const uint64_t k = slots_[i].key;
      if (k == key) return slots_[i].value;
      if (k == 0) return kNotFound;
      i = Next(i);
    }
  }

  // Hints the cache about the probe of a key looked up soon: the line of its home slot and the next
  // one. A 12-byte slot straddles two lines now and then, and at load 0.56-0.7 a probe reads ~2 slots
  // on average, so a probe often ends in the next line; without it that line was a full-latency miss
  // in the middle of the lookup (a same-process A/B of the pull: 0.57x -> 0.65x of index_select).
  // always_inline: see Shard::PrefetchRecord (GCC deletes calls to a prefetch-only function it finds pure).
  __attribute__((always_inline)) void Prefetch(uint64_t hash) const {
    if (capacity_ == 0) return;
    const char* p = reinterpret_cast<const char*>(&slots_[Home(hash)]);
    __builtin_prefetch(p);
    __builtin_prefetch(p + 64);
  }

  // Adds key -> value. REQUIRES: key not present. May rehash (throws std::bad_alloc).
  void Insert(uint64_t key, uint64_t hash, uint32_t value);

  // One probe for "find, else insert" (the bulk load): returns the value of key if present; else adds
  // key -> make_value() and returns kNotFound. make_value runs only for an absent key, after any rehash,
  // so if the rehash (std::bad_alloc) or make_value throws, the map is unchanged. With capacity reserved
  // beforehand (Reserve) there is no rehash.
  template <typename MakeValue>
  uint32_t FindOrInsert(uint64_t key, uint64_t hash, MakeValue&& make_value) {
    if (key == 0) {
      if (has_zero_) return zero_value_;
      zero_value_ = make_value();
      has_zero_ = true;
      return kNotFound;
    }
    GrowIfFull();
    size_t i = Home(hash);
    for (;;) {
      const uint64_t k = slots_[i].key;
      if (k == key) return slots_[i].value;
      if (k == 0) break;
      i = Next(i);
    }
    const uint32_t value = make_value();
    slots_[i].key = key;
    slots_[i].value = value;
    ++size_;
    return kNotFound;
  }

  // Sets the value of a present key. Returns false if absent.
  bool Update(uint64_t key, uint64_t hash, uint32_t value);

  // Removes key; returns its value or kNotFound. Never rehashes.
  uint32_t Erase(uint64_t key, uint64_t hash);

  // fn(key, value) for every entry, in slot order (key 0 first).
  template <typename Fn>
  void ForEach(Fn&& fn) const {
    if (has_zero_) fn(uint64_t{0}, zero_value_);
    for (size_t i = 0; i < capacity_; ++i) {
      const uint64_t k = slots_[i].key;
      if (k != 0) fn(k, uint32_t{slots_[i].value});
    }
  }

  // Grows the arrays (once) so that n keys in all fit without a rehash. Never shrinks.
  void Reserve(size_t n);

  // Removes everything and frees the arrays.
  void Clear();

 private:
  // Packed: 12 bytes, so the index costs what two separate arrays did. Members are read and written
  // by value only (never through a pointer or reference to a possibly misaligned member).
  struct __attribute__((packed)) Slot {
    uint64_t key;
    uint32_t value;
  };
  static_assert(sizeof(Slot) == 12, "the memory budget counts 12 bytes per slot");

  void Rehash(size_t new_capacity);
  void Grow();  // Rehash to the next capacity (5/4 of this one; kMinCapacity when empty)
  // Whether size keys plus the one about to be added pass the maximum load 0.7 of capacity.
  static bool OverLoad(size_t size, size_t capacity) { return (size + 1) * 10 > capacity * 7; }
  // Before adding a key: grow if it would pass the maximum load (or there is no array yet).
  void GrowIfFull() {
    if (capacity_ == 0 || OverLoad(size_, capacity_)) Grow();
  }
  // The probe start of a hash, in [0, capacity_) (a multiply, not a modulo: capacity_ need not be a
  // power of two). REQUIRES: capacity_ > 0.
  size_t Home(uint64_t hash) const { return static_cast<size_t>(((hash & 0xffffffffu) * capacity_) >> 32); }
  size_t Next(size_t i) const { return i + 1 == capacity_ ? 0 : i + 1; }

  Slot* AllocateSlots(size_t capacity);  // zeroed, resident
  void FreeSlots(Slot* slots, size_t capacity);

  IndexArena* const arena_ = nullptr;  // may be null
  const uint32_t owner_ = 0;
  Slot* slots_ = nullptr;  // owned (AllocateSlots), capacity_ entries
  size_t capacity_ = 0;
  size_t size_ = 0;  // nonzero keys stored
  bool has_zero_ = false;
  uint32_t zero_value_ = 0;
};

}  // namespace psembed

#endif  // PSEMBED_TABLE_ROW_STORE_HASH_INDEX_H_
