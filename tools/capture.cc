#include "tools/capture.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <span>
#include <string_view>
#include <system_error>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "common/tensor.h"
#include "gpu_worker/model/bundled_model.h"
#include "gpu_worker/model/device_weights.h"
#include "gpu_worker/model/hf_bpe_tokenizer.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/llama2c_tokenizer.h"
#include "gpu_worker/model/llama_block.h"
#include "gpu_worker/model/model_loader.h"
#include "gpu_worker/model/safetensors_loader.h"
#include "gpu_worker/model/sentencepiece_tokenizer.h"
#include "tools/cli_flags.h"
#include "tools/dataset_io.h"

namespace kvr::capture {

const char kCaptureUsage[] = R"(Usage: kvr capture [flags]

Runs a prompt (and --generate greedy decode steps) through a model on the CPU
backend and writes each layer's and kv head's attention data as .npy files for
bench/index_bench (--keys --values --train --queries):
  DIR/L<layer>_H<kvhead>_keys.npy     keys after RoPE, as cached   [T x head_dim]
  DIR/L<layer>_H<kvhead>_values.npy   values                       [T x head_dim]
  DIR/L<layer>_H<kvhead>_train.npy    prefill queries of the kv head's query
                                      heads (row p*group + j: query head
                                      kvhead*group + j at position p)
  DIR/L<layer>_H<kvhead>_queries.npy  the generated tokens' decode queries
  DIR/manifest.json                   model shape, tokens, text, files
(T = prompt tokens + generated tokens; float32, C order, 2-D.)

Flags:
  --model PATH            llama2.c checkpoint (.bin) or Hugging Face checkpoint
                          directory (config.json + safetensors); default the
                          bundled stories260K.bin
  --tokenizer PATH        llama2.c tokenizer (.bin), tokenizer.json or
                          SentencePiece .model (default: tok512.bin for the
                          bundled model; for a checkpoint directory its
                          tokenizer.json, else tokenizer.model)
  --prompt TEXT           the prompt (BOS is prepended)
  --prompt_file PATH      the prompt from a file (at most 64 MiB); exactly one
                          of --prompt / --prompt_file
  --generate N            greedy decode steps after the prompt (default 64;
                          stops early at BOS / EOS); prompt tokens + N must fit
                          the model's context (seq_len)
  --out DIR               output directory (created; required)
  --layers all|L,L,...    layers to write (default all); distinct, each in
                          [0, n_layers)
  --force                 write into a non-empty --out (files of the same names
                          are replaced)
  --max_output_bytes N    refuse a capture whose files would exceed N bytes
                          (default 4294967296 = 4 GiB; the capture holds as
                          much host memory), [1, 2^50]
  --threads N             CPU backend threads, 0 = all cores (default 1)
)";

