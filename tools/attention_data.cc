#include "tools/attention_data.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/simd/kernels.h"
#include "common/status.h"

namespace kvr {
namespace {

// ---------------------------------------------------------------------------
// Counter-based randomness: every row gets its own generator seeded from
// (seed, stream, row), so output never depends on how rows are split over
// threads.
// ---------------------------------------------------------------------------

enum Stream : uint64_t {
  kStreamModel = 1,     // scales, means, outliers, topic vectors (sequential)
  kStreamSegments = 2,  // key topic runs (sequential)
  kStreamKeys = 3,
  kStreamValues = 4,
  kStreamTrain = 5,
  kStreamTest = 6,
  kStreamTrainPositions = 7,
  kStreamStats = 8,
  kStreamSink = 9,  // the sink family's sink-plane noise
};

inline uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// SplitMix64 stream.
class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream, uint64_t index)
      : state_(Mix64(Mix64(seed ^ 0x6a09e667f3bcc909ULL) + stream * 0x9e3779b97f4a7c15ULL) ^
               Mix64(index + 0x3c6ef372fe94f82bULL)) {}

  uint64_t Next() { return Mix64(state_ += 0x9e3779b97f4a7c15ULL); }
  // Uniform in [0, 1).
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }
  // Uniform in [0, n).
  uint64_t Below(uint64_t n) {
    return static_cast<uint64_t>((static_cast<unsigned __int128>(Next()) * n) >> 64);
  }
  // Standard normal, double precision (for the few model parameters).
  double Normal() {
    const double u1 = 1.0 - Uniform();  // (0, 1]
    const double u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }
  // n standard normals in float (Box-Muller; one 64-bit draw per pair).
  void FillNormal(float* out, size_t n) {
    size_t i = 0;
    for (; i + 1 < n; i += 2) {
      float a, b;
      Pair(a, b);
      out[i] = a;
      out[i + 1] = b;
    }
    if (i < n) {
      float a, b;
      Pair(a, b);
      out[i] = a;
    }
  }

 private:
  void Pair(float& a, float& b) {
    const uint64_t x = Next();
    const float u1 = static_cast<float>((x >> 40) + 1) * 0x1.0p-24f;  // (0, 1]
    const float u2 = static_cast<float>(x & 0xffffff) * 0x1.0p-24f;   // [0, 1)
    const float r = std::sqrt(-2.0f * std::log(u1));
    const float angle = 6.2831853071795864f * u2;
    a = r * std::cos(angle);
    b = r * std::sin(angle);
  }

  uint64_t state_;
};

// ---------------------------------------------------------------------------
// RoPE with angles from two tables: angle(pos) = hi * 1024 * ω + lo * ω,
// combined with the angle-sum identity in double (error ~1e-15).
// ---------------------------------------------------------------------------

class RopeTable {
 public:
  static constexpr int kLoBits = 10;

  RopeTable(size_t dim, double theta, int64_t max_pos) : pairs_(dim / 2) {
    const size_t lo_rows = size_t{1} << kLoBits;
    const size_t hi_rows = static_cast<size_t>(max_pos >> kLoBits) + 1;
    lo_.resize(lo_rows * pairs_ * 2);
    hi_.resize(hi_rows * pairs_ * 2);
    for (size_t i = 0; i < pairs_; ++i) {
      const double omega = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
      for (size_t r = 0; r < lo_rows; ++r) {
        const double a = static_cast<double>(r) * omega;
        lo_[(r * pairs_ + i) * 2] = std::cos(a);
        lo_[(r * pairs_ + i) * 2 + 1] = std::sin(a);
      }
      for (size_t r = 0; r < hi_rows; ++r) {
        const double a = static_cast<double>(r << kLoBits) * omega;
        hi_[(r * pairs_ + i) * 2] = std::cos(a);
        hi_[(r * pairs_ + i) * 2 + 1] = std::sin(a);
      }
    }
  }

  void Rotate(float* x, int64_t pos) const {
    const double* lo = &lo_[(static_cast<size_t>(pos) & ((size_t{1} << kLoBits) - 1)) * pairs_ * 2];
    const double* hi = &hi_[(static_cast<size_t>(pos) >> kLoBits) * pairs_ * 2];
    for (size_t i = 0; i < pairs_; ++i) {
      const double c = hi[2 * i] * lo[2 * i] - hi[2 * i + 1] * lo[2 * i + 1];
      const double s = hi[2 * i + 1] * lo[2 * i] + hi[2 * i] * lo[2 * i + 1];
      const double x0 = x[2 * i], x1 = x[2 * i + 1];
      x[2 * i] = static_cast<float>(x0 * c - x1 * s);
      x[2 * i + 1] = static_cast<float>(x0 * s + x1 * c);
    }
  }

 private:
  size_t pairs_;
  std::vector<double> lo_;  // [1024][pairs][cos, sin]
  std::vector<double> hi_;  // [max_pos/1024 + 1][pairs][cos, sin]
};

// ---------------------------------------------------------------------------
// The head's fixed parameters.
// ---------------------------------------------------------------------------

struct HeadModel {
  size_t dim = 0;
  std::vector<float> key_noise;    // per-channel std of a key's non-topic part
  std::vector<float> query_noise;  // per-channel std of a query's non-topic part
  std::vector<float> key_mean;
  std::vector<float> query_mean;
  std::vector<float> decode_mean;  // query_mean + decode shift
  std::vector<uint32_t> outlier_channel;
  std::vector<float> outlier_value;  // signed magnitude
  float outlier_spread = 0;
  float value_noise = 0;
  Matrix key_topic;    // topics x dim: the topic part of a key
  Matrix query_topic;  // topics x dim: the topic part of a query
  Matrix value_topic;  // topics x dim
  std::vector<double> topic_cdf;
};

void NormalizeRms(std::vector<double>& v) {
  double ss = 0;
  for (double x : v) ss += x * x;
  const double scale = ss > 0 ? std::sqrt(static_cast<double>(v.size()) / ss) : 0.0;
  for (double& x : v) x *= scale;
}

// v scaled to Euclidean norm `norm` (zero stays zero).
std::vector<float> WithNorm(const std::vector<double>& v, double norm) {
  double ss = 0;
  for (double x : v) ss += x * x;
  const double scale = ss > 0 ? norm / std::sqrt(ss) : 0.0;
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(v[i] * scale);
  return out;
}

