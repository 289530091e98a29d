// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "table/row_store/hash_index.h"

#include <new>

#include "util/huge_pages.h"

namespace psembed {

namespace {
constexpr size_t kMinCapacity = 16;
// Grow when size + 1 > capacity * 4 / 5.
inline bool OverLoad(size_t size, size_t capacity) { return (size + 1) * 5 > capacity * 4; }
}  // namespace

HashIndex::~HashIndex() { Clear(); }

void HashIndex::Clear() {
  HugePageFree(slots_, capacity_ * sizeof(Slot));
  slots_ = nullptr;
  capacity_ = mask_ = size_ = 0;
  has_zero_ = false;
  zero_value_ = 0;
}

void HashIndex::Reserve(size_t n) {
  size_t cap = capacity_ == 0 ? kMinCapacity : capacity_;
  while (OverLoad(n, cap)) cap *= 2;
  if (cap != capacity_) Rehash(cap);
}

void HashIndex::Rehash(size_t new_capacity) {
  auto* slots = static_cast<Slot*>(HugePageAlloc(new_capacity * sizeof(Slot)));  // zeroed: all empty
  const size_t mask = new_capacity - 1;
  for (size_t i = 0; i < capacity_; ++i) {
    const uint64_t k = slots_[i].key;
    if (k == 0) continue;
    size_t j = TableHash(k) & mask;
    while (slots[j].key != 0) j = (j + 1) & mask;
    slots[j].key = k;
    slots[j].value = slots_[i].value;
  }
  HugePageFree(slots_, capacity_ * sizeof(Slot));
  slots_ = slots;
  capacity_ = new_capacity;
  mask_ = mask;
}

void HashIndex::Grow() { Rehash(capacity_ == 0 ? kMinCapacity : capacity_ * 2); }

void HashIndex::Insert(uint64_t key, uint64_t hash, uint32_t value) {
  if (key == 0) {
    has_zero_ = true;
    zero_value_ = value;
    return;
  }
  if (capacity_ == 0 || OverLoad(size_, capacity_)) Grow();
  size_t i = hash & mask_;
  while (slots_[i].key != 0) i = (i + 1) & mask_;
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
  size_t i = hash & mask_;
  for (;;) {
    const uint64_t k = slots_[i].key;
    if (k == key) {
      slots_[i].value = value;
      return true;
    }
    if (k == 0) return false;
    i = (i + 1) & mask_;
  }
}

uint32_t HashIndex::Erase(uint64_t key, uint64_t hash) {
  if (key == 0) {
    if (!has_zero_) return kNotFound;
    has_zero_ = false;
    return zero_value_;
  }
  if (capacity_ == 0) return kNotFound;
  size_t i = hash & mask_;
  for (;;) {
    const uint64_t k = slots_[i].key;
    if (k == 0) return kNotFound;
    if (k == key) break;
    i = (i + 1) & mask_;
  }
  const uint32_t value = slots_[i].value;
  // Backward-shift: pull later entries of the cluster into the hole when their home slot is at or
  // before the hole (cyclically), so every entry stays reachable from its home without tombstones.
  size_t hole = i;
  size_t j = (i + 1) & mask_;
  while (slots_[j].key != 0) {
    const size_t home = TableHash(slots_[j].key) & mask_;
    // Distance from home to j, and from hole to j (both cyclic). Move if home is not in (hole, j].
    if (((j - home) & mask_) >= ((j - hole) & mask_)) {
      slots_[hole].key = slots_[j].key;
      slots_[hole].value = slots_[j].value;
      hole = j;
    }
    j = (j + 1) & mask_;
  }
  slots_[hole].key = 0;
  --size_;
  return value;
}

}  // namespace psembed
