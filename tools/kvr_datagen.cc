// kvr_datagen: generates one attention head's synthetic keys, values, prefill
// (training) queries and decode (test) queries, writes them as .fbin or .npy,
// and prints out-of-distribution diagnostics. See tools/attention_data.h for
// the generative model and every knob.
//
//   kvr_datagen --n_keys=131072 --n_train=16384 --n_test=1000 --preset=default
//               --out_dir=/tmp/x [--format=npy] [--gt_k=100]
//   kvr_datagen --family=lowrank --n_keys=131072    # topical|lowrank|flat|positional|sink

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <system_error>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tools/dataset_io.h"
#include "common/status.h"
#include "common/thread_pool.h"
#include "tools/attention_data.h"

ABSL_FLAG(std::string, family, "topical",
          "data family: topical | lowrank | flat | positional | sink (tools/attention_data.h); "
          "--preset and the topical flags shape topical (and sink's topical part), the "
          "--<family>_* flags the others");
ABSL_FLAG(std::string, preset, "default",
          "difficulty preset: easy | default | hard (sets spectrum_decay, query_spectrum_tilt, "
          "outlier_scale, concentration, logit_std; explicit flags below override it)");
ABSL_FLAG(uint64_t, n_keys, 131072, "keys (and values), at positions 0..n_keys-1; [1, 2^31)");
ABSL_FLAG(uint64_t, n_train, 16384, "prefill (training) queries, <= n_keys");
ABSL_FLAG(uint64_t, n_test, 1000, "decode (test) queries, at positions n_keys + j");
ABSL_FLAG(uint64_t, dim, 128, "head dim; even, [2, 1024]");
ABSL_FLAG(uint64_t, seed, 1, "random seed; same flags + seed give identical files");
ABSL_FLAG(std::string, out_dir, "",
          "directory for keys/values/train_queries/test_queries files (created if missing); "
          "empty = write nothing, only print stats");
ABSL_FLAG(std::string, format, "fbin", "file format: fbin | npy");
ABSL_FLAG(uint64_t, gt_k, 0,
          "if > 0, also write test_gt.ibin (or .npy): each test query's exact top-k key ids by "
          "inner product, best first");
ABSL_FLAG(bool, stats, true, "print out-of-distribution statistics");
ABSL_FLAG(uint64_t, stats_queries, 64,
          "queries scanned exactly for the top-k diagnostics (0 = Mahalanobis only)");
ABSL_FLAG(uint64_t, stats_topk, 100, "k of the top-k diagnostics");
ABSL_FLAG(uint64_t, threads, 0, "worker threads; 0 = all cores");

// Overrides of the preset (unset = the preset's value). Documented in
// tools/attention_data.h (AttentionDataOptions).
ABSL_FLAG(std::optional<bool>, apply_rope, std::nullopt, "rotate keys/queries by position");
ABSL_FLAG(std::optional<double>, rope_theta, std::nullopt, "RoPE base (default 500000)");
ABSL_FLAG(std::optional<uint64_t>, test_position_offset, std::nullopt,
          "first decode position = n_keys + this");
ABSL_FLAG(std::optional<double>, spectrum_decay, std::nullopt,
          "power-law exponent of per-pair scales, [0, 4]");
ABSL_FLAG(std::optional<double>, spectrum_jitter, std::nullopt,
          "departure of the scale ranking from the frequency ranking, [0, 4]");
ABSL_FLAG(std::optional<double>, query_spectrum_jitter, std::nullopt,
          "log-normal std of query scales vs key scales, [0, 4]");
ABSL_FLAG(std::optional<double>, key_norm, std::nullopt, "RMS norm of key content");
ABSL_FLAG(std::optional<double>, query_spectrum_tilt, std::nullopt,
          "query scales ∝ key scales^(1 - tilt): 0 like keys, 1 isotropic, 2 inverted; [0, 2]");
ABSL_FLAG(std::optional<double>, logit_std, std::nullopt,
          "std over keys of a query's content logit q·k/√d (softmax temperature)");
ABSL_FLAG(std::optional<double>, key_mean, std::nullopt, "|key mean| / key_norm");
ABSL_FLAG(std::optional<double>, query_mean, std::nullopt,
          "query mean as a Mahalanobis norm under the key covariance, in units of sqrt(dim)");
ABSL_FLAG(std::optional<uint64_t>, outlier_channels, std::nullopt,
          "key outlier channels, <= 2*max(1, dim/8)");
