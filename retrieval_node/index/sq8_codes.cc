#include "retrieval_node/index/sq8_codes.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/simd/kernels.h"

namespace kvr::index {

absl::Status ValidateRerankFactor(int rerank_factor, absl::string_view field) {
  if (rerank_factor < 1 || rerank_factor > kMaxSq8RerankFactor) {
    return absl::InvalidArgumentError(absl::StrCat(field, " ", rerank_factor, " outside [1, ",
                                                   kMaxSq8RerankFactor, "]"));
  }
  return absl::OkStatus();
}

namespace {

// 1 / scale in double, 0 when the scale is 0 or its inverse is not finite.
double Inverse(float scale) {
  if (!(scale > 0.0f)) return 0.0;
  const double inv = 1.0 / static_cast<double>(scale);
  return std::isfinite(inv) ? inv : 0.0;
}

}  // namespace

Sq8Quantizer Sq8Quantizer::Train(ConstMatrixView keys, size_t dim) {
  Sq8Quantizer q;
  q.lo_.assign(dim, 0.0f);
  q.scale_.assign(dim, 0.0f);
  q.inv_scale_.assign(dim, 0.0);
  if (keys.rows() == 0) return q;
  std::vector<float> hi(dim);
  for (size_t j = 0; j < dim; ++j) q.lo_[j] = hi[j] = keys.row(0)[j];
  for (size_t i = 1; i < keys.rows(); ++i) {
    const float* x = keys.row(i);
    for (size_t j = 0; j < dim; ++j) {
      q.lo_[j] = std::min(q.lo_[j], x[j]);
      hi[j] = std::max(hi[j], x[j]);
    }
  }
  for (size_t j = 0; j < dim; ++j) {
    // In double: hi - lo of finite floats may exceed the float range.
    q.scale_[j] = static_cast<float>(
        (static_cast<double>(hi[j]) - static_cast<double>(q.lo_[j])) / 255.0);
    q.inv_scale_[j] = Inverse(q.scale_[j]);
  }
  return q;
}

absl::StatusOr<Sq8Quantizer> Sq8Quantizer::Read(BinaryReader& r, size_t dim) {
  Sq8Quantizer q;
  KVR_RETURN_IF_ERROR(r.GetArray(&q.lo_, "sq8 lo", dim));
  KVR_RETURN_IF_ERROR(r.GetArray(&q.scale_, "sq8 scale", dim));
  if (q.lo_.size() != dim || q.scale_.size() != dim) {
    return absl::DataLossError(absl::StrCat("sq8 codes: field 'sq8 lo'/'sq8 scale' hold ",
                                            q.lo_.size(), "/", q.scale_.size(),
                                            " values, expected dim ", dim));
  }
  q.inv_scale_.resize(dim);
  for (size_t j = 0; j < dim; ++j) {
    if (!std::isfinite(q.lo_[j])) {
      return absl::DataLossError(
          absl::StrCat("sq8 codes: field 'sq8 lo' dim ", j, " is not finite"));
    }
    if (!std::isfinite(q.scale_[j]) || q.scale_[j] < 0.0f) {
      return absl::DataLossError(absl::StrCat("sq8 codes: field 'sq8 scale' dim ", j, " value ",
                                              q.scale_[j], " is not finite and >= 0"));
    }
    q.inv_scale_[j] = Inverse(q.scale_[j]);
  }
  return q;
}

void Sq8Quantizer::Write(BinaryWriter& w) const {
  w.PutArray(std::span<const float>(lo_));
  w.PutArray(std::span<const float>(scale_));
}

void Sq8Quantizer::EncodeKey(const float* x, size_t slot, uint8_t* blocks) const {
  const size_t dpad = padded_dim();
  for (size_t j = 0; j < lo_.size(); ++j) {
    const double v = (static_cast<double>(x[j]) - static_cast<double>(lo_[j])) * inv_scale_[j];
    uint8_t c = 0;
    if (v >= 255.0) {
      c = 255;
    } else if (v > 0.0) {  // false for NaN
      c = static_cast<uint8_t>(std::lrint(v));
    }
    blocks[simd::Sq8BlockOffset(slot, j, dpad)] = c;
  }
}

void Sq8Quantizer::EncodeQuery(const float* q, int8_t* out) const {
  const size_t d = lo_.size();
  double m = 0;
  for (size_t j = 0; j < d; ++j) {
    m = std::max(m, std::fabs(static_cast<double>(q[j]) * static_cast<double>(scale_[j])));
  }
  const double f = (m > 0.0 && std::isfinite(m)) ? 127.0 / m : 0.0;
  for (size_t j = 0; j < d; ++j) {
    const double v = static_cast<double>(q[j]) * static_cast<double>(scale_[j]) * f;
    out[j] = static_cast<int8_t>(std::clamp<long>(std::lrint(v), -127, 127));
  }
  std::fill(out + d, out + padded_dim(), int8_t{0});
}

void Sq8Codes::Append(const Sq8Quantizer& quantizer, const float* key) {
  if (n_ % simd::kSq8Block == 0) bytes_.resize(bytes_.size() + simd::Sq8BlockBytes(dpad_), 0);
  quantizer.EncodeKey(key, n_, bytes_.data());
  ++n_;
}

void Sq8Codes::Reserve(size_t n) {
  bytes_.reserve((n + simd::kSq8Block - 1) / simd::kSq8Block * simd::Sq8BlockBytes(dpad_));
}

size_t Sq8Scratch::MemoryBytes() const {
  size_t b = query.capacity() + dots.capacity() * sizeof(int32_t) + results.MemoryBytes() +
             hits.capacity() * sizeof(uint32_t) +
             cand_ids.capacity() * sizeof(int64_t) +
             (cand_scores.capacity() + exact.capacity()) * sizeof(float) +
             gather_ids.capacity() * sizeof(uint32_t);
  for (const TopKCollector& c : candidates) b += c.MemoryBytes();
  return b;
}

void BeginSq8Search(const Sq8Quantizer& quantizer, const float* query, size_t candidates,
                    size_t slot, Sq8Scratch& s) {
  s.dpad = quantizer.padded_dim();
  if (s.query.size() < kSq8QueryBlock * s.dpad) s.query.resize(kSq8QueryBlock * s.dpad);
  quantizer.EncodeQuery(query, s.query.data() + slot * s.dpad);
  s.candidates[slot].Reset(candidates);
  if (s.cand_ids.size() < candidates) {
    s.cand_ids.resize(candidates);
    s.cand_scores.resize(candidates);
  }
}

namespace {

// An int32 bound T such that every code dot x with float(x) >= t has x >= T
// (|float(x) - x| <= 128 for int32 x): select_ge with T keeps a superset of
// what the collector takes, and the float check below decides exactly.
int32_t IntThreshold(float t) {
  if (!(t > static_cast<float>(std::numeric_limits<int32_t>::min()) + 512.0f)) {
    return std::numeric_limits<int32_t>::min();  // -inf, NaN, or near the bottom
  }
  const double lo = std::floor(static_cast<double>(t)) - 256.0;
  if (lo >= static_cast<double>(std::numeric_limits<int32_t>::max())) {
    return std::numeric_limits<int32_t>::max();
  }
  return static_cast<int32_t>(lo);
}

}  // namespace

size_t ScanSq8Codes(const simd::Sq8Kernels& kern, const Sq8Codes& codes, const uint32_t* ids,
                    uint32_t first_id, size_t nq, Sq8Scratch& s) {
  // Chunks of 32 blocks (512 keys): every query's dots for a chunk (nq x 2
  // KiB) stay in L1; the codes are read once per chunk for all nq queries.
  constexpr size_t kChunkBlocks = 32;
  constexpr size_t kChunkKeys = kChunkBlocks * simd::kSq8Block;
  static_assert(kSq8QueryBlock <= simd::kSq8MaxMultiQueries);
  const size_t n = codes.size();
  if (n == 0 || nq == 0) return 0;
  if (s.dots.size() < kSq8QueryBlock * kChunkKeys) s.dots.resize(kSq8QueryBlock * kChunkKeys);
  if (s.hits.size() < kChunkKeys) s.hits.resize(kChunkKeys);
  const size_t nblocks = codes.blocks();
  const size_t block_bytes = simd::Sq8BlockBytes(s.dpad);
  for (size_t b0 = 0; b0 < nblocks; b0 += kChunkBlocks) {
    const size_t nb = std::min(kChunkBlocks, nblocks - b0);
    const size_t first = b0 * simd::kSq8Block;
    const size_t m = std::min(nb * simd::kSq8Block, n - first);
    kern.scan_sq8_multi(s.query.data(), s.dpad, nq, codes.data() + b0 * block_bytes, nb, s.dpad,
                        s.dots.data(), kChunkKeys);
    for (size_t q = 0; q < nq; ++q) {
      TopKCollector& cands = s.candidates[q];
      const int32_t* dots = s.dots.data() + q * kChunkKeys;
      float t = cands.threshold();
      // Most keys fall below the threshold once it has risen: vector
      // compares find the few that do not.
      const size_t hits = kern.select_ge(dots, m, IntThreshold(t), s.hits.data());
      for (size_t h = 0; h < hits; ++h) {
        const size_t i = s.hits[h];
        const float v = static_cast<float>(dots[i]);
        if (v >= t) {
          cands.Push(v, ids != nullptr ? ids[first + i]
                                       : first_id + static_cast<uint32_t>(first + i));
          t = cands.threshold();
        }
      }
    }
  }
  return n;
}

size_t RerankExact(const float* query, ConstMatrixView keys, size_t candidates, size_t k,
                   size_t slot, Sq8Scratch& s, int64_t* ids, float* scores,
                   std::span<const uint32_t> always, std::span<const uint64_t> always_bits) {
  s.candidates[slot].Finish(s.cand_ids.data(), s.cand_scores.data());
  const size_t most = candidates + always.size();
  if (s.gather_ids.size() < most) s.gather_ids.resize(most);
  if (s.exact.size() < most) s.exact.resize(most);
  size_t m = 0;
  for (size_t i = 0; i < candidates; ++i) {
    const int64_t id = s.cand_ids[i];
    if (id < 0) break;
    const auto u = static_cast<uint64_t>(id);
    if (!always.empty() && ((always_bits[u / 64] >> (u % 64)) & 1)) continue;  // added below
    s.gather_ids[m++] = static_cast<uint32_t>(id);
  }
  for (uint32_t a : always) s.gather_ids[m++] = a;
  simd::Active().dot_gather(query, keys.row(0), s.gather_ids.data(), m, keys.cols(),
                            keys.stride(), s.exact.data());
  s.results.Reset(k);
  s.results.PushIds(s.exact.data(), s.gather_ids.data(), m);
  s.results.Finish(ids, scores);
  return m;
}

}  // namespace kvr::index