namespace {

using worker::Backend;
using worker::BlockActivations;
using worker::KvRun;
using worker::LlamaConfig;
using worker::Tensor;

// Tokens per prefill forward (bounds the activations, like LlamaModel).
constexpr int64_t kPrefillChunk = 64;

absl::Status ParseLayerList(const std::string& v) {
  if (v == "all") return absl::OkStatus();
  if (v.empty()) return absl::InvalidArgumentError("--layers: empty (want all or L,L,...)");
  for (absl::string_view part : absl::StrSplit(v, ',')) {
    int64_t layer = 0;
    if (!absl::SimpleAtoi(part, &layer) || layer < 0 || layer >= LlamaConfig::kMaxLayers) {
      return absl::InvalidArgumentError(absl::StrCat("--layers: \"", part,
                                                     "\" is not a layer index in [0, ",
                                                     LlamaConfig::kMaxLayers, ")"));
    }
  }
  return absl::OkStatus();
}

// The layers `spec` names for a model of n_layers layers, ascending.
absl::StatusOr<std::vector<int>> ResolveLayers(const std::string& spec, int n_layers) {
  std::vector<int> layers;
  if (spec == "all") {
    for (int l = 0; l < n_layers; ++l) layers.push_back(l);
    return layers;
  }
  KVR_RETURN_IF_ERROR(ParseLayerList(spec));
  std::vector<bool> seen(static_cast<size_t>(n_layers), false);
  for (absl::string_view part : absl::StrSplit(spec, ',')) {
    int64_t layer = 0;
    KVR_CHECK(absl::SimpleAtoi(part, &layer));
    if (layer >= n_layers) {
      return absl::InvalidArgumentError(absl::StrCat("--layers: layer ", layer,
                                                     " outside [0, ", n_layers,
                                                     "): the model has ", n_layers, " layers"));
    }
    if (seen[static_cast<size_t>(layer)]) {
      return absl::InvalidArgumentError(absl::StrCat("--layers: layer ", layer, " named twice"));
    }
    seen[static_cast<size_t>(layer)] = true;
    layers.push_back(static_cast<int>(layer));
  }
  std::sort(layers.begin(), layers.end());
  return layers;
}

// a * b + c into *out, false on uint64 overflow.
bool MulAdd(uint64_t a, uint64_t b, uint64_t c, uint64_t* out) {
  uint64_t p = 0;
  return !__builtin_mul_overflow(a, b, &p) && !__builtin_add_overflow(p, c, out);
}

// JSON string literal of `s`: control characters escaped, valid UTF-8 kept,
// each byte of an invalid sequence (a token piece may end inside one) as
// U+FFFD, so the manifest is always valid JSON.
std::string JsonString(absl::string_view s) {
  std::string out = "\"";
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char u = static_cast<unsigned char>(s[i]);
    if (u < 0x80) {
      if (u == '"' || u == '\\') {
        out += '\\';
        out += s[i];
      } else if (u < 0x20) {
        out += absl::StrFormat("\\u%04x", u);
      } else {
        out += s[i];
      }
      ++i;
      continue;
    }
    // Lead byte: sequence length and the smallest code point it may encode.
    size_t len = 0;
    uint32_t cp = 0, min_cp = 0;
    if ((u & 0xE0) == 0xC0) {
      len = 2, cp = u & 0x1F, min_cp = 0x80;
    } else if ((u & 0xF0) == 0xE0) {
      len = 3, cp = u & 0x0F, min_cp = 0x800;
    } else if ((u & 0xF8) == 0xF0) {
      len = 4, cp = u & 0x07, min_cp = 0x10000;
    }
    bool valid = len > 0 && i + len <= s.size();
    for (size_t k = 1; valid && k < len; ++k) {
      const unsigned char cont = static_cast<unsigned char>(s[i + k]);
      valid = (cont & 0xC0) == 0x80;
      cp = (cp << 6) | (cont & 0x3F);
    }
    valid = valid && cp >= min_cp && cp <= 0x10FFFF && (cp < 0xD800 || cp > 0xDFFF);
    if (valid) {
      out.append(s.data() + i, len);
      i += len;
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD
      ++i;
    }
  }
  out += '"';
  return out;
}

// Writes `text` to `path` through `path`.tmp renamed into place.
absl::Status WriteTextAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open ", tmp));
    f.write(text.data(), static_cast<std::streamsize>(text.size()));
    f.flush();
    if (!f) {
      std::remove(tmp.c_str());
      return absl::DataLossError(absl::StrCat(path, ": write to ", tmp, " failed"));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat(path, ": cannot rename ", tmp));
  }
  return absl::OkStatus();
}