ABSL_FLAG(std::optional<double>, outlier_scale, std::nullopt,
          "outlier magnitude / RMS key channel");
ABSL_FLAG(std::optional<double>, outlier_spread, std::nullopt,
          "relative std of outlier magnitude");
ABSL_FLAG(std::optional<uint64_t>, topics, std::nullopt, "latent topics, [1, 65536]");
ABSL_FLAG(std::optional<double>, topic_skew, std::nullopt, "Zipf exponent of topic popularity");
ABSL_FLAG(std::optional<double>, segment_length, std::nullopt,
          "mean run of key positions sharing a topic, >= 1");
ABSL_FLAG(std::optional<double>, key_topic_share, std::nullopt,
          "fraction of key variance along its topic, [0, 1]");
ABSL_FLAG(std::optional<double>, concentration, std::nullopt,
          "fraction of query variance along its topic, [0, 1]");
ABSL_FLAG(std::optional<double>, decode_shift, std::nullopt,
          "extra mean shift of decode queries / RMS query content norm");
ABSL_FLAG(std::optional<double>, value_topic_share, std::nullopt,
          "fraction of value variance along its topic, [0, 1]");

// Family knobs (AttentionDataOptions::<family>.<field>; unset = its default).
ABSL_FLAG(std::optional<uint64_t>, lowrank_manifold_dim, std::nullopt,
          "lowrank: latent manifold dimension (default 4), [1, 16], <= 2 * lowrank_planes");
ABSL_FLAG(std::optional<uint64_t>, lowrank_planes, std::nullopt,
          "lowrank: lowest-frequency RoPE pairs the keys span (default 8), [1, dim/2]");
ABSL_FLAG(std::optional<double>, lowrank_curvature, std::nullopt,
          "lowrank: std of the latent->sine frequencies (default 1), [0, 10]");
ABSL_FLAG(std::optional<double>, lowrank_correlation_length, std::nullopt,
          "lowrank: positions over which the latent walk decorrelates (default 32)");
ABSL_FLAG(std::optional<double>, lowrank_noise, std::nullopt,
          "lowrank: fraction of key variance off the manifold (default 0.05), [0, 0.5]");
ABSL_FLAG(std::optional<double>, lowrank_query_reweight, std::nullopt,
          "lowrank: log-normal std of the query feature weights (default 1), [0, 4]");
ABSL_FLAG(std::optional<double>, lowrank_query_offset, std::nullopt,
          "lowrank: |query outside key span| / |query in span| (default 2), [0, 100]");
ABSL_FLAG(std::optional<double>, lowrank_query_spread, std::nullopt,
          "lowrank: latent std of a query around its target (default 0.3), [0, 10]");
ABSL_FLAG(std::optional<double>, lowrank_logit_std, std::nullopt,
          "lowrank: std over keys of q.k/sqrt(d) (default 3)");
ABSL_FLAG(std::optional<double>, flat_spectrum_decay, std::nullopt,
          "flat: power-law exponent of the key channel scales (default 0.25), [0, 4]");
ABSL_FLAG(std::optional<double>, flat_shared_query, std::nullopt,
          "flat: fraction of query variance in the shared query mean (default 0.5), [0, 1]");
ABSL_FLAG(std::optional<double>, flat_logit_std, std::nullopt,
          "flat: std over keys of q.k/sqrt(d) (default 0.3)");
ABSL_FLAG(std::optional<double>, positional_recency_window, std::nullopt,
          "positional: positions the recency bump spans (default 1024)");
ABSL_FLAG(std::optional<double>, positional_position_logit, std::nullopt,
          "positional: logit gain of the nearest positions (default 10), [0, 1000]");
ABSL_FLAG(std::optional<double>, positional_content_logit_std, std::nullopt,
          "positional: std of the content part of the logits (default 0.5)");
ABSL_FLAG(std::optional<uint64_t>, sink_keys, std::nullopt,
          "sink: the first keys that act as sinks (default 4), [1, 64]");
ABSL_FLAG(std::optional<double>, sink_mass, std::nullopt,
          "sink: softmax mass the sinks take for a typical query (default 0.8), [0.001, 0.999]");
ABSL_FLAG(std::optional<double>, sink_rest_logit_std, std::nullopt,
          "sink: logit_std of the topical part underneath (default 1.5)");

