// TopKCollector: bounded top-k selection for scans (flat, IVF lists).
//
// Candidates scoring at least the current threshold are appended to a buffer
// of 2k + slack entries; when it fills, nth_element keeps the k best and the
// k-th best score becomes the new threshold. Amortised O(1) per offered
// candidate, and most candidates are rejected by one compare. Order is total:
// larger score first, then smaller id, so results are deterministic and equal
// a std::sort oracle with that order regardless of scan order.
//
// Used by the exact scan (exact_topk.h) and the retrieval indexes. Allocates
// only in Reset when growing.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

namespace kvr {

struct ScoredId {
  float score;
  uint32_t id;
};

// True when a ranks before b.
inline bool BetterScored(const ScoredId& a, const ScoredId& b) {
  return a.score > b.score || (a.score == b.score && a.id < b.id);
}

class TopKCollector {
 public:
  static constexpr size_t kSlack = 64;

  // Empties the collector for a new query wanting k results.
  void Reset(size_t k) {
    k_ = k;
    cap_ = 2 * k + kSlack;
    if (buf_.size() < cap_) buf_.resize(cap_);
    n_ = 0;
    threshold_ = -std::numeric_limits<float>::infinity();
  }

  // Candidates scoring below threshold() can be skipped by the caller.
  float threshold() const { return threshold_; }

  void Push(float score, uint32_t id) {
    if (score < threshold_) return;
    buf_[n_++] = {score, id};
    if (n_ == cap_) Compact();
  }

  // Offers scores[j] with id first_id + j for every j (a contiguous scan).
  void PushRange(const float* scores, size_t n, uint32_t first_id) {
    float t = threshold_;
    for (size_t j = 0; j < n; ++j) {
      if (scores[j] >= t) {
        Push(scores[j], first_id + static_cast<uint32_t>(j));
        t = threshold_;
      }
    }
  }

  // Offers scores[j] with id ids[j].
  void PushIds(const float* scores, const uint32_t* ids, size_t n) {
    float t = threshold_;
    for (size_t j = 0; j < n; ++j) {
      if (scores[j] >= t) {
        Push(scores[j], ids[j]);
        t = threshold_;
      }
    }
  }

  // Writes the best min(k, seen) results best first, pads the rest of the k
  // slots with id -1 / score -inf. The collector must be Reset before reuse.
  void Finish(int64_t* ids, float* scores) {
    const size_t m = std::min(n_, k_);
    if (n_ > k_) std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.begin() + n_,
                                  BetterScored);
    std::sort(buf_.begin(), buf_.begin() + m, BetterScored);
    for (size_t j = 0; j < m; ++j) {
      ids[j] = buf_[j].id;
      scores[j] = buf_[j].score;
    }
    for (size_t j = m; j < k_; ++j) {
      ids[j] = -1;
      scores[j] = -std::numeric_limits<float>::infinity();
    }
  }

  size_t MemoryBytes() const { return buf_.capacity() * sizeof(ScoredId); }

 private:
  void Compact() {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.begin() + n_, BetterScored);
    n_ = k_;
    threshold_ = buf_[k_ - 1].score;
  }

  size_t k_ = 0;
  size_t cap_ = 0;
  size_t n_ = 0;
  float threshold_ = -std::numeric_limits<float>::infinity();
  std::vector<ScoredId> buf_;
};

}  // namespace kvr