// Creates `dir`, or checks that it is empty (or `force`).
absl::Status PrepareOutDir(const std::string& dir, bool force) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(dir, ec);
  if (fs::exists(st)) {
    if (!fs::is_directory(st)) {
      return absl::FailedPreconditionError(absl::StrCat("--out ", dir, ": not a directory"));
    }
    if (!force && !fs::is_empty(dir, ec)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "--out ", dir, ": directory is not empty; pass --force to overwrite"));
    }
    return absl::OkStatus();
  }
  if (!fs::create_directories(dir, ec) || ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("--out ", dir, ": cannot create: ", ec.message()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadPromptFile(const std::string& path) {
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) return absl::NotFoundError(absl::StrCat("--prompt_file ", path, ": ", ec.message()));
  if (size > static_cast<uintmax_t>(kMaxPromptFileBytes)) {
    return absl::InvalidArgumentError(absl::StrCat("--prompt_file ", path, ": ", size,
                                                   " bytes, limit ", kMaxPromptFileBytes));
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat("--prompt_file ", path, ": cannot open"));
  std::string text(static_cast<size_t>(size), '\0');
  f.read(text.data(), static_cast<std::streamsize>(size));
  if (static_cast<uintmax_t>(f.gcount()) != size) {
    return absl::DataLossError(absl::StrCat("--prompt_file ", path, ": short read"));
  }
  return text;
}

// The model's forward over its own full K/V caches (rows 0 .. capacity - 1),
// recording each captured layer's rotated queries and every layer's last
// attention output row. Same math as LlamaModel (LlamaBlock + causal
// Backend::Attention); caches sized for this capture only.
class Recorder final : public worker::AttentionHook {
 public:
  Recorder(Backend& backend, const LlamaConfig& config, std::vector<Tensor> k_cache,
           std::vector<Tensor> v_cache, std::vector<std::vector<float>*> queries_of_layer,
           std::vector<std::vector<float>>* last_attention)
      : backend_(backend), config_(config), k_cache_(std::move(k_cache)),
        v_cache_(std::move(v_cache)), queries_of_layer_(std::move(queries_of_layer)),
        last_attention_(last_attention) {}

  // The next forward covers rows first_pos .. first_pos + n - 1; their
  // queries go to row (first_pos - query_row0) of the layer's buffer.
  void SetBatch(int64_t first_pos, int64_t n, int64_t query_row0) {
    first_pos_ = first_pos;
    n_ = n;
    query_row0_ = query_row0;
  }

  absl::StatusOr<std::span<const KvRun>> KvRuns(int layer) override {
    const size_t l = static_cast<size_t>(layer);
    run_ = {0, n_, k_cache_[l].Rows(first_pos_, n_), v_cache_[l].Rows(first_pos_, n_), nullptr};
    return std::span<const KvRun>(&run_, 1);
  }

  absl::Status Attend(int layer, const Tensor& q, const Tensor& att) override {
    const size_t l = static_cast<size_t>(layer);
    KVR_RETURN_IF_ERROR(backend_.Attention(q, k_cache_[l], v_cache_[l],
                                           config_.attention_shape(), first_pos_, att));
    if (std::vector<float>* dst = queries_of_layer_[l]; dst != nullptr) {
      const size_t q_dim = static_cast<size_t>(config_.q_dim());
      const size_t begin = static_cast<size_t>(first_pos_ - query_row0_) * q_dim;
      KVR_CHECK(begin + static_cast<size_t>(n_) * q_dim <= dst->size());
      KVR_RETURN_IF_ERROR(backend_.DownloadF32(
          q, std::span<float>(dst->data() + begin, static_cast<size_t>(n_) * q_dim)));
    }
    return backend_.DownloadF32(att.Rows(n_ - 1, 1), (*last_attention_)[l]);
  }

  // Per model layer: where its queries go from now on (null: not captured).
  void SetQueryBuffers(std::vector<std::vector<float>*> queries_of_layer) {
    queries_of_layer_ = std::move(queries_of_layer);
  }

  const Tensor& k_cache(int layer) const { return k_cache_[static_cast<size_t>(layer)]; }
  const Tensor& v_cache(int layer) const { return v_cache_[static_cast<size_t>(layer)]; }

 private:
  Backend& backend_;
  const LlamaConfig& config_;
  const std::vector<Tensor> k_cache_, v_cache_;
  std::vector<std::vector<float>*> queries_of_layer_;
  std::vector<std::vector<float>>* last_attention_;
  int64_t first_pos_ = 0, n_ = 0, query_row0_ = 0;
  KvRun run_;
};

// Rows [0, rows) of the heads of `kv_head` as (rows * group) x head_dim:
// row r * group + j = columns of query head kv_head * group + j of row r.
Matrix GatherQueries(const std::vector<float>& q, size_t rows, size_t q_dim, int kv_head,
                     int group, int head_dim) {
  const size_t g = static_cast<size_t>(group), d = static_cast<size_t>(head_dim);
  Matrix m(rows * g, d);
  for (size_t r = 0; r < rows; ++r) {
    const float* src = q.data() + r * q_dim + static_cast<size_t>(kv_head) * g * d;
    std::copy(src, src + g * d, m.row(r * g));
  }
  return m;
}

}  // namespace