namespace kvr {
namespace {

template <typename T, typename F>
void Override(const absl::Flag<std::optional<F>>& flag, T& field) {
  const std::optional<F> v = absl::GetFlag(flag);
  if (v.has_value()) field = static_cast<T>(*v);
}

absl::StatusOr<AttentionDataOptions> OptionsFromFlags() {
  KVR_ASSIGN_OR_RETURN(AttentionDataOptions o, AttentionDataPreset(absl::GetFlag(FLAGS_preset)));
  o.n_keys = absl::GetFlag(FLAGS_n_keys);
  o.n_train = absl::GetFlag(FLAGS_n_train);
  o.n_test = absl::GetFlag(FLAGS_n_test);
  o.dim = absl::GetFlag(FLAGS_dim);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.family = absl::GetFlag(FLAGS_family);
  Override(FLAGS_lowrank_manifold_dim, o.lowrank.manifold_dim);
  Override(FLAGS_lowrank_planes, o.lowrank.planes);
  Override(FLAGS_lowrank_curvature, o.lowrank.curvature);
  Override(FLAGS_lowrank_correlation_length, o.lowrank.correlation_length);
  Override(FLAGS_lowrank_noise, o.lowrank.noise);
  Override(FLAGS_lowrank_query_reweight, o.lowrank.query_reweight);
  Override(FLAGS_lowrank_query_offset, o.lowrank.query_offset);
  Override(FLAGS_lowrank_query_spread, o.lowrank.query_spread);
  Override(FLAGS_lowrank_logit_std, o.lowrank.logit_std);
  Override(FLAGS_flat_spectrum_decay, o.flat.spectrum_decay);
  Override(FLAGS_flat_shared_query, o.flat.shared_query);
  Override(FLAGS_flat_logit_std, o.flat.logit_std);
  Override(FLAGS_positional_recency_window, o.positional.recency_window);
  Override(FLAGS_positional_position_logit, o.positional.position_logit);
  Override(FLAGS_positional_content_logit_std, o.positional.content_logit_std);
  Override(FLAGS_sink_keys, o.sink.sink_keys);
  Override(FLAGS_sink_mass, o.sink.sink_mass);
  Override(FLAGS_sink_rest_logit_std, o.sink.rest_logit_std);
  Override(FLAGS_apply_rope, o.apply_rope);
  Override(FLAGS_rope_theta, o.rope_theta);
  Override(FLAGS_test_position_offset, o.test_position_offset);
  Override(FLAGS_spectrum_decay, o.spectrum_decay);
  Override(FLAGS_spectrum_jitter, o.spectrum_jitter);
  Override(FLAGS_query_spectrum_jitter, o.query_spectrum_jitter);
  Override(FLAGS_key_norm, o.key_norm);
  Override(FLAGS_query_spectrum_tilt, o.query_spectrum_tilt);
  Override(FLAGS_logit_std, o.logit_std);
  Override(FLAGS_key_mean, o.key_mean);
  Override(FLAGS_query_mean, o.query_mean);
  Override(FLAGS_outlier_channels, o.outlier_channels);
  Override(FLAGS_outlier_scale, o.outlier_scale);
  Override(FLAGS_outlier_spread, o.outlier_spread);
  Override(FLAGS_topics, o.topics);
  Override(FLAGS_topic_skew, o.topic_skew);
  Override(FLAGS_segment_length, o.segment_length);
  Override(FLAGS_key_topic_share, o.key_topic_share);
  Override(FLAGS_concentration, o.concentration);
  Override(FLAGS_decode_shift, o.decode_shift);
  Override(FLAGS_value_topic_share, o.value_topic_share);
  // Field names are the flag names, so the message names the flag.
  KVR_RETURN_IF_ERROR(ValidateAttentionDataOptions(o));
  return o;
}

std::string OptionsText(const AttentionDataOptions& o, const std::string& preset) {
  const std::string family = absl::StrCat(
      "family=", o.family, "\nlowrank_manifold_dim=", o.lowrank.manifold_dim,
      "\nlowrank_planes=", o.lowrank.planes, "\nlowrank_curvature=", o.lowrank.curvature,
      "\nlowrank_correlation_length=", o.lowrank.correlation_length,
      "\nlowrank_noise=", o.lowrank.noise, "\nlowrank_query_reweight=", o.lowrank.query_reweight,
      "\nlowrank_query_offset=", o.lowrank.query_offset,
      "\nlowrank_query_spread=", o.lowrank.query_spread,
      "\nlowrank_logit_std=", o.lowrank.logit_std, "\nflat_spectrum_decay=", o.flat.spectrum_decay,
      "\nflat_shared_query=", o.flat.shared_query, "\nflat_logit_std=", o.flat.logit_std,
      "\npositional_recency_window=", o.positional.recency_window,
      "\npositional_position_logit=", o.positional.position_logit,
      "\npositional_content_logit_std=", o.positional.content_logit_std,
      "\nsink_keys=", o.sink.sink_keys, "\nsink_mass=", o.sink.sink_mass,
      "\nsink_rest_logit_std=", o.sink.rest_logit_std, "\n");
  return absl::StrCat(
      family, "preset=", preset, "\nn_keys=", o.n_keys, "\nn_train=", o.n_train, "\nn_test=", o.n_test,
      "\ndim=", o.dim, "\nseed=", o.seed, "\napply_rope=", o.apply_rope ? "true" : "false",
      "\nrope_theta=", o.rope_theta, "\ntest_position_offset=", o.test_position_offset,
      "\nspectrum_decay=", o.spectrum_decay, "\nspectrum_jitter=", o.spectrum_jitter,
      "\nquery_spectrum_tilt=", o.query_spectrum_tilt,
      "\nquery_spectrum_jitter=", o.query_spectrum_jitter, "\nkey_norm=", o.key_norm,
      "\nlogit_std=", o.logit_std, "\nkey_mean=", o.key_mean, "\nquery_mean=", o.query_mean,
      "\noutlier_channels=", o.outlier_channels, "\noutlier_scale=", o.outlier_scale,
      "\noutlier_spread=", o.outlier_spread, "\ntopics=", o.topics, "\ntopic_skew=", o.topic_skew,
      "\nsegment_length=", o.segment_length, "\nkey_topic_share=", o.key_topic_share,
      "\nconcentration=", o.concentration, "\ndecode_shift=", o.decode_shift,
      "\nvalue_topic_share=", o.value_topic_share, "\n");
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

absl::Status Run() {
  KVR_ASSIGN_OR_RETURN(const AttentionDataOptions options, OptionsFromFlags());
  const std::string format = absl::GetFlag(FLAGS_format);
  if (format != "fbin" && format != "npy") {
    return absl::InvalidArgumentError(
        absl::StrCat("--format must be fbin or npy, got '", format, "'"));
  }
  const uint64_t gt_k = absl::GetFlag(FLAGS_gt_k);
  if (gt_k > options.n_keys) {
    return absl::InvalidArgumentError(
        absl::StrCat("--gt_k must be <= n_keys (", options.n_keys, "), got ", gt_k));
  }
  const uint64_t threads = absl::GetFlag(FLAGS_threads);
  if (threads > 4096) {
    return absl::InvalidArgumentError(absl::StrCat("--threads must be <= 4096, got ", threads));
  }
  std::unique_ptr<ThreadPool> own_pool;
  ThreadPool* pool = &ThreadPool::Default();
  if (threads > 0) {
    own_pool = std::make_unique<ThreadPool>(threads - 1);
    pool = own_pool.get();
  }

  auto start = std::chrono::steady_clock::now();
  KVR_ASSIGN_OR_RETURN(const AttentionData data, GenerateAttentionData(options, pool));
  std::printf("generated %zu keys/values, %zu train and %zu test queries, dim %zu (family %s, "
              "preset %s, seed %llu) in %.2f s on %zu threads\n",
              options.n_keys, options.n_train, options.n_test, options.dim,
              options.family.c_str(), absl::GetFlag(FLAGS_preset).c_str(),
              static_cast<unsigned long long>(options.seed), SecondsSince(start),
              pool->size() + 1);

  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  if (!out_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(out_dir, ec);
    if (ec) {
      return absl::InvalidArgumentError(
          absl::StrCat("--out_dir: cannot create '", out_dir, "': ", ec.message()));
    }
    start = std::chrono::steady_clock::now();
    const std::string ext = "." + format;
    const std::pair<const char*, const Matrix*> files[] = {
        {"keys", &data.keys},
        {"values", &data.values},
        {"train_queries", &data.train_queries},
        {"test_queries", &data.test_queries}};
    for (const auto& [name, m] : files) {
      if (m->rows == 0) continue;  // nothing to write (e.g. --n_train=0)
      const std::string path = absl::StrCat(out_dir, "/", name, ext);
      KVR_RETURN_IF_ERROR(WriteMatrixFile(path, m->view()));
      std::printf("wrote %s (%zu x %zu)\n", path.c_str(), m->rows, m->cols);
    }
    if (gt_k > 0 && data.test_queries.rows > 0) {
      KVR_ASSIGN_OR_RETURN(const IdMatrix gt,
                           ExactTopK(data.keys.view(), data.test_queries.view(), gt_k, pool));
      const std::string path =
          absl::StrCat(out_dir, "/test_gt", format == "npy" ? ".npy" : ".ibin");
      KVR_RETURN_IF_ERROR(WriteIdMatrixFile(path, gt));
      std::printf("wrote %s (%zu x %zu exact top-%llu ids)\n", path.c_str(), gt.rows, gt.cols,
                  static_cast<unsigned long long>(gt_k));
    }
    const std::string meta_path = out_dir + "/options.txt";
    FILE* meta = std::fopen(meta_path.c_str(), "w");
    if (meta == nullptr) return absl::InvalidArgumentError(absl::StrCat("cannot write ", meta_path));
    const std::string text = OptionsText(options, absl::GetFlag(FLAGS_preset));
    const bool ok = std::fwrite(text.data(), 1, text.size(), meta) == text.size();
    if (std::fclose(meta) != 0 || !ok) {
      return absl::InvalidArgumentError(absl::StrCat("cannot write ", meta_path));
    }
    std::printf("wrote %s; files took %.2f s\n", meta_path.c_str(), SecondsSince(start));
  }

  if (!absl::GetFlag(FLAGS_stats)) return absl::OkStatus();
  OodStatsOptions stats_options;
  stats_options.topk_queries = absl::GetFlag(FLAGS_stats_queries);
  stats_options.topk = absl::GetFlag(FLAGS_stats_topk);
  stats_options.seed = options.seed;
  start = std::chrono::steady_clock::now();
  if (data.train_queries.rows > 0) {
    KVR_ASSIGN_OR_RETURN(const OodStats s, ComputeOodStats(data.keys.view(),
                                                           data.train_queries.view(),
                                                           stats_options, pool));
    std::printf("train (prefill) queries vs keys:\n%s", s.ToString().c_str());
  }
  if (data.test_queries.rows > 0) {
    KVR_ASSIGN_OR_RETURN(const OodStats s, ComputeOodStats(data.keys.view(),
                                                           data.test_queries.view(),
                                                           stats_options, pool));
    std::printf("test (decode) queries vs keys:\n%s", s.ToString().c_str());
  }
  if (data.train_queries.rows >= options.dim + 2 && data.test_queries.rows > 0) {
    OodStatsOptions q_options = stats_options;
    q_options.topk_queries = 0;
    KVR_ASSIGN_OR_RETURN(const OodStats s, ComputeOodStats(data.train_queries.view(),
                                                           data.test_queries.view(), q_options,
                                                           pool));
    std::printf(
        "test (decode) queries vs train queries: mahalanobis test->train %.2f, "
        "train->train %.2f, ratio %.2fx\n",
        s.mahalanobis_query_to_key, s.mahalanobis_key_to_key, s.mahalanobis_ratio);
  }
  std::printf("stats took %.2f s\n", SecondsSince(start));
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvr

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Generates synthetic attention data for one KV head (keys, values, prefill/training "
      "queries, decode/test queries) with the out-of-distribution geometry of real LLM "
      "attention, writes keys/values/train_queries/test_queries.{fbin,npy} (+ test_gt, "
      "options.txt) under --out_dir and prints OOD statistics.\n\n"
      "  kvr_datagen --n_keys=131072 --n_train=16384 --n_test=1000 --preset=default "
      "--out_dir=/tmp/x\n\n"
      "Families (--family): topical (default), lowrank, flat, positional, sink; "
      "--<family>_<knob> flags tune them. Presets (of topical): easy, default, hard. Any "
      "AttentionDataOptions field (tools/attention_data.h) "
      "can be overridden by the flag of the same name.");
  const std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (rest.size() > 1) {
    std::fprintf(stderr, "kvr_datagen: error: unexpected argument '%s' (flags are --name=value)\n",
                 rest[1]);
    return 2;
  }
  const absl::Status status = kvr::Run();
  if (!status.ok()) {
    std::fprintf(stderr, "kvr_datagen: error: %s\n", status.ToString().c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
