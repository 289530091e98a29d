// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/row_store/hash_index.h"

#include <new>

#include "util/huge_pages.h"

namespace psembed {

namespace {
constexpr size_t kMinCapacity = 16;
// Home() multiplies 32 hash bits by the capacity in 64 bits.
constexpr size_t kMaxCapacity = size_t{1} << 32;
// The next capacity: 5/4 of this one rounded up to a multiple of 16 (16 slots of 12 B = 3 cache lines).
// Growth by 5/4 keeps the load in [0.56, 0.7] (~19 B of index per key), where doubling leaves it
// anywhere in [0.35, 0.7] (up to 35 B per key, by luck of the key count); the price is more rehashing
// (each key is moved ~4 times over the table's growth instead of ~1), paid only while a table grows
// (a checkpoint load reserves its size once).
inline size_t GrownCapacity(size_t capacity) {
  if (capacity == 0) return kMinCapacity;
  return (capacity + capacity / 4 + 15) / 16 * 16;
}
}  // namespace

HashIndex::~HashIndex() { Clear(); }

void HashIndex::Clear() {
  FreeSlots(slots_, capacity_);
  slots_ = nullptr;
  capacity_ = size_ = 0;
  has_zero_ = false;
  zero_value_ = 0;
}

void HashIndex::Reserve(size_t n) {
  size_t cap = capacity_ == 0 ? kMinCapacity : capacity_;
  while (OverLoad(n, cap)) cap = GrownCapacity(cap);
  if (cap != capacity_) Rehash(cap);
}

void HashIndex::Rehash(size_t new_capacity) {
  if (new_capacity > kMaxCapacity) throw std::bad_alloc();
  // Zeroed (all empty) and prefaulted: every slot is probed (read) before some are written, which on
  // fresh pages would map the zero page first and cost a TLB shootdown per page (huge_pages.h).
  Slot* slots = AllocateSlots(new_capacity);
  Slot* old = slots_;
  const size_t old_capacity = capacity_;
  slots_ = slots;  // Home/Next now follow the new capacity
  capacity_ = new_capacity;
  for (size_t i = 0; i < old_capacity; ++i) {
    const uint64_t k = old[i].key;
    if (k == 0) continue;
    size_t j = Home(TableHash(k));
    while (slots_[j].key != 0) j = Next(j);
    slots_[j].key = k;
    slots_[j].value = old[i].value;
  }
  FreeSlots(old, old_capacity);
}

HashIndex::Slot* HashIndex::AllocateSlots(size_t capacity) {
  const size_t bytes = capacity * sizeof(Slot);
  void* p = arena_ != nullptr ? arena_->Allocate(bytes, owner_) : HugePageAlloc(bytes, /*prefault=*/true);
  return static_cast<Slot*>(p);
}

void HashIndex::FreeSlots(Slot* slots, size_t capacity) {
  if (arena_ != nullptr) {
    arena_->Free(slots, capacity * sizeof(Slot), owner_);
  } else {
    HugePageFree(slots, capacity * sizeof(Slot));
  }
}

void HashIndex::Grow() { Rehash(GrownCapacity(capacity_)); }

void HashIndex::Insert(uint64_t key, uint64_t hash, uint32_t value) {
  if (key == 0) {
    has_zero_ = true;
    zero_value_ = value;
    return;
  }
  GrowIfFull();
  size_t i = Home(hash);
  while (slots_[i].key != 0) i = Next(i);
  slots_[i].key = key;
  slots_[i].value = value;
  ++size_;
}

bool HashIndex::Update(uint64_t key, uint64_t hash, uint32_t value) {
  if (key == 0) {
    if (!has_zero_) return false;
    zero_value_ = value;
    return true;
  }
  if (capacity_ == 0) return false;
  size_t i = Home(hash);
  for (;;) {
    const uint64_t k = slots_[i].key;
    if (k == key) {
      slots_[i].value = value;
      return true;
    }
    if (k == 0) return false;
    i = Next(i);
  }
}

uint32_t HashIndex::Erase(uint64_t key, uint64_t hash) {
  if (key == 0) {
    if (!has_zero_) return kNotFound;
    has_zero_ = false;
    return zero_value_;
  }
  if (capacity_ == 0) return kNotFound;
  size_t i = Home(hash);
  for (;;) {
    const uint64_t k = slots_[i].key;
    if (k == 0) return kNotFound;
    if (k == key) break;
    i = Next(i);
  }
  const uint32_t value = slots_[i].value;
  // Backward-shift: pull later entries of the cluster into the hole when their home slot is at or
  // before the hole (cyclically), so every entry stays reachable from its home without tombstones.
  size_t hole = i;
  size_t j = Next(i);
  // Cyclic distance from a forward to b.
  auto dist = [this](size_t a, size_t b) { return b >= a ? b - a : b + capacity_ - a; };
  while (slots_[j].key != 0) {
    const size_t home = Home(TableHash(slots_[j].key));
    // Move if home is not in (hole, j] (cyclically): then the hole is on j's probe path.
    if (dist(home, j) >= dist(hole, j)) {
      slots_[hole].key = slots_[j].key;
      slots_[hole].value = slots_[j].value;
      hole = j;
    }
    j = Next(j);
  }
  slots_[hole].key = 0;
  --size_;
  return value;
}

}  // namespace psembed
