// A fixed-capacity beam of the best-scoring candidates seen by a graph search,
// kept sorted best first, with a cursor to the best unexpanded entry (the
// sorted-array priority queue of DiskANN). Insert is O(capacity) memmove,
// which beats heaps for the beam widths graph search uses (tens to hundreds).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvr::index {

class Beam {
 public:
  // Empties the beam and sets its capacity (allocates only when growing).
  void Reset(size_t capacity) {
    capacity_ = capacity;
    if (ids_.size() < capacity + 1) {
      ids_.resize(capacity + 1);
      scores_.resize(capacity + 1);
      expanded_.resize(capacity + 1);
    }
    size_ = 0;
    cursor_ = 0;
  }

  // Offers a candidate; ignored when the beam is full and it scores no better
  // than the worst entry. Ids must not be offered twice (callers track visits).
  void Insert(uint32_t id, float score) {
    if (size_ == capacity_ && score <= scores_[size_ - 1]) return;
    // Position: first entry with a lower score (stable for ties).
    size_t lo = 0, hi = size_;
    while (lo < hi) {
      const size_t mid = (lo + hi) / 2;
      if (scores_[mid] >= score) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    const size_t end = size_ < capacity_ ? size_ : capacity_ - 1;
    for (size_t i = end; i > lo; --i) {
      ids_[i] = ids_[i - 1];
      scores_[i] = scores_[i - 1];
      expanded_[i] = expanded_[i - 1];
    }
    ids_[lo] = id;
    scores_[lo] = score;
    expanded_[lo] = 0;
    if (size_ < capacity_) ++size_;
    if (lo < cursor_) cursor_ = lo;
  }

  bool HasUnexpanded() {
    while (cursor_ < size_ && expanded_[cursor_]) ++cursor_;
    return cursor_ < size_;
  }
  // Marks the best unexpanded entry expanded and returns its id. Call only
  // after HasUnexpanded() returned true.
  uint32_t PopUnexpanded() {
    expanded_[cursor_] = 1;
    return ids_[cursor_++];
  }

  size_t size() const { return size_; }
  uint32_t id(size_t i) const { return ids_[i]; }
  float score(size_t i) const { return scores_[i]; }
  size_t MemoryBytes() const {
    return ids_.capacity() * sizeof(uint32_t) + scores_.capacity() * sizeof(float) +
           expanded_.capacity();
  }

 private:
  std::vector<uint32_t> ids_;
  std::vector<float> scores_;
  std::vector<uint8_t> expanded_;
  size_t capacity_ = 0;
  size_t size_ = 0;
  size_t cursor_ = 0;
};

}  // namespace kvr::index