HeadModel BuildModel(const AttentionDataOptions& o) {
  const size_t d = o.dim, pairs = d / 2;
  Rng rng(o.seed, kStreamModel, 0);
  HeadModel m;
  m.dim = d;

  // Key scales: power law over pairs ranked (mostly) from low to high frequency.
  std::vector<double> score(pairs);
  for (size_t p = 0; p < pairs; ++p) {
    score[p] = static_cast<double>(p) / static_cast<double>(pairs) + o.spectrum_jitter * rng.Uniform();
  }
  std::vector<size_t> order(pairs);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return score[a] > score[b]; });
  std::vector<double> key_scale(d);
  for (size_t rank = 0; rank < pairs; ++rank) {
    const double s = std::pow(1.0 + static_cast<double>(rank), -o.spectrum_decay);
    const size_t p = order[rank];
    key_scale[2 * p] = s * std::exp(0.1 * rng.Normal());
    key_scale[2 * p + 1] = s * std::exp(0.1 * rng.Normal());
  }
  NormalizeRms(key_scale);
  std::vector<double> query_scale(d);
  for (size_t c = 0; c < d; ++c) {
    query_scale[c] = std::pow(key_scale[c], 1.0 - o.query_spectrum_tilt) *
                     std::exp(o.query_spectrum_jitter * rng.Normal());
  }
  NormalizeRms(query_scale);

  const double sqrt_d = std::sqrt(static_cast<double>(d));
  const double key_unit = o.key_norm / sqrt_d;
  // Var over keys of q·k/√d for a typical query: Σ_c (u_q s_q,c · key_unit s_k,c)² / d.
  double per_unit = 0;
  for (size_t c = 0; c < d; ++c) {
    const double w = query_scale[c] * key_unit * key_scale[c];
    per_unit += w * w;
  }
  const double query_unit = o.logit_std / std::sqrt(per_unit / static_cast<double>(d));
  m.key_noise.resize(d);
  m.query_noise.resize(d);
  for (size_t c = 0; c < d; ++c) {
    m.key_noise[c] = static_cast<float>(key_unit * key_scale[c] * std::sqrt(1 - o.key_topic_share));
    m.query_noise[c] = static_cast<float>(query_unit * query_scale[c] * std::sqrt(1 - o.concentration));
  }

  // Means. μ_k follows the key energy; μ_q lies where keys barely vary.
  std::vector<double> dir(d);
  for (size_t c = 0; c < d; ++c) dir[c] = key_scale[c] * (rng.Uniform() < 0.5 ? -1 : 1);
  m.key_mean = WithNorm(dir, o.key_mean * o.key_norm);
  // μ_q ∝ 1/s_k, sized so that its Mahalanobis norm under the key content
  // covariance is query_mean * √d (a key's own is ≈ √d). Its logit
  // contribution stays small: keys barely vary along it.
  double whitened = 0;
  for (size_t c = 0; c < d; ++c) {
    dir[c] = (rng.Uniform() < 0.5 ? -1 : 1) / key_scale[c];
    whitened += dir[c] * dir[c] / (key_unit * key_unit * key_scale[c] * key_scale[c]);
  }
  m.query_mean.resize(d);
  for (size_t c = 0; c < d; ++c) {
    m.query_mean[c] = static_cast<float>(dir[c] * o.query_mean * sqrt_d / std::sqrt(whitened));
  }
  for (size_t c = 0; c < d; ++c) dir[c] = query_scale[c] * rng.Normal();
  const std::vector<float> shift = WithNorm(dir, o.decode_shift * query_unit * sqrt_d);
  m.decode_mean.resize(d);
  for (size_t c = 0; c < d; ++c) m.decode_mean[c] = m.query_mean[c] + shift[c];

  // Outliers among the lowest-frequency quarter of the pairs.
  const size_t low_pairs = std::max<size_t>(1, pairs / 4);
  std::vector<uint32_t> candidates;
  for (size_t p = pairs - low_pairs; p < pairs; ++p) {
    candidates.push_back(static_cast<uint32_t>(2 * p));
    candidates.push_back(static_cast<uint32_t>(2 * p + 1));
  }
  for (size_t i = 0; i < o.outlier_channels; ++i) {
    std::swap(candidates[i], candidates[i + rng.Below(candidates.size() - i)]);
    m.outlier_channel.push_back(candidates[i]);
    m.outlier_value.push_back(
        static_cast<float>((rng.Uniform() < 0.5 ? -1 : 1) * o.outlier_scale * key_unit));
  }
  m.outlier_spread = static_cast<float>(o.outlier_spread);

  // Topic vectors and popularity.
  const size_t k = o.topics;
  m.key_topic = Matrix(k, d);
  m.query_topic = Matrix(k, d);
  m.value_topic = Matrix(k, d);
  const double key_share = std::sqrt(o.key_topic_share), query_share = std::sqrt(o.concentration);
  const double value_share = std::sqrt(o.value_topic_share);
  for (size_t j = 0; j < k; ++j) {
    for (size_t c = 0; c < d; ++c) {
      const double t = rng.Normal();
      m.key_topic.row(j)[c] = static_cast<float>(key_unit * key_scale[c] * key_share * t);
      m.query_topic.row(j)[c] = static_cast<float>(query_unit * query_scale[c] * query_share * t);
      m.value_topic.row(j)[c] = static_cast<float>(value_share * rng.Normal());
    }
  }
  m.value_noise = static_cast<float>(std::sqrt(1 - o.value_topic_share));
  m.topic_cdf.resize(k);
  double total = 0;
  for (size_t j = 0; j < k; ++j) {
    total += std::pow(1.0 + static_cast<double>(j), -o.topic_skew);
    m.topic_cdf[j] = total;
  }
  for (double& c : m.topic_cdf) c /= total;
  return m;
}

uint32_t SampleTopic(const HeadModel& m, double u) {
  const auto it = std::upper_bound(m.topic_cdf.begin(), m.topic_cdf.end(), u);
  return static_cast<uint32_t>(std::min<size_t>(it - m.topic_cdf.begin(), m.topic_cdf.size() - 1));
}

std::vector<uint32_t> KeyTopics(const AttentionDataOptions& o, const HeadModel& m) {
  Rng rng(o.seed, kStreamSegments, 0);
  std::vector<uint32_t> topics(o.n_keys);
  const double log_stay = o.segment_length > 1 ? std::log1p(-1.0 / o.segment_length) : 0;
  size_t t = 0;
  while (t < o.n_keys) {
    size_t len = 1;
    if (log_stay < 0) {
      const double g = std::floor(std::log(1.0 - rng.Uniform()) / log_stay);
      len += static_cast<size_t>(std::min(g, 1e12));
    }
    const uint32_t z = SampleTopic(m, rng.Uniform());
    const size_t end = std::min(o.n_keys, t + len);
    std::fill(topics.begin() + t, topics.begin() + end, z);
    t = end;
  }
  return topics;
}

template <typename T>
absl::Status CheckRange(absl::string_view name, T value, T lo, T hi) {
  if (!(value >= lo && value <= hi)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " must be in [", lo, ", ", hi, "], got ", value));
  }
  return absl::OkStatus();
}

constexpr size_t kRowGrain = 2048;

}  // namespace

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

std::vector<std::string> AttentionDataPresetNames() { return {"easy", "default", "hard"}; }

std::vector<std::string> AttentionFamilyNames() {
  return {"topical", "lowrank", "flat", "positional", "sink"};
}