absl::Status ParseCaptureFlags(const std::vector<std::string>& args, CaptureOptions* o,
                               bool* help) {
  cli::FlagTable flags = {
      {"model", cli::StringFlag(&o->model)},
      {"tokenizer", cli::StringFlag(&o->tokenizer)},
      {"prompt", cli::StringFlag(&o->prompt)},
      {"prompt_file", cli::StringFlag(&o->prompt_file)},
      {"generate", cli::IntFlag(0, LlamaConfig::kMaxSeqLen, &o->generate)},
      {"out", cli::StringFlag(&o->out)},
      {"layers", cli::StringFlag(&o->layers)},
      {"force", cli::BoolFlag(&o->force)},
      {"max_output_bytes", cli::IntFlag(1, int64_t{1} << 50, &o->max_output_bytes)},
      {"threads", cli::IntFlag(0, 1024, &o->threads)},
  };
  KVR_RETURN_IF_ERROR(cli::ParseFlags(args, flags, "capture", help));
  if (*help) return absl::OkStatus();
  if (o->prompt.empty() == o->prompt_file.empty()) {
    return absl::InvalidArgumentError(
        "exactly one of --prompt (non-empty) and --prompt_file is needed");
  }
  if (o->out.empty()) return absl::InvalidArgumentError("--out DIR is required");
  return ParseLayerList(o->layers);
}

