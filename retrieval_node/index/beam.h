// A fixed-capacity beam of the best-scoring candidates seen by a graph search,
// kept sorted best first, with a cursor to the best unexpanded entry (the
// sorted-array priority queue of DiskANN). Entries are 8 bytes (score, id with
// the "expanded" flag in its top bit), so an insert is one binary search and
// one memmove; that beats heaps for the beam widths graph search uses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kvr::index {

class Beam {
 public:
  // Empties the beam and sets its capacity (allocates only when growing).
  void Reset(size_t capacity) {
    capacity_ = capacity;
    if (entries_.size() < capacity + 1) entries_.resize(capacity + 1);
    size_ = 0;
    cursor_ = 0;
  }

  // Offers a candidate (ids < 2^31); ignored when the beam is full and it
  // scores no better than the worst entry. Ids must not be offered twice.
  void Insert(uint32_t id, float score) {
    if (size_ == capacity_ && score <= entries_[size_ - 1].score) return;
    // Position: first entry with a lower score (stable for ties).
    size_t lo = 0, hi = size_;
    while (lo < hi) {
      const size_t mid = (lo + hi) / 2;
      if (entries_[mid].score >= score) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const size_t end = size_ < capacity_ ? size_ : capacity_ - 1;
    if (end > lo) std::memmove(&entries_[lo + 1], &entries_[lo], (end - lo) * sizeof(Entry));
    entries_[lo] = {score, id};
    if (size_ < capacity_) ++size_;
    if (lo < cursor_) cursor_ = lo;
  }

  bool HasUnexpanded() {
    while (cursor_ < size_ && (entries_[cursor_].id & kExpanded) != 0) ++cursor_;
    return cursor_ < size_;
  }
  // Marks the best unexpanded entry expanded and returns its id. Call only
  // after HasUnexpanded() returned true.
  uint32_t PopUnexpanded() {
    entries_[cursor_].id |= kExpanded;
    return entries_[cursor_++].id & ~kExpanded;
  }

  // The id PopUnexpanded() would return next. Call only after
  // HasUnexpanded() returned true.
  uint32_t PeekUnexpanded() const { return entries_[cursor_].id & ~kExpanded; }

  size_t size() const { return size_; }
  uint32_t id(size_t i) const { return entries_[i].id & ~kExpanded; }
  float score(size_t i) const { return entries_[i].score; }
  size_t MemoryBytes() const { return entries_.capacity() * sizeof(Entry); }

 private:
  static constexpr uint32_t kExpanded = 0x80000000u;
  struct Entry {
    float score;
    uint32_t id;
  };
  std::vector<Entry> entries_;
  size_t capacity_ = 0;
  size_t size_ = 0;
  size_t cursor_ = 0;
};

}  // namespace kvr::index