absl::StatusOr<AttentionDataOptions> AttentionDataPreset(absl::string_view name) {
  AttentionDataOptions o;
  if (name == "default") return o;
  // Difficulty for key-key indexes grows with the intrinsic dimension of the
  // keys (smaller spectrum_decay), with how differently queries weight the
  // channels (query_spectrum_tilt) and with less topical queries
  // (concentration); outliers distort key-key L2 neighbourhoods.
  if (name == "easy") {
    o.spectrum_decay = 1.5;
    o.query_spectrum_tilt = 0.5;
    o.outlier_scale = 4.0;
    o.concentration = 0.7;
    o.logit_std = 4.0;
    return o;
  }
  if (name == "hard") {
    o.spectrum_decay = 0.75;
    o.query_spectrum_tilt = 1.5;
    o.outlier_scale = 16.0;
    o.concentration = 0.35;
    o.logit_std = 2.5;
    return o;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown preset '", name, "' (known: easy, default, hard)"));
}

absl::Status ValidateAttentionDataOptions(const AttentionDataOptions& o) {
  constexpr size_t kMaxRows = (size_t{1} << 31) - 1;
  KVR_RETURN_IF_ERROR(CheckRange<size_t>("n_keys", o.n_keys, 1, kMaxRows));
  KVR_RETURN_IF_ERROR(CheckRange<size_t>("n_train", o.n_train, 0, o.n_keys));
  KVR_RETURN_IF_ERROR(CheckRange<size_t>("n_test", o.n_test, 0, kMaxRows));
  KVR_RETURN_IF_ERROR(CheckRange<size_t>("dim", o.dim, 2, 1024));
  if (o.dim % 2 != 0) return absl::InvalidArgumentError(absl::StrCat("dim must be even, got ", o.dim));
  KVR_RETURN_IF_ERROR(CheckRange<double>("rope_theta", o.rope_theta, 1.0 + 1e-9, 1e12));
  KVR_RETURN_IF_ERROR(CheckRange<size_t>("test_position_offset", o.test_position_offset, 0, kMaxRows));
  KVR_RETURN_IF_ERROR(CheckRange<double>("spectrum_decay", o.spectrum_decay, 0, 4));
  KVR_RETURN_IF_ERROR(CheckRange<double>("spectrum_jitter", o.spectrum_jitter, 0, 4));
  KVR_RETURN_IF_ERROR(CheckRange<double>("query_spectrum_tilt", o.query_spectrum_tilt, 0, 2));
  KVR_RETURN_IF_ERROR(CheckRange<double>("query_spectrum_jitter", o.query_spectrum_jitter, 0, 4));
  KVR_RETURN_IF_ERROR(CheckRange<double>("key_norm", o.key_norm, 1e-6, 1e6));
  KVR_RETURN_IF_ERROR(CheckRange<double>("logit_std", o.logit_std, 1e-6, 1e3));
  KVR_RETURN_IF_ERROR(CheckRange<double>("key_mean", o.key_mean, 0, 1e3));
  KVR_RETURN_IF_ERROR(CheckRange<double>("query_mean", o.query_mean, 0, 1e3));
  KVR_RETURN_IF_ERROR(
      CheckRange<size_t>("outlier_channels", o.outlier_channels, 0, 2 * std::max<size_t>(1, o.dim / 8)));
  KVR_RETURN_IF_ERROR(CheckRange<double>("outlier_scale", o.outlier_scale, 0, 1e4));
  KVR_RETURN_IF_ERROR(CheckRange<double>("outlier_spread", o.outlier_spread, 0, 100));
  KVR_RETURN_IF_ERROR(CheckRange<size_t>("topics", o.topics, 1, size_t{1} << 16));
  KVR_RETURN_IF_ERROR(CheckRange<double>("topic_skew", o.topic_skew, 0, 10));
  KVR_RETURN_IF_ERROR(CheckRange<double>("segment_length", o.segment_length, 1, 1e9));
  KVR_RETURN_IF_ERROR(CheckRange<double>("key_topic_share", o.key_topic_share, 0, 1));
  KVR_RETURN_IF_ERROR(CheckRange<double>("concentration", o.concentration, 0, 1));
  KVR_RETURN_IF_ERROR(CheckRange<double>("decode_shift", o.decode_shift, 0, 1e3));
  KVR_RETURN_IF_ERROR(CheckRange<double>("value_topic_share", o.value_topic_share, 0, 1));
  const std::vector<std::string> families = AttentionFamilyNames();
  if (std::find(families.begin(), families.end(), o.family) == families.end()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "family must be one of topical, lowrank, flat, positional, sink; got '", o.family, "'"));
  }
  // Family knobs are named by their kvr_datagen flags (<family>_<field>).
  const LowRankFamilyOptions& lr = o.lowrank;
  KVR_RETURN_IF_ERROR(CheckRange<size_t>("lowrank_planes", lr.planes, 1, o.dim / 2));
  KVR_RETURN_IF_ERROR(
      CheckRange<size_t>("lowrank_manifold_dim", lr.manifold_dim, 1, std::min<size_t>(16, 2 * lr.planes)));
  KVR_RETURN_IF_ERROR(CheckRange<double>("lowrank_curvature", lr.curvature, 0, 10));
  KVR_RETURN_IF_ERROR(
      CheckRange<double>("lowrank_correlation_length", lr.correlation_length, 1, 1e9));
  KVR_RETURN_IF_ERROR(CheckRange<double>("lowrank_noise", lr.noise, 0, 0.5));
  KVR_RETURN_IF_ERROR(CheckRange<double>("lowrank_query_reweight", lr.query_reweight, 0, 4));
  KVR_RETURN_IF_ERROR(CheckRange<double>("lowrank_query_offset", lr.query_offset, 0, 100));
  KVR_RETURN_IF_ERROR(CheckRange<double>("lowrank_query_spread", lr.query_spread, 0, 10));
  KVR_RETURN_IF_ERROR(CheckRange<double>("lowrank_logit_std", lr.logit_std, 1e-6, 1e3));
  KVR_RETURN_IF_ERROR(CheckRange<double>("flat_spectrum_decay", o.flat.spectrum_decay, 0, 4));
  KVR_RETURN_IF_ERROR(CheckRange<double>("flat_shared_query", o.flat.shared_query, 0, 1));
  KVR_RETURN_IF_ERROR(CheckRange<double>("flat_logit_std", o.flat.logit_std, 1e-6, 1e3));
  const PositionalFamilyOptions& pos = o.positional;
  KVR_RETURN_IF_ERROR(
      CheckRange<double>("positional_recency_window", pos.recency_window, 1, 1e9));
  KVR_RETURN_IF_ERROR(
      CheckRange<double>("positional_position_logit", pos.position_logit, 0, 1e3));
  KVR_RETURN_IF_ERROR(
      CheckRange<double>("positional_content_logit_std", pos.content_logit_std, 1e-6, 1e3));
  if (o.family == "positional" && !o.apply_rope) {
    return absl::InvalidArgumentError(
        "family positional needs apply_rope = true (its structure is RoPE's)");
  }
  KVR_RETURN_IF_ERROR(CheckRange<size_t>("sink_keys", o.sink.sink_keys, 1, 64));
  KVR_RETURN_IF_ERROR(CheckRange<double>("sink_mass", o.sink.sink_mass, 1e-3, 0.999));
  KVR_RETURN_IF_ERROR(CheckRange<double>("sink_rest_logit_std", o.sink.rest_logit_std, 1e-6, 1e3));
  if (o.family == "sink" && (o.sink.sink_keys > o.n_keys || o.dim < 4)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "family sink needs sink_keys <= n_keys and dim >= 4, got sink_keys = ", o.sink.sink_keys,
        ", n_keys = ", o.n_keys, ", dim = ", o.dim));
  }
  if (o.topics * o.dim > (size_t{1} << 26)) {
    return absl::InvalidArgumentError(absl::StrCat("topics * dim must be <= 2^26, got ", o.topics,
                                                   " * ", o.dim));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

void ApplyRope(MatrixView x, std::span<const int64_t> positions, double theta) {
  KVR_CHECK(x.cols() % 2 == 0);
  KVR_CHECK(positions.size() == x.rows());
  if (x.rows() == 0) return;
  const int64_t max_pos = *std::max_element(positions.begin(), positions.end());
  KVR_CHECK(*std::min_element(positions.begin(), positions.end()) >= 0);
  const RopeTable table(x.cols(), theta, max_pos);
  for (size_t r = 0; r < x.rows(); ++r) table.Rotate(x.row(r), positions[r]);
}

namespace {

// Training positions (a sorted sample of [0, n_keys), or all of them) and
// decode positions (n_keys + test_position_offset + j) into `out`; returns
// the largest position any row may be rotated to.
int64_t FillPositions(const AttentionDataOptions& o, AttentionData& out) {
  if (o.n_train == o.n_keys) {
    out.train_positions.resize(o.n_train);
    std::iota(out.train_positions.begin(), out.train_positions.end(), int64_t{0});
  } else {
    std::vector<int64_t> all(o.n_keys);
    std::iota(all.begin(), all.end(), int64_t{0});
    Rng rng(o.seed, kStreamTrainPositions, 0);
    for (size_t i = 0; i < o.n_train; ++i) std::swap(all[i], all[i + rng.Below(o.n_keys - i)]);
    all.resize(o.n_train);
    std::sort(all.begin(), all.end());
    out.train_positions = std::move(all);
  }
  const int64_t first_test = static_cast<int64_t>(o.n_keys + o.test_position_offset);
  out.test_positions.resize(o.n_test);
  std::iota(out.test_positions.begin(), out.test_positions.end(), first_test);
  return first_test + static_cast<int64_t>(o.n_test);
}

// The "topical" family (the file comment of attention_data.h).
AttentionData GenerateTopical(const AttentionDataOptions& o, ThreadPool* pool) {
  const size_t d = o.dim;
  const HeadModel m = BuildModel(o);

  AttentionData out;
  out.key_topics = KeyTopics(o, m);
  const std::vector<uint32_t>& key_topics = out.key_topics;
  const int64_t max_pos = FillPositions(o, out);
  const RopeTable rope(d, o.rope_theta, max_pos);

  // Keys (+ outliers) and values.
  out.keys = Matrix(o.n_keys, d);
  out.values = Matrix(o.n_keys, d);
  pool->ParallelFor(o.n_keys, kRowGrain, [&](size_t begin, size_t end) {
    std::vector<float> noise(d + m.outlier_channel.size());
    for (size_t t = begin; t < end; ++t) {
      const uint32_t z = key_topics[t];
      Rng rng(o.seed, kStreamKeys, t);
      rng.FillNormal(noise.data(), noise.size());
      float* k = out.keys.row(t);
      const float* topic = m.key_topic.row(z);
      for (size_t c = 0; c < d; ++c) k[c] = m.key_mean[c] + topic[c] + m.key_noise[c] * noise[c];
      for (size_t j = 0; j < m.outlier_channel.size(); ++j) {
        k[m.outlier_channel[j]] += m.outlier_value[j] * (1.0f + m.outlier_spread * noise[d + j]);
      }
      if (o.apply_rope) rope.Rotate(k, static_cast<int64_t>(t));

      Rng vrng(o.seed, kStreamValues, t);
      float* v = out.values.row(t);
      vrng.FillNormal(v, d);
      const float* vt = m.value_topic.row(z);
      for (size_t c = 0; c < d; ++c) v[c] = vt[c] + m.value_noise * v[c];
    }
  });

  // Queries: topic part + noise + mean, rotated to their positions.
  auto make_queries = [&](Matrix& q, const std::vector<int64_t>& positions, Stream stream,
                          bool decode) {
    q = Matrix(positions.size(), d);
    const std::vector<float>& mean = decode ? m.decode_mean : m.query_mean;
    pool->ParallelFor(positions.size(), kRowGrain, [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) {
        Rng rng(o.seed, stream, i);
        // Prefill queries attend to their own passage's topic; decode queries
        // to the topic of some earlier position.
        const uint32_t z = decode ? key_topics[rng.Below(o.n_keys)]
                                  : key_topics[static_cast<size_t>(positions[i])];
        float* row = q.row(i);
        rng.FillNormal(row, d);
        const float* topic = m.query_topic.row(z);
        for (size_t c = 0; c < d; ++c) row[c] = mean[c] + topic[c] + m.query_noise[c] * row[c];
        if (o.apply_rope) rope.Rotate(row, positions[i]);
      }
    });
  };
  make_queries(out.train_queries, out.train_positions, kStreamTrain, /*decode=*/false);
  make_queries(out.test_queries, out.test_positions, kStreamTest, /*decode=*/true);
  return out;
}

// ---------------------------------------------------------------------------
// The other families (attention_data.h, file comment).
// ---------------------------------------------------------------------------

// Values N(0, I), one generator per row.
Matrix RandomValues(const AttentionDataOptions& o, ThreadPool* pool) {
  Matrix v(o.n_keys, o.dim);
  pool->ParallelFor(o.n_keys, kRowGrain, [&](size_t begin, size_t end) {
    for (size_t t = begin; t < end; ++t) {
      Rng rng(o.seed, kStreamValues, t);
      rng.FillNormal(v.row(t), o.dim);
    }
  });
  return v;
}

// min(count, n) row indices spread evenly over [0, n).
std::vector<size_t> SpreadRows(size_t n, size_t count) {
  count = std::min(count, n);
  std::vector<size_t> rows(count);
  for (size_t i = 0; i < count; ++i) rows[i] = i * n / count;
  return rows;
}

// q·k/√d in double.
double Logit(const float* q, const float* k, size_t d) {
  double dot = 0;
  for (size_t c = 0; c < d; ++c) dot += static_cast<double>(q[c]) * k[c];
  return dot / std::sqrt(static_cast<double>(d));
}

// Mean over up to 64 spread query rows of the std of q·k/√d over up to 4096
// spread keys (double precision, so deterministic).
double MeanLogitStd(const Matrix& keys, const Matrix& queries) {
  const std::vector<size_t> key_rows = SpreadRows(keys.rows, 4096);
  const std::vector<size_t> query_rows = SpreadRows(queries.rows, 64);
  if (key_rows.empty() || query_rows.empty()) return 0;
  double total = 0;
  for (size_t qi : query_rows) {
    double sum = 0, sum2 = 0;
    for (size_t ki : key_rows) {
      const double l = Logit(queries.row(qi), keys.row(ki), keys.cols);
      sum += l;
      sum2 += l * l;
    }
    const double n = static_cast<double>(key_rows.size());
    const double mean = sum / n;
    total += std::sqrt(std::max(0.0, sum2 / n - mean * mean));
  }
  return total / static_cast<double>(query_rows.size());
}

// Scales every query (training and decode by the same factor) so that the
// training queries' (else the decode queries') MeanLogitStd is `target`.
void ScaleQueriesToLogitStd(double target, AttentionData& out) {
  const Matrix& probe = out.train_queries.rows > 0 ? out.train_queries : out.test_queries;
  const double measured = MeanLogitStd(out.keys, probe);
  if (!(measured > 0)) return;
  const float factor = static_cast<float>(target / measured);
  for (float& x : out.train_queries.data) x *= factor;
  for (float& x : out.test_queries.data) x *= factor;
}

AttentionData GenerateLowRank(const AttentionDataOptions& o, ThreadPool* pool) {
  const LowRankFamilyOptions& f = o.lowrank;
  const size_t d = o.dim, pairs = d / 2, m = f.manifold_dim, nf = 2 * f.planes;
  const size_t n_sine = nf - m;  // nf >= m (validated)
  AttentionData out;
  const RopeTable rope(d, o.rope_theta, FillPositions(o, out));

  // The span: the `planes` lowest-frequency pairs.
  std::vector<uint32_t> span(nf);
  std::vector<uint8_t> in_span(d, 0);
  for (size_t j = 0; j < f.planes; ++j) {
    const size_t p = pairs - 1 - j;
    span[2 * j] = static_cast<uint32_t>(2 * p);
    span[2 * j + 1] = static_cast<uint32_t>(2 * p + 1);
    in_span[2 * p] = in_span[2 * p + 1] = 1;
  }
  Rng rng(o.seed, kStreamModel, 0);
  std::vector<double> freq(n_sine * m), phase(n_sine), mix(nf * nf), weight(nf), mean(nf);
  for (double& w : freq) w = f.curvature * rng.Normal();
  for (double& b : phase) b = 2.0 * M_PI * rng.Uniform();
  double mix_ss = 0;
  for (double& a : mix) {
    a = rng.Normal();
    mix_ss += a * a;
  }
  for (double& w : weight) w = std::exp(f.query_reweight * rng.Normal());
  for (double& x : mean) x = rng.Normal();
  // Features have unit variance (z ~ N(0, 1), √2 sin(·) with a uniform phase),
  // so E|A f|² = Σ A² and the content RMS norm comes out at key_norm.
  const double content_scale = o.key_norm / std::sqrt(mix_ss / static_cast<double>(nf));
  const std::vector<float> key_mean = WithNorm(mean, 0.5 * o.key_norm);
  const float noise_std = static_cast<float>(std::sqrt(f.noise / (1.0 - f.noise)) * o.key_norm /
                                             std::sqrt(static_cast<double>(d)));
  auto features = [&](const float* z, double* feat) {
    for (size_t i = 0; i < m; ++i) feat[i] = z[i];
    for (size_t j = 0; j < n_sine; ++j) {
      double a = phase[j];
      for (size_t i = 0; i < m; ++i) a += freq[j * m + i] * z[i];
      feat[m + j] = std::sqrt(2.0) * std::sin(a);
    }
  };

  // Latent walk over positions (sequential; O(n_keys * m)).
  std::vector<float> latent(o.n_keys * m);
  {
    Rng walk(o.seed, kStreamSegments, 0);
    const double rho = std::exp(-1.0 / f.correlation_length);
    const double step = std::sqrt(1.0 - rho * rho);
    for (size_t i = 0; i < m; ++i) latent[i] = static_cast<float>(walk.Normal());
    for (size_t t = 1; t < o.n_keys; ++t) {
      for (size_t i = 0; i < m; ++i) {
        latent[t * m + i] =
            static_cast<float>(rho * latent[(t - 1) * m + i] + step * walk.Normal());
      }
    }
  }

  out.keys = Matrix(o.n_keys, d);
  pool->ParallelFor(o.n_keys, kRowGrain, [&](size_t begin, size_t end) {
    std::vector<double> feat(nf);
    for (size_t t = begin; t < end; ++t) {
      Rng krng(o.seed, kStreamKeys, t);
      float* k = out.keys.row(t);
      krng.FillNormal(k, d);
      for (size_t c = 0; c < d; ++c) k[c] *= noise_std;
      features(&latent[t * m], feat.data());
      for (size_t r = 0; r < nf; ++r) {
        double v = 0;
        for (size_t c = 0; c < nf; ++c) v += mix[r * nf + c] * feat[c];
        k[span[r]] += key_mean[r] + static_cast<float>(content_scale * v);
      }
      if (o.apply_rope) rope.Rotate(k, static_cast<int64_t>(t));
    }
  });
  out.values = RandomValues(o, pool);

  auto make_queries = [&](Matrix& q, const std::vector<int64_t>& positions, Stream stream,
                          bool decode) {
    q = Matrix(positions.size(), d);
    pool->ParallelFor(positions.size(), kRowGrain, [&](size_t begin, size_t end) {
      std::vector<float> z(m);
      std::vector<double> feat(nf), inside(nf);
      const double out_dims = static_cast<double>(d - nf);
      for (size_t i = begin; i < end; ++i) {
        Rng qrng(o.seed, stream, i);
        // Training queries look for their own position's region of the
        // manifold, decode queries for that of a random earlier position.
        const size_t target =
            decode ? static_cast<size_t>(qrng.Below(o.n_keys)) : static_cast<size_t>(positions[i]);
        qrng.FillNormal(z.data(), m);
        for (size_t j = 0; j < m; ++j) {
          z[j] = latent[target * m + j] + static_cast<float>(f.query_spread) * z[j];
        }
        features(z.data(), feat.data());
        double in_ss = 0;
        for (size_t r = 0; r < nf; ++r) {
          double v = 0;
          for (size_t c = 0; c < nf; ++c) v += mix[r * nf + c] * weight[c] * feat[c];
          inside[r] = v;
          in_ss += v * v;
        }
        float* row = q.row(i);
        qrng.FillNormal(row, d);
        const float out_scale =
            out_dims > 0 ? static_cast<float>(f.query_offset * std::sqrt(in_ss / out_dims)) : 0.0f;
        for (size_t c = 0; c < d; ++c) row[c] = in_span[c] ? 0.0f : row[c] * out_scale;
        for (size_t r = 0; r < nf; ++r) row[span[r]] = static_cast<float>(inside[r]);
        if (o.apply_rope) rope.Rotate(row, positions[i]);
      }
    });
  };
  make_queries(out.train_queries, out.train_positions, kStreamTrain, /*decode=*/false);
  make_queries(out.test_queries, out.test_positions, kStreamTest, /*decode=*/true);
  ScaleQueriesToLogitStd(f.logit_std, out);
  return out;
}

AttentionData GenerateFlat(const AttentionDataOptions& o, ThreadPool* pool) {
  const FlatFamilyOptions& f = o.flat;
  const size_t d = o.dim;
  AttentionData out;
  const RopeTable rope(d, o.rope_theta, FillPositions(o, out));

  Rng rng(o.seed, kStreamModel, 0);
  // Key channel scales: a shallow power law over a random channel order.
  std::vector<size_t> order(d);
  std::iota(order.begin(), order.end(), size_t{0});
  for (size_t i = 0; i + 1 < d; ++i) std::swap(order[i], order[i + rng.Below(d - i)]);
  std::vector<double> key_scale(d), query_scale(d), dir(d);
  for (size_t r = 0; r < d; ++r) {
    key_scale[order[r]] = std::pow(1.0 + static_cast<double>(r), -f.spectrum_decay);
  }
  NormalizeRms(key_scale);
  for (double& s : query_scale) s = std::exp(rng.Normal());
  NormalizeRms(query_scale);
  for (size_t c = 0; c < d; ++c) dir[c] = key_scale[c] * rng.Normal();
  const std::vector<float> key_mean = WithNorm(dir, 0.5 * o.key_norm);
  for (size_t c = 0; c < d; ++c) dir[c] = rng.Normal();
  const std::vector<float> query_mean =
      WithNorm(dir, std::sqrt(f.shared_query * static_cast<double>(d)));
  const double key_unit = o.key_norm / std::sqrt(static_cast<double>(d));
  const double own = std::sqrt(1.0 - f.shared_query);

  out.keys = Matrix(o.n_keys, d);
  pool->ParallelFor(o.n_keys, kRowGrain, [&](size_t begin, size_t end) {
    for (size_t t = begin; t < end; ++t) {
      Rng krng(o.seed, kStreamKeys, t);
      float* k = out.keys.row(t);
      krng.FillNormal(k, d);
      for (size_t c = 0; c < d; ++c) {
        k[c] = key_mean[c] + static_cast<float>(key_unit * key_scale[c]) * k[c];
      }
      if (o.apply_rope) rope.Rotate(k, static_cast<int64_t>(t));
    }
  });
  out.values = RandomValues(o, pool);
  auto make_queries = [&](Matrix& q, const std::vector<int64_t>& positions, Stream stream) {
    q = Matrix(positions.size(), d);
    pool->ParallelFor(positions.size(), kRowGrain, [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) {
        Rng qrng(o.seed, stream, i);
        float* row = q.row(i);
        qrng.FillNormal(row, d);
        for (size_t c = 0; c < d; ++c) {
          row[c] = query_mean[c] + static_cast<float>(own * query_scale[c]) * row[c];
        }
        if (o.apply_rope) rope.Rotate(row, positions[i]);
      }
    });
  };
  make_queries(out.train_queries, out.train_positions, kStreamTrain);
  make_queries(out.test_queries, out.test_positions, kStreamTest);
  ScaleQueriesToLogitStd(f.logit_std, out);
  return out;
}