absl::StatusOr<CaptureResult> Capture(Backend& backend,
                                      std::shared_ptr<const worker::LlamaWeights> weights,
                                      const worker::Tokenizer& tokenizer,
                                      const CaptureOptions& options) {
  if (weights == nullptr) return absl::InvalidArgumentError("capture: no weights");
  KVR_RETURN_IF_ERROR(weights->Validate());
  const LlamaConfig& c = weights->config;
  if (options.generate < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--generate: ", options.generate, " < 0"));
  }
  if (options.max_output_bytes <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_output_bytes: ", options.max_output_bytes, " must be > 0"));
  }
  KVR_ASSIGN_OR_RETURN(const std::vector<int> layers, ResolveLayers(options.layers, c.n_layers));

  // The prompt, bounded by the context before it is encoded.
  std::string text = options.prompt;
  if (!options.prompt_file.empty()) {
    KVR_ASSIGN_OR_RETURN(text, ReadPromptFile(options.prompt_file));
  }
  if (text.empty()) {
    return absl::InvalidArgumentError(options.prompt_file.empty()
                                          ? std::string("--prompt: empty prompt")
                                          : absl::StrCat("--prompt_file ", options.prompt_file,
                                                         ": empty prompt"));
  }
  const int64_t context = c.seq_len;
  if (const size_t per_token = tokenizer.max_bytes_per_token(); per_token > 0) {
    const size_t min_tokens = (text.size() + per_token - 1) / per_token;
    if (min_tokens > static_cast<size_t>(context)) {
      return absl::OutOfRangeError(absl::StrCat(
          "--prompt: ", text.size(), " bytes are at least ", min_tokens,
          " tokens, over the model's context (seq_len) of ", context, " tokens"));
    }
  }
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> prompt, tokenizer.Encode(text, /*add_bos=*/true));
  const int64_t p = static_cast<int64_t>(prompt.size());
  if (p > context) {
    return absl::OutOfRangeError(absl::StrCat("--prompt: ", p,
                                              " tokens exceed the model's context (seq_len) of ",
                                              context, " tokens"));
  }
  if (options.generate > context - p) {
    return absl::OutOfRangeError(absl::StrCat(
        "--generate: ", options.generate, " exceeds the context left after the prompt: ", p,
        " prompt tokens + ", options.generate, " > seq_len ", context, " (limit ", context - p,
        ")"));
  }
  const int64_t capacity = p + options.generate;

  // Output bytes (also the host memory held), before anything runs.
  const uint64_t kv_dim = static_cast<uint64_t>(c.kv_dim());
  const uint64_t q_dim = static_cast<uint64_t>(c.q_dim());
  // Per kv head: four 2-D v1.0 .npy headers (128 bytes each) and its
  // manifest entry (< 512 bytes); the manifest's token list (< 16 bytes a
  // token) and the rest (< 64 KiB with the text).
  const uint64_t kPerHeadOverhead = 4 * 128 + 512;
  const uint64_t kManifestBudget = 64 * 1024 + 16 * static_cast<uint64_t>(capacity);
  uint64_t per_layer = 0, total = 0;
  bool ok = MulAdd(2 * kv_dim + q_dim, static_cast<uint64_t>(capacity) * 4,
                   kPerHeadOverhead * static_cast<uint64_t>(c.n_kv_heads), &per_layer) &&
            MulAdd(per_layer, layers.size(), kManifestBudget, &total);
  if (!ok || total > static_cast<uint64_t>(options.max_output_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "--max_output_bytes: capturing ", layers.size(), " layers x ", c.n_kv_heads,
        " kv heads of ", capacity, " tokens needs ",
        ok ? absl::StrCat(total) : std::string("more than 2^64"), " bytes, limit ",
        options.max_output_bytes, " (raise --max_output_bytes, or capture fewer --layers)"));
  }
  KVR_RETURN_IF_ERROR(PrepareOutDir(options.out, options.force));

  // Backend state: weights, caches of `capacity` rows, activations.
  KVR_ASSIGN_OR_RETURN(const worker::DeviceWeights device_weights,
                       worker::DeviceWeights::Import(&backend, *weights));
  const worker::LlamaBlock block(&backend, &c, &device_weights);
  std::vector<Tensor> k_cache, v_cache;
  for (int l = 0; l < c.n_layers; ++l) {
    KVR_ASSIGN_OR_RETURN(Tensor k, backend.Allocate(DType::kF32, capacity, c.kv_dim()));
    KVR_ASSIGN_OR_RETURN(Tensor v, backend.Allocate(DType::kF32, capacity, c.kv_dim()));
    k_cache.push_back(std::move(k));
    v_cache.push_back(std::move(v));
  }
  const int64_t batch = std::min(kPrefillChunk, p);
  KVR_ASSIGN_OR_RETURN(const BlockActivations act,
                       BlockActivations::Allocate(backend, c, batch, batch));
  KVR_ASSIGN_OR_RETURN(const Tensor logits, backend.Allocate(DType::kF32, 1, c.vocab_size));
  std::vector<float> logits_host(static_cast<size_t>(c.vocab_size));

  CaptureResult result;
  result.last_attention.assign(static_cast<size_t>(c.n_layers),
                               std::vector<float>(static_cast<size_t>(q_dim)));
  // Host buffers per captured layer: prefill queries [p x q_dim], decode
  // queries [generate x q_dim].
  std::vector<std::vector<float>> train(layers.size()), decode(layers.size());
  std::vector<std::vector<float>*> train_of_layer(static_cast<size_t>(c.n_layers), nullptr);
  std::vector<std::vector<float>*> decode_of_layer(static_cast<size_t>(c.n_layers), nullptr);
  for (size_t i = 0; i < layers.size(); ++i) {
    train[i].resize(static_cast<size_t>(p) * q_dim);
    decode[i].resize(static_cast<size_t>(options.generate) * q_dim);
    train_of_layer[static_cast<size_t>(layers[i])] = &train[i];
    decode_of_layer[static_cast<size_t>(layers[i])] = &decode[i];
  }
  Recorder recorder(backend, c, std::move(k_cache), std::move(v_cache), train_of_layer,
                    &result.last_attention);

  std::vector<int32_t> positions(static_cast<size_t>(batch));
  // Runs tokens at first_pos.. (their queries to row first_pos - row0 of the
  // current buffers) and, when `want_logits`, the classifier on the last.
  auto forward = [&](std::span<const int32_t> tokens, int64_t first_pos, int64_t row0,
                     bool want_logits) -> absl::Status {
    const int64_t n = static_cast<int64_t>(tokens.size());
    for (int64_t i = 0; i < n; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(first_pos + i);
    const BlockActivations a = act.Rows(n);
    KVR_RETURN_IF_ERROR(block.Embed(tokens, a.x));
    recorder.SetBatch(first_pos, n, row0);
    for (int l = 0; l < c.n_layers; ++l) {
      KVR_RETURN_IF_ERROR(block.Forward(
          l, std::span<const int32_t>(positions.data(), static_cast<size_t>(n)), a, recorder));
    }
    if (!want_logits) return absl::OkStatus();
    KVR_RETURN_IF_ERROR(block.Logits(a.x.Rows(n - 1, 1), a.xb.Rows(0, 1), logits));
    return backend.DownloadF32(logits, logits_host);
  };

  // Prefill in chunks, then greedy decode steps, each generated token run as
  // one (so its query is captured), as the engine's Generate samples them.
  for (int64_t begin = 0; begin < p; begin += batch) {
    const int64_t n = std::min(batch, p - begin);
    KVR_RETURN_IF_ERROR(forward(std::span<const int32_t>(prompt).subspan(
                                    static_cast<size_t>(begin), static_cast<size_t>(n)),
                                begin, 0, begin + n == p));
  }
  recorder.SetQueryBuffers(decode_of_layer);
  std::vector<int32_t>& generated = result.generated_tokens;
  std::string generated_text;
  int32_t prev = prompt.back();
  while (static_cast<int64_t>(generated.size()) < options.generate) {
    const int32_t next = static_cast<int32_t>(
        std::max_element(logits_host.begin(), logits_host.end()) - logits_host.begin());
    if (next == tokenizer.bos_id() || next == tokenizer.eos_id()) break;
    KVR_ASSIGN_OR_RETURN(const std::string piece, tokenizer.Decode(prev, next));
    generated_text += piece;
    generated.push_back(next);
    prev = next;
    const int64_t pos = p + static_cast<int64_t>(generated.size()) - 1;
    KVR_RETURN_IF_ERROR(forward(std::span<const int32_t>(&generated.back(), 1), pos, p,
                                static_cast<int64_t>(generated.size()) < options.generate));
  }
  const int64_t g_count = static_cast<int64_t>(generated.size());
  const int64_t t = p + g_count;

  // Files, per captured layer and kv head.
  const int group = c.n_heads / c.n_kv_heads;
  const int hd = c.head_dim;
  result.prompt_tokens = prompt;
  result.generated_text = generated_text;
  result.layers = layers;
  result.n_kv_heads = c.n_kv_heads;
  result.head_dim = hd;
  result.group = group;
  std::string files_json;
  std::vector<float> k_host(static_cast<size_t>(t) * kv_dim), v_host(k_host.size());
  auto write = [&](const std::string& name, ConstMatrixView m) -> absl::Status {
    const std::string path = (std::filesystem::path(options.out) / name).string();
    KVR_RETURN_IF_ERROR(WriteNpyMatrix(path, m));
    std::error_code ec;
    result.bytes_written += static_cast<int64_t>(std::filesystem::file_size(path, ec));
    result.files.push_back(path);
    return absl::OkStatus();
  };
  for (size_t i = 0; i < layers.size(); ++i) {
    const int l = layers[i];
    KVR_RETURN_IF_ERROR(backend.DownloadF32(recorder.k_cache(l).Rows(0, t), k_host));
    KVR_RETURN_IF_ERROR(backend.DownloadF32(recorder.v_cache(l).Rows(0, t), v_host));
    for (int h = 0; h < c.n_kv_heads; ++h) {
      const std::string stem = absl::StrCat("L", l, "_H", h, "_");
      const size_t col = static_cast<size_t>(h) * static_cast<size_t>(hd);
      KVR_RETURN_IF_ERROR(write(stem + "keys.npy",
                                ConstMatrixView(k_host.data() + col, static_cast<size_t>(t),
                                                static_cast<size_t>(hd), kv_dim)));
      KVR_RETURN_IF_ERROR(write(stem + "values.npy",
                                ConstMatrixView(v_host.data() + col, static_cast<size_t>(t),
                                                static_cast<size_t>(hd), kv_dim)));
      const Matrix tq = GatherQueries(train[i], static_cast<size_t>(p), q_dim, h, group, hd);
      KVR_RETURN_IF_ERROR(write(stem + "train.npy", tq.view()));
      const Matrix dq =
          GatherQueries(decode[i], static_cast<size_t>(g_count), q_dim, h, group, hd);
      KVR_RETURN_IF_ERROR(write(stem + "queries.npy", dq.view()));
      absl::StrAppend(&files_json, files_json.empty() ? "" : ",\n",
                      absl::StrFormat("    {\"layer\": %d, \"kv_head\": %d, \"keys\": \"%skeys.npy\", "
                                      "\"values\": \"%svalues.npy\", \"train\": \"%strain.npy\", "
                                      "\"queries\": \"%squeries.npy\", \"keys_rows\": %d, "
                                      "\"train_rows\": %d, \"queries_rows\": %d}",
                                      l, h, stem, stem, stem, stem, t, tq.rows, dq.rows));
    }
  }

  // The manifest, last: its presence says the capture is complete.
  std::vector<int32_t> all_tokens = prompt;
  all_tokens.insert(all_tokens.end(), generated.begin(), generated.end());
  const std::string manifest = absl::StrCat(
      "{\n  \"format\": \"kvr-capture-1\",\n  \"model\": ", JsonString(options.model),
      ",\n  \"tokenizer\": ", JsonString(options.tokenizer),
      absl::StrFormat(",\n  \"config\": {\"dim\": %d, \"hidden_dim\": %d, \"n_layers\": %d, "
                      "\"n_heads\": %d, \"n_kv_heads\": %d, \"head_dim\": %d, \"vocab_size\": "
                      "%d, \"seq_len\": %d, \"rope_theta\": %g, \"rope_style\": \"%s\"},",
                      c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim,
                      c.vocab_size, c.seq_len, c.rope_theta,
                      c.rope_style == worker::RopeStyle::kHalfSplit ? "half_split"
                                                                    : "interleaved"),
      "\n  \"group\": ", group, ",\n  \"scale\": ", absl::StrFormat("%.9g", 1.0 / std::sqrt(hd)),
      ",\n  \"prompt_tokens\": ", p, ",\n  \"generate\": ", options.generate,
      ",\n  \"generated_tokens\": ", g_count, ",\n  \"tokens\": [",
      absl::StrJoin(all_tokens, ", "), "],\n  \"generated_text\": ", JsonString(generated_text),
      ",\n  \"layers\": [", absl::StrJoin(layers, ", "),
      "],\n  \"row_order\": \"train/queries row p*group + j = query head kv_head*group + j at "
      "position p\",\n  \"files\": [\n",
      files_json, "\n  ]\n}\n");
  const std::string manifest_path = (std::filesystem::path(options.out) / "manifest.json").string();
  KVR_RETURN_IF_ERROR(WriteTextAtomically(manifest_path, manifest));
  result.files.push_back(manifest_path);
  result.bytes_written += static_cast<int64_t>(manifest.size());
  return result;
}