AttentionData GeneratePositional(const AttentionDataOptions& o, ThreadPool* pool) {
  const PositionalFamilyOptions& f = o.positional;
  const size_t d = o.dim, pairs = d / 2;
  AttentionData out;
  const RopeTable rope(d, o.rope_theta, FillPositions(o, out));

  // The recency vector c lives on the pairs with ω in [1/(4W), 16/W]
  // (W = recency_window): they stay in phase for Δ << W and drift apart
  // beyond it, while the faster pairs, left out, would only add aliasing
  // ripples. With c_i = (√A, 0) on keys and queries, the RoPE'd product is
  // A Σ_i cos(Δ ω_i). No pair in the band: the one nearest 1/W.
  std::vector<float> c(d, 0.0f);
  std::vector<size_t> active;
  size_t nearest = 0;
  for (size_t i = 0; i < pairs; ++i) {
    const double omega =
        std::pow(o.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(d));
    const double x = omega * f.recency_window;
    if (x >= 0.25 && x <= 16.0) active.push_back(i);
    const double best = std::pow(o.rope_theta, -2.0 * static_cast<double>(nearest) /
                                                   static_cast<double>(d)) * f.recency_window;
    if (std::abs(std::log(x)) < std::abs(std::log(best))) nearest = i;
  }
  if (active.empty()) active.push_back(nearest);
  const double sqrt_d = std::sqrt(static_cast<double>(d));
  const double a = f.position_logit * sqrt_d / static_cast<double>(active.size());
  for (size_t i : active) c[2 * i] = static_cast<float>(std::sqrt(a));
  // Content: keys c + s g, queries c + s h; the content logit variance is
  // s⁴ (g·h) + 2 s² |c|²/d (cross terms), set to content_logit_std².
  const double na = static_cast<double>(active.size()) * a / static_cast<double>(d);
  const double s2 = -na + std::sqrt(na * na + f.content_logit_std * f.content_logit_std);
  const float s = static_cast<float>(std::sqrt(s2));

  auto make_rows = [&](Matrix& x, size_t rows, auto position, Stream stream) {
    x = Matrix(rows, d);
    pool->ParallelFor(rows, kRowGrain, [&](size_t begin, size_t end) {
      for (size_t i = begin; i < end; ++i) {
        Rng xrng(o.seed, stream, i);
        float* row = x.row(i);
        xrng.FillNormal(row, d);
        for (size_t j = 0; j < d; ++j) row[j] = c[j] + s * row[j];
        rope.Rotate(row, position(i));
      }
    });
  };
  make_rows(out.keys, o.n_keys, [](size_t i) { return static_cast<int64_t>(i); }, kStreamKeys);
  make_rows(out.train_queries, o.n_train, [&](size_t i) { return out.train_positions[i]; },
            kStreamTrain);
  make_rows(out.test_queries, o.n_test, [&](size_t i) { return out.test_positions[i]; },
            kStreamTest);
  out.values = RandomValues(o, pool);
  return out;
}

AttentionData GenerateSink(const AttentionDataOptions& o, ThreadPool* pool) {
  const SinkFamilyOptions& f = o.sink;
  AttentionDataOptions base = o;
  base.logit_std = f.rest_logit_std;
  AttentionData out = GenerateTopical(base, pool);
  // The sink plane: the lowest-frequency pair, left unrotated.
  const size_t d = o.dim, c0 = d - 2, c1 = d - 1;
  const double sqrt_d = std::sqrt(static_cast<double>(d));
  const float small = static_cast<float>(0.1 * o.key_norm / sqrt_d);
  pool->ParallelFor(o.n_keys, kRowGrain, [&](size_t begin, size_t end) {
    for (size_t t = std::max(begin, f.sink_keys); t < end; ++t) {
      float* k = out.keys.row(t);
      Rng srng(o.seed, kStreamSink, t);
      float g[2];
      srng.FillNormal(g, 2);
      k[c0] = small * g[0];
      k[c1] = small * g[1];
    }
  });
  // A sink key is the mean of the other keys plus its sink value: a query's
  // sink logit is then its mean logit plus a margin, so the sinks' share
  // does not swing with each query's logit offset.
  std::vector<double> mean(d, 0.0);
  for (size_t t = f.sink_keys; t < o.n_keys; ++t) {
    for (size_t c = 0; c < d; ++c) mean[c] += out.keys.row(t)[c];
  }
  for (size_t j = 0; j < f.sink_keys; ++j) {
    float* k = out.keys.row(j);
    for (size_t c = 0; c < d; ++c) {
      k[c] = o.n_keys > f.sink_keys
                 ? static_cast<float>(mean[c] / static_cast<double>(o.n_keys - f.sink_keys))
                 : 0.0f;
    }
    k[c0] = k[c1] = 0.0f;  // the sink value, below
  }
  const float b = static_cast<float>(o.key_norm);
  for (Matrix* q : {&out.train_queries, &out.test_queries}) {
    for (size_t i = 0; i < q->rows; ++i) {
      q->row(i)[c0] = b;
      q->row(i)[c1] = 0.0f;
    }
  }
  // The typical gap between a query's log-sum-exp over the other keys and
  // its logit on a sink before the sink value (median over up to 64 training
  // and 64 decode queries, each over up to 4096 spread keys scaled up to all
  // of them).
  std::vector<size_t> key_rows;
  for (size_t r : SpreadRows(o.n_keys - f.sink_keys, 4096)) key_rows.push_back(r + f.sink_keys);
  if (key_rows.empty()) return out;  // no other keys: nothing to size
  const double key_factor = std::log(static_cast<double>(o.n_keys - f.sink_keys) /
                                     static_cast<double>(key_rows.size()));
  std::vector<double> gap;
  for (const Matrix* q : {&out.train_queries, &out.test_queries}) {
    for (size_t qi : SpreadRows(q->rows, 64)) {
      const float* row = q->row(qi);
      std::vector<double> logits;
      double mx = -1e300;
      for (size_t ki : key_rows) {
        logits.push_back(Logit(row, out.keys.row(ki), d));
        mx = std::max(mx, logits.back());
      }
      double sum = 0;
      for (double l : logits) sum += std::exp(l - mx);
      gap.push_back(mx + std::log(sum) + key_factor - Logit(row, out.keys.row(0), d));
    }
  }
  if (gap.empty()) return out;  // no queries: nothing to size
  std::nth_element(gap.begin(), gap.begin() + gap.size() / 2, gap.end());
  const double typical = gap[gap.size() / 2];
  // Sink j's share of the sinks' mass ∝ 2^-j.
  const double total_weight = 2.0 - std::ldexp(1.0, 1 - static_cast<int>(f.sink_keys));
  for (size_t j = 0; j < f.sink_keys; ++j) {
    const double share = std::ldexp(1.0, -static_cast<int>(j)) / total_weight;
    const double margin = typical + std::log(f.sink_mass / (1.0 - f.sink_mass)) + std::log(share);
    out.keys.row(j)[c0] = static_cast<float>(margin * sqrt_d / b);
  }
  return out;
}

}  // namespace