absl::StatusOr<CaptureResult> RunCapture(const CaptureOptions& options) {
  CaptureOptions o = options;
  KVR_ASSIGN_OR_RETURN(
      worker::LoadedModel loaded,
      worker::LoadModel(o.model, o.tokenizer,
                        [](const std::string& path)
                            -> absl::StatusOr<std::unique_ptr<worker::Tokenizer>> {
                          return worker::SentencePieceTokenizer::Load(path);
                        }));
  o.model = loaded.model;
  o.tokenizer = loaded.tokenizer_path;
  std::shared_ptr<const worker::LlamaWeights> weights = std::move(loaded.weights);
  std::unique_ptr<worker::Tokenizer> tokenizer = std::move(loaded.tokenizer);
  worker::BackendOptions bo;
  bo.num_threads = static_cast<int>(o.threads);
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                       worker::BackendRegistry::Create("cpu", bo));
  return Capture(*backend, std::move(weights), *tokenizer, o);
}

int MainCapture(const std::vector<std::string>& args) {
  CaptureOptions options;
  bool help = false;
  if (absl::Status s = ParseCaptureFlags(args, &options, &help); !s.ok()) {
    std::fprintf(stderr, "kvr capture: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  if (help) {
    std::fputs(kCaptureUsage, stdout);
    return 0;
  }
  absl::StatusOr<CaptureResult> r = RunCapture(options);
  if (!r.ok()) {
    std::fprintf(stderr, "kvr capture: %s\n", r.status().ToString().c_str());
    return 1;
  }
  std::fprintf(stderr,
               "kvr capture: %zu prompt + %zu generated tokens, layers %s x %d kv heads "
               "(head_dim %d, group %d): %zu files, %lld bytes in %s\n",
               r->prompt_tokens.size(), r->generated_tokens.size(),
               absl::StrJoin(r->layers, ",").c_str(), r->n_kv_heads, r->head_dim, r->group,
               r->files.size(), static_cast<long long>(r->bytes_written), options.out.c_str());
  return 0;
}

}  // namespace kvr::capture