absl::StatusOr<AttentionData> GenerateAttentionData(const AttentionDataOptions& o,
                                                    ThreadPool* pool) {
  KVR_RETURN_IF_ERROR(ValidateAttentionDataOptions(o));
  if (pool == nullptr) pool = &ThreadPool::Default();
  if (o.family == "lowrank") return GenerateLowRank(o, pool);
  if (o.family == "flat") return GenerateFlat(o, pool);
  if (o.family == "positional") return GeneratePositional(o, pool);
  if (o.family == "sink") return GenerateSink(o, pool);
  return GenerateTopical(o, pool);
}

// ---------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------

namespace {

// Lower-triangular Cholesky factor of a dense symmetric d x d matrix (row
// major, double); false when not positive definite.
bool Cholesky(std::vector<double>& a, size_t d) {
  for (size_t j = 0; j < d; ++j) {
    double diag = a[j * d + j];
    for (size_t k = 0; k < j; ++k) diag -= a[j * d + k] * a[j * d + k];
    if (!(diag > 0)) return false;
    const double ljj = std::sqrt(diag);
    a[j * d + j] = ljj;
    for (size_t i = j + 1; i < d; ++i) {
      double v = a[i * d + j];
      for (size_t k = 0; k < j; ++k) v -= a[i * d + k] * a[j * d + k];
      a[i * d + j] = v / ljj;
    }
  }
  for (size_t i = 0; i < d; ++i) {
    for (size_t j = i + 1; j < d; ++j) a[i * d + j] = 0;
  }
  return true;
}

// |L⁻¹ (x - mean)| by forward substitution.
double WhitenedNorm(const std::vector<double>& l, const std::vector<double>& mean, const float* x,
                    size_t d, std::vector<double>& y) {
  double ss = 0;
  for (size_t i = 0; i < d; ++i) {
    double v = static_cast<double>(x[i]) - mean[i];
    for (size_t k = 0; k < i; ++k) v -= l[i * d + k] * y[k];
    y[i] = v / l[i * d + i];
    ss += y[i] * y[i];
  }
  return std::sqrt(ss);
}

// First `count` entries of a seeded shuffle of [0, n).
std::vector<uint32_t> SampleRows(size_t n, size_t count, Rng& rng) {
  std::vector<uint32_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0u);
  count = std::min(count, n);
  for (size_t i = 0; i < count; ++i) std::swap(ids[i], ids[i + rng.Below(n - i)]);
  ids.resize(count);
  return ids;
}

// Ids of the k largest scores (ties: lower id), sorted ascending by id.
std::vector<uint32_t> TopKSet(const std::vector<float>& scores, size_t k,
                              std::vector<uint32_t>& scratch) {
  scratch.resize(scores.size());
  std::iota(scratch.begin(), scratch.end(), 0u);
  auto better = [&](uint32_t a, uint32_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
  };
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), better);
  std::vector<uint32_t> top(scratch.begin(), scratch.begin() + k);
  std::sort(top.begin(), top.end());
  return top;
}

size_t Overlap(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
  size_t i = 0, j = 0, n = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i] < b[j]) {
      ++i;
    } else if (b[j] < a[i]) {
      ++j;
    } else {
      ++n, ++i, ++j;
    }
  }
  return n;
}

struct TopKProbe {
  std::vector<uint32_t> top;  // sorted by id
  double mass = 0;
  double l2_overlap = 0;
};

// Exact top-k of `q` over `ref`, its softmax mass and its overlap with the
// k L2-nearest rows of its top-1.
TopKProbe Probe(ConstMatrixView ref, const float* q, size_t k) {
  const simd::Kernels& kern = simd::Active();
  const size_t n = ref.rows(), d = ref.cols();
  std::vector<float> scores(n);
  std::vector<uint32_t> scratch;
  kern.dot_batch(q, ref.data(), n, d, ref.stride(), scores.data());
  TopKProbe p;
  p.top = TopKSet(scores, k, scratch);
  size_t best = 0;
  for (size_t i = 1; i < n; ++i) {
    if (scores[i] > scores[best]) best = i;
  }
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(d));
  const double max_logit = scores[best] * inv_sqrt_d;
  double total = 0, in_top = 0;
  for (size_t i = 0; i < n; ++i) total += std::exp(scores[i] * inv_sqrt_d - max_logit);
  for (uint32_t i : p.top) in_top += std::exp(scores[i] * inv_sqrt_d - max_logit);
  p.mass = in_top / total;
  // Negated squared distances so TopKSet picks the nearest.
  for (size_t i = 0; i < n; ++i) scores[i] = -kern.l2sqr(ref.row(best), ref.row(i), d);
  const std::vector<uint32_t> near = TopKSet(scores, k, scratch);
  p.l2_overlap = static_cast<double>(Overlap(p.top, near)) / static_cast<double>(k);
  return p;
}

}  // namespace

absl::StatusOr<OodStats> ComputeOodStats(ConstMatrixView ref, ConstMatrixView queries,
                                         const OodStatsOptions& opt, ThreadPool* pool) {
  if (pool == nullptr) pool = &ThreadPool::Default();
  const size_t d = ref.cols(), n = ref.rows();
  if (queries.cols() != d) {
    return absl::InvalidArgumentError(
        absl::StrCat("query dim ", queries.cols(), " != key dim ", d));
  }
  if (d == 0 || queries.rows() == 0) {
    return absl::InvalidArgumentError("ComputeOodStats needs non-empty keys and queries");
  }
  if (n < d + 2 || n > (size_t{1} << 32) - 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ComputeOodStats needs between dim + 2 = ", d + 2, " and 2^32-1 keys, got ", n));
  }
  OodStats s;
  s.n_reference = n;
  s.n_queries = queries.rows();
  s.dim = d;

  Rng rng(opt.seed, kStreamStats, 0);
  // Held-out keys first, then the covariance sample from the rest.
  const size_t n_eval_keys = std::clamp<size_t>(std::min(opt.eval_sample, n / 4), 1, n - d - 1);
  const size_t n_cov = std::min(std::max(opt.covariance_sample, d + 1), n - n_eval_keys);
  const std::vector<uint32_t> key_rows = SampleRows(n, n_eval_keys + n_cov, rng);
  const std::vector<uint32_t> query_rows =
      SampleRows(queries.rows(), std::max<size_t>(1, opt.eval_sample), rng);

  // Mean and covariance in double, in fixed chunks (deterministic sums).
  std::vector<double> mean(d, 0.0);
  for (size_t i = n_eval_keys; i < key_rows.size(); ++i) {
    const float* x = ref.row(key_rows[i]);
    for (size_t c = 0; c < d; ++c) mean[c] += x[c];
  }
  for (double& v : mean) v /= static_cast<double>(n_cov);
  constexpr size_t kCovChunk = 1024;
  const size_t chunks = (n_cov + kCovChunk - 1) / kCovChunk;
  std::vector<std::vector<double>> partial(chunks);
  pool->ParallelFor(chunks, 1, [&](size_t cb, size_t ce) {
    std::vector<double> centered(d);
    for (size_t chunk = cb; chunk < ce; ++chunk) {
      std::vector<double>& acc = partial[chunk];
      acc.assign(d * d, 0.0);
      const size_t end = std::min(n_cov, (chunk + 1) * kCovChunk);
      for (size_t r = chunk * kCovChunk; r < end; ++r) {
        const float* x = ref.row(key_rows[n_eval_keys + r]);
        for (size_t c = 0; c < d; ++c) centered[c] = x[c] - mean[c];
        for (size_t i = 0; i < d; ++i) {
          const double ci = centered[i];
          double* row = &acc[i * d];
          for (size_t j = 0; j <= i; ++j) row[j] += ci * centered[j];
        }
      }
    }
  });
  std::vector<double> cov(d * d, 0.0);
  for (const auto& acc : partial) {
    for (size_t i = 0; i < d * d; ++i) cov[i] += acc[i];
  }
  double trace = 0;
  for (size_t i = 0; i < d; ++i) {
    for (size_t j = 0; j <= i; ++j) {
      cov[i * d + j] /= static_cast<double>(n_cov - 1);
      cov[j * d + i] = cov[i * d + j];
    }
    trace += cov[i * d + i];
  }
  std::vector<double> chol;
  double ridge = std::max(opt.ridge, 1e-12);
  for (;; ridge *= 10) {
    chol = cov;
    const double add = ridge * std::max(trace / static_cast<double>(d), 1e-30);
    for (size_t i = 0; i < d; ++i) chol[i * d + i] += add;
    if (Cholesky(chol, d)) break;
    if (ridge > 1.0) {
      return absl::InvalidArgumentError("key covariance is not positive definite even with ridge 1");
    }
  }
  s.ridge_used = ridge;

  // Mahalanobis distances and norms.
  auto mean_distance = [&](ConstMatrixView x, const uint32_t* rows, size_t count, double* norm) {
    std::vector<double> dist(count), norms(count);
    pool->ParallelFor(count, 64, [&](size_t b, size_t e) {
      std::vector<double> y(d);
      for (size_t i = b; i < e; ++i) {
        const float* row = x.row(rows[i]);
        dist[i] = WhitenedNorm(chol, mean, row, d, y);
        norms[i] = std::sqrt(static_cast<double>(simd::Dot(row, row, d)));
      }
    });
    *norm = std::accumulate(norms.begin(), norms.end(), 0.0) / static_cast<double>(count);
    return std::accumulate(dist.begin(), dist.end(), 0.0) / static_cast<double>(count);
  };
  s.mahalanobis_key_to_key = mean_distance(ref, key_rows.data(), n_eval_keys, &s.mean_key_norm);
  s.mahalanobis_query_to_key =
      mean_distance(queries, query_rows.data(), query_rows.size(), &s.mean_query_norm);
  s.mahalanobis_ratio = s.mahalanobis_query_to_key / s.mahalanobis_key_to_key;
  std::vector<double> query_mean(d, 0.0);
  for (uint32_t r : query_rows) {
    for (size_t c = 0; c < d; ++c) query_mean[c] += queries.row(r)[c];
  }
  double dot = 0, nk = 0, nq = 0;
  for (size_t c = 0; c < d; ++c) {
    dot += mean[c] * query_mean[c];
    nk += mean[c] * mean[c];
    nq += query_mean[c] * query_mean[c];
  }
  s.mean_cosine = nk > 0 && nq > 0 ? dot / std::sqrt(nk * nq) : 0.0;

  // Top-k probes.
  const size_t k = opt.topk;
  if (opt.topk_queries == 0 || k == 0 || n < k) return s;
  s.topk = k;
  const size_t nq_probe = std::min(opt.topk_queries, query_rows.size());
  const size_t nk_probe = std::min(opt.topk_queries, n_eval_keys);
  std::vector<TopKProbe> probes(nq_probe + nk_probe);
  pool->ParallelFor(probes.size(), 1, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) {
      probes[i] = i < nq_probe ? Probe(ref, queries.row(query_rows[i]), k)
                               : Probe(ref, ref.row(key_rows[i - nq_probe]), k);
    }
  });
  std::vector<float> norms(n);
  for (size_t i = 0; i < n; ++i) norms[i] = simd::Dot(ref.row(i), ref.row(i), d);
  std::vector<uint32_t> scratch;
  const std::vector<uint32_t> norm_top = TopKSet(norms, k, scratch);
  const double kd = static_cast<double>(k);
  double pair_overlap = 0;
  size_t pairs = 0;
  for (size_t i = 0; i < nq_probe; ++i) {
    s.topk_attention_mass += probes[i].mass / static_cast<double>(nq_probe);
    s.topk_in_l2_neighbourhood += probes[i].l2_overlap / static_cast<double>(nq_probe);
    s.topk_overlap_with_norm_topk +=
        static_cast<double>(Overlap(probes[i].top, norm_top)) / kd / static_cast<double>(nq_probe);
    for (size_t j = i + 1; j < nq_probe; ++j) {
      pair_overlap += static_cast<double>(Overlap(probes[i].top, probes[j].top)) / kd;
      ++pairs;
    }
  }
  s.topk_pairwise_overlap = pairs > 0 ? pair_overlap / static_cast<double>(pairs) : 0.0;
  for (size_t i = nq_probe; i < probes.size(); ++i) {
    s.key_topk_in_l2_neighbourhood += probes[i].l2_overlap / static_cast<double>(nk_probe);
  }
  return s;
}

std::string OodStats::ToString() const {
  std::string out = absl::StrFormat(
      "  mahalanobis query->key %.2f  key->key %.2f  ratio %.2fx  (d=%d, %d keys, %d queries, "
      "ridge %.0e)\n"
      "  mean |key| %.2f  mean |query| %.2f  cos(mean key, mean query) %.3f\n",
      mahalanobis_query_to_key, mahalanobis_key_to_key, mahalanobis_ratio, dim, n_reference,
      n_queries, ridge_used, mean_key_norm, mean_query_norm, mean_cosine);
  if (topk > 0) {
    absl::StrAppendFormat(
        &out,
        "  top-%d: softmax mass %.3f | in L2-%d-NN of top-1 key: queries %.3f, keys %.3f | "
        "overlap with largest-norm keys %.3f | between queries %.3f\n",
        topk, topk_attention_mass, topk, topk_in_l2_neighbourhood, key_topk_in_l2_neighbourhood,
        topk_overlap_with_norm_topk, topk_pairwise_overlap);
  }
  return out;
}

absl::StatusOr<IdMatrix> ExactTopK(ConstMatrixView ref, ConstMatrixView queries, size_t k,
                                   ThreadPool* pool) {
  if (pool == nullptr) pool = &ThreadPool::Default();
  if (queries.cols() != ref.cols()) {
    return absl::InvalidArgumentError(
        absl::StrCat("query dim ", queries.cols(), " != key dim ", ref.cols()));
  }
  if (k == 0 || k > ref.rows() || ref.rows() > (size_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(absl::StrCat("top-k needs 1 <= k <= keys < 2^31, got k = ",
                                                   k, ", keys = ", ref.rows()));
  }
  IdMatrix out(queries.rows(), k);
  const simd::Kernels& kern = simd::Active();
  pool->ParallelFor(queries.rows(), 4, [&](size_t b, size_t e) {
    std::vector<float> scores(ref.rows());
    std::vector<uint32_t> ids(ref.rows());
    for (size_t q = b; q < e; ++q) {
      kern.dot_batch(queries.row(q), ref.data(), ref.rows(), ref.cols(), ref.stride(),
                     scores.data());
      std::iota(ids.begin(), ids.end(), 0u);
      auto better = [&](uint32_t a, uint32_t c) {
        return scores[a] > scores[c] || (scores[a] == scores[c] && a < c);
      };
      std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), better);
      for (size_t j = 0; j < k; ++j) out.row(q)[j] = static_cast<int32_t>(ids[j]);
    }
  });
  return out;
}

}  // namespace kvr
