#include "gpu_worker/model/safetensors_loader.h"


#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "gpu_worker/model/hf_config.h"
#include "gpu_worker/model/llama2c_loader.h"
#include "gpu_worker/model/model_files.h"
#include "nlohmann/json.hpp"

namespace kvr::worker {
namespace {

using Json = nlohmann::json;

// safetensors' own limit on the header size.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

// Element size of a safetensors dtype string, 0 when unknown.
size_t DtypeBytes(const std::string& d) {
  static const std::map<std::string, size_t, std::less<>> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8}};
  auto it = kSizes.find(d);
  return it == kSizes.end() ? 0 : it->second;
}

std::string ShapeStr(std::span<const int64_t> shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
}

// Heap buffers made at load (converted or realigned tensors) plus the
// mappings the views alias.
struct Storage {
  std::vector<std::shared_ptr<const void>> mappings;
  std::vector<std::unique_ptr<float[]>> f32_buffers;
  std::vector<std::unique_ptr<uint16_t[]>> u16_buffers;
};

float ElementToFloat(DType t, const void* base, size_t i) {
  switch (t) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, static_cast<const std::byte*>(base) + 4 * i, 4);
      return f;
    }
    case DType::kBf16:
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const std::byte*>(base) + 2 * i, 2);
      return t == DType::kBf16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
    }
  }
  return 0.0f;
}

// Builds LlamaWeights views out of the entries of one checkpoint.
class WeightBuilder {
 public:
  WeightBuilder(const std::string& dir, Storage* storage) : dir_(dir), storage_(storage) {}

  void Add(const SafetensorsEntry& e, const std::string& file) {
    entries_[e.name] = Located{&e, file};
  }
  // A tensor the index names, in a shard that is missing.
  void AddMissing(const std::string& name, const std::string& file) { missing_[name] = file; }

  // The tensor `name` as [rows x cols] (`vector`: stored 1-D [cols]); f32
  // when `f32_only`.
  absl::StatusOr<HostTensor> Get(const std::string& name, int64_t rows, int64_t cols, bool vector,
                                 bool f32_only) {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      if (auto m = missing_.find(name); m != missing_.end()) {
        return absl::DataLossError(absl::StrCat("HF checkpoint ", dir_, ": tensor ", name,
                                                " is in shard ", m->second,
                                                ", which does not exist"));
      }
      return absl::InvalidArgumentError(
          absl::StrCat("HF checkpoint ", dir_, ": tensor ", name, " is missing"));
    }
    const SafetensorsEntry& e = *it->second.entry;
    const std::string& file = it->second.file;
    const std::vector<int64_t> want =
        vector ? std::vector<int64_t>{cols} : std::vector<int64_t>{rows, cols};
    if (e.shape != want) {
      return absl::InvalidArgumentError(absl::StrCat("HF checkpoint ", dir_, ": tensor ", name,
                                                     " in ", file, " has shape ", ShapeStr(e.shape),
                                                     ", config.json wants ", ShapeStr(want)));
    }
    DType src;
    if (e.dtype == "F32") {
      src = DType::kF32;
    } else if (e.dtype == "BF16") {
      src = DType::kBf16;
    } else if (e.dtype == "F16") {
      src = DType::kF16;
    } else {
      return absl::InvalidArgumentError(absl::StrCat("HF checkpoint ", dir_, ": tensor ", name,
                                                     " in ", file, " has dtype ", e.dtype,
                                                     "; supported: BF16, F16, F32"));
    }
    const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(cols);
    // ParseSafetensors checked bytes == numel * element size.
    KVR_CHECK(e.data.size() == n * DTypeSize(src));
    const bool aligned = reinterpret_cast<uintptr_t>(e.data.data()) % DTypeSize(src) == 0;
    if (src == DType::kF32 && aligned) {
      return HostTensor{DType::kF32, rows, cols, e.data.data()};
    }
    if (src == DType::kBf16 && !f32_only) {
      if (aligned) return HostTensor{DType::kBf16, rows, cols, e.data.data()};
      auto buf = std::make_unique<uint16_t[]>(n);
      std::memcpy(buf.get(), e.data.data(), n * 2);
      storage_->u16_buffers.push_back(std::move(buf));
      return HostTensor{DType::kBf16, rows, cols, storage_->u16_buffers.back().get()};
    }
    auto buf = std::make_unique<float[]>(n);
    for (size_t i = 0; i < n; ++i) buf[i] = ElementToFloat(src, e.data.data(), i);
    storage_->f32_buffers.push_back(std::move(buf));
    return HostTensor{DType::kF32, rows, cols, storage_->f32_buffers.back().get()};
  }

 private:
  struct Located {
    const SafetensorsEntry* entry;
    std::string file;
  };
  const std::string& dir_;
  Storage* storage_;
  std::unordered_map<std::string, Located> entries_;
  std::unordered_map<std::string, std::string> missing_;
};

}  // namespace

absl::StatusOr<std::vector<SafetensorsEntry>> ParseSafetensors(std::span<const std::byte> file,
                                                               const std::string& name) {
  if (file.size() < 8) {
    return absl::DataLossError(absl::StrCat("safetensors file ", name, " is ", file.size(),
                                            " bytes, shorter than the 8-byte header length"));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(file[static_cast<size_t>(i)]);
  if (n > file.size() - 8) {
    return absl::DataLossError(absl::StrCat("safetensors file ", name, ": header length ", n,
                                            " is larger than the ", file.size() - 8,
                                            " bytes after it; the file is truncated or corrupt"));
  }
  if (n > kMaxHeaderBytes) {
    return absl::DataLossError(absl::StrCat("safetensors file ", name, ": header length ", n,
                                            " exceeds the ", kMaxHeaderBytes, "-byte limit"));
  }
  const std::string_view header(reinterpret_cast<const char*>(file.data() + 8),
                                static_cast<size_t>(n));
  const std::span<const std::byte> data = file.subspan(8 + static_cast<size_t>(n));
  Json j;
  try {
    j = Json::parse(header);
  } catch (const Json::exception& e) {
    return absl::DataLossError(
        absl::StrCat("safetensors file ", name, ": header is not valid JSON: ", e.what()));
  }
  if (!j.is_object()) {
    return absl::DataLossError(
        absl::StrCat("safetensors file ", name, ": header is not a JSON object"));
  }
  std::vector<SafetensorsEntry> out;
  out.reserve(j.size());
  for (const auto& item : j.items()) {
    // Named, not a structured binding: clang 14 (the fuzz build) cannot
    // capture a structured binding in the lambda below.
    const std::string& key = item.key();
    const auto& v = item.value();
    if (key == "__metadata__") continue;
    auto bad = [&](const std::string& why) {
      return absl::DataLossError(
          absl::StrCat("safetensors file ", name, ": tensor ", key, ": ", why));
    };
    if (!v.is_object()) return bad("header entry is not an object");
    auto dt = v.find("dtype");
    auto sh = v.find("shape");
    auto off = v.find("data_offsets");
    if (dt == v.end() || !dt->is_string()) return bad("missing or non-string dtype");
    if (sh == v.end() || !sh->is_array()) return bad("missing or non-array shape");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned()) {
      return bad("data_offsets must be two non-negative integers");
    }
    SafetensorsEntry e;
    e.name = key;
    e.dtype = dt->get<std::string>();
    uint64_t numel = 1;
    for (const Json& d : *sh) {
      if (!d.is_number_unsigned()) return bad(absl::StrCat("bad shape ", sh->dump()));
      if (__builtin_mul_overflow(numel, d.get<uint64_t>(), &numel) ||
          d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
        return bad(absl::StrCat("shape ", sh->dump(), " overflows"));
      }
      e.shape.push_back(static_cast<int64_t>(d.get<uint64_t>()));
    }
    const uint64_t begin = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
    if (begin > end || end > data.size()) {
      return bad(absl::StrCat("data_offsets [", begin, ", ", end,
                              "] lie outside the data section of ", data.size(),
                              " bytes; the file is truncated or corrupt"));
    }
    if (const size_t es = DtypeBytes(e.dtype); es != 0) {
      uint64_t bytes = 0;
      if (__builtin_mul_overflow(numel, uint64_t{es}, &bytes) || bytes != end - begin) {
        return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] hold ", end - begin,
                                " bytes, but dtype ", e.dtype, " x shape ", sh->dump(), " needs ",
                                numel, " x ", es));
      }
    }
    e.data = data.subspan(static_cast<size_t>(begin), static_cast<size_t>(end - begin));
    out.push_back(std::move(e));
  }
  return out;
}

absl::StatusOr<std::shared_ptr<const LlamaWeights>> LoadHfCheckpoint(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string config_path = (fs::path(dir) / "config.json").string();
  KVR_ASSIGN_OR_RETURN(LlamaConfig config, LoadHfConfig(config_path));

  auto storage = std::make_shared<Storage>();
  // Parsed headers, one per file; the builder points into them.
  std::vector<std::pair<std::string, std::vector<SafetensorsEntry>>> files;
  std::vector<std::pair<std::string, std::string>> missing;  // tensor, shard
  auto map_and_parse = [&](const std::string& file) -> absl::Status {
    const std::string path = (fs::path(dir) / file).string();
    KVR_ASSIGN_OR_RETURN(MappedFile m, MapFile(path));
    KVR_ASSIGN_OR_RETURN(std::vector<SafetensorsEntry> entries, ParseSafetensors(m.bytes, path));
    storage->mappings.push_back(std::move(m.keepalive));
    files.emplace_back(file, std::move(entries));
    return absl::OkStatus();
  };

  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  const std::string single_path = (fs::path(dir) / "model.safetensors").string();
  // Tensor -> shard for indexed checkpoints.
  std::unordered_map<std::string, std::string> weight_map;
  if (fs::exists(index_path)) {
    KVR_ASSIGN_OR_RETURN(const std::string text, ReadText(index_path));
    Json j;
    try {
      j = Json::parse(text);
    } catch (const Json::exception& e) {
      return absl::DataLossError(
          absl::StrCat("safetensors index ", index_path, " is not valid JSON: ", e.what()));
    }
    auto wm = j.is_object() ? j.find("weight_map") : j.end();
    if (wm == j.end() || !wm->is_object()) {
      return absl::DataLossError(
          absl::StrCat("safetensors index ", index_path, " has no weight_map object"));
    }
    std::map<std::string, std::string> shard_first_tensor;
    for (const auto& [tensor, shard] : wm->items()) {
      if (!shard.is_string()) {
        return absl::DataLossError(absl::StrCat("safetensors index ", index_path, ": tensor ",
                                                tensor, " maps to a non-string ", shard.dump()));
      }
      const std::string s = shard.get<std::string>();
      if (s.empty() || s.find('/') != std::string::npos || s == "." || s == "..") {
        return absl::InvalidArgumentError(absl::StrCat("safetensors index ", index_path,
                                                       ": tensor ", tensor, " maps to shard \"", s,
                                                       "\", which is not a plain file name"));
      }
      weight_map[tensor] = s;
      shard_first_tensor.emplace(s, tensor);
    }
    for (const auto& [shard, tensor] : shard_first_tensor) {
      if (!fs::exists(fs::path(dir) / shard)) {
        for (const auto& [t, s] : weight_map) {
          if (s == shard) missing.emplace_back(t, s);
        }
        continue;
      }
      KVR_RETURN_IF_ERROR(map_and_parse(shard));
    }
  } else if (fs::exists(single_path)) {
    KVR_RETURN_IF_ERROR(map_and_parse("model.safetensors"));
  } else {
    return absl::NotFoundError(absl::StrCat("HF checkpoint ", dir,
                                            " has neither model.safetensors nor "
                                            "model.safetensors.index.json"));
  }

  WeightBuilder b(dir, storage.get());
  for (const auto& [file, entries] : files) {
    for (const SafetensorsEntry& e : entries) {
      // With an index, the index decides which shard holds a tensor.
      if (!weight_map.empty()) {
        auto it = weight_map.find(e.name);
        if (it != weight_map.end() && it->second != file) continue;
      }
      b.Add(e, file);
    }
  }
  for (const auto& [t, s] : missing) b.AddMissing(t, s);

  auto w = std::make_shared<LlamaWeights>();
  w->config = config;
  const LlamaConfig& c = w->config;
  const int64_t D = c.dim, H = c.hidden_dim, V = c.vocab_size, Q = c.q_dim(), KV = c.kv_dim();
  KVR_ASSIGN_OR_RETURN(w->token_embedding, b.Get("model.embed_tokens.weight", V, D, false, false));
  KVR_ASSIGN_OR_RETURN(w->final_norm, b.Get("model.norm.weight", 1, D, true, true));
  if (c.tied_embeddings) {
    w->classifier = w->token_embedding;
  } else {
    KVR_ASSIGN_OR_RETURN(w->classifier, b.Get("lm_head.weight", V, D, false, false));
  }
  w->layers.resize(static_cast<size_t>(c.n_layers));
  for (int l = 0; l < c.n_layers; ++l) {
    LlamaLayerWeights& lw = w->layers[static_cast<size_t>(l)];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    KVR_ASSIGN_OR_RETURN(lw.attn_norm, b.Get(p + "input_layernorm.weight", 1, D, true, true));
    KVR_ASSIGN_OR_RETURN(lw.wq, b.Get(p + "self_attn.q_proj.weight", Q, D, false, false));
    KVR_ASSIGN_OR_RETURN(lw.wk, b.Get(p + "self_attn.k_proj.weight", KV, D, false, false));
    KVR_ASSIGN_OR_RETURN(lw.wv, b.Get(p + "self_attn.v_proj.weight", KV, D, false, false));
    KVR_ASSIGN_OR_RETURN(lw.wo, b.Get(p + "self_attn.o_proj.weight", D, Q, false, false));
    KVR_ASSIGN_OR_RETURN(lw.ffn_norm,
                         b.Get(p + "post_attention_layernorm.weight", 1, D, true, true));
    KVR_ASSIGN_OR_RETURN(lw.w1, b.Get(p + "mlp.gate_proj.weight", H, D, false, false));
    KVR_ASSIGN_OR_RETURN(lw.w2, b.Get(p + "mlp.down_proj.weight", D, H, false, false));
    KVR_ASSIGN_OR_RETURN(lw.w3, b.Get(p + "mlp.up_proj.weight", H, D, false, false));
  }
  w->storage = std::move(storage);
  KVR_RETURN_IF_ERROR(w->Validate());
  return std::shared_ptr<const LlamaWeights>(std::move(w));
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------
namespace {

struct OutTensor {
  std::string name;
  const HostTensor* src;
  bool vector;        // written 1-D [cols]
  int permute_heads;  // > 0: permute rows interleaved -> rotate_half over this many heads
};

const char* SafetensorsDtype(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBf16:
      return "BF16";
    case DType::kF16:
      return "F16";
  }
  return "?";
}

const char* TorchDtype(DType t) {
  switch (t) {
    case DType::kF32:
      return "float32";
    case DType::kBf16:
      return "bfloat16";
    case DType::kF16:
      return "float16";
  }
  return "?";
}

// Appends tensor `t` converted to `dtype` (rows permuted when asked).
void AppendTensor(const OutTensor& t, DType dtype, int head_dim, std::string* out) {
  const HostTensor& h = *t.src;
  const int64_t rows = h.rows, cols = h.cols;
  const size_t es = DTypeSize(dtype);
  const size_t start = out->size();
  out->resize(start + static_cast<size_t>(rows * cols) * es);
  char* dst = out->data() + start;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t src_row = r;
    if (t.permute_heads > 0) {
      const int64_t head = r / head_dim, within = r % head_dim, half = head_dim / 2;
      const int64_t tt = within / half, i = within % half;
      src_row = head * head_dim + 2 * i + tt;
    }
    for (int64_t c = 0; c < cols; ++c) {
      const float f = ElementToFloat(h.dtype, h.data, static_cast<size_t>(src_row * cols + c));
      char* p = dst + static_cast<size_t>(r * cols + c) * es;
      if (dtype == DType::kF32) {
        std::memcpy(p, &f, 4);
      } else {
        const uint16_t v = dtype == DType::kBf16 ? FloatToBf16(f) : FloatToFp16(f);
        std::memcpy(p, &v, 2);
      }
    }
  }
}

absl::Status WriteFile(const std::string& path, std::string_view a, std::string_view b = {}) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat("cannot create ", path));
  out.write(a.data(), static_cast<std::streamsize>(a.size()));
  out.write(b.data(), static_cast<std::streamsize>(b.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("error writing ", path));
  return absl::OkStatus();
}

absl::Status WriteShard(const std::string& path, const std::vector<const OutTensor*>& tensors,
                        DType dtype, int head_dim) {
  Json header = Json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::string data;
  for (const OutTensor* t : tensors) {
    const size_t begin = data.size();
    AppendTensor(*t, dtype, head_dim, &data);
    Json shape =
        t->vector ? Json::array({t->src->cols}) : Json::array({t->src->rows, t->src->cols});
    header[t->name] = {{"dtype", SafetensorsDtype(dtype)},
                       {"shape", shape},
                       {"data_offsets", {begin, data.size()}}};
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');  // the data section starts 8-aligned
  std::string prefix(8, '\0');
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i)
    prefix[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
  prefix += h;
  return WriteFile(path, prefix, data);
}

}  // namespace

absl::Status WriteHfCheckpoint(const LlamaWeights& weights, const std::string& dir,
                               const HfWriteOptions& options) {
  namespace fs = std::filesystem;
  if (absl::Status s = weights.Validate(); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("WriteHfCheckpoint: ", s.message()));
  }
  const LlamaConfig& c = weights.config;
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    return absl::InternalError(absl::StrCat("cannot create directory ", dir, ": ", ec.message()));

  const bool permute = c.rope_style == RopeStyle::kInterleaved;
  std::vector<OutTensor> tensors;
  tensors.push_back({"model.embed_tokens.weight", &weights.token_embedding, false, 0});
  for (int l = 0; l < c.n_layers; ++l) {
    const LlamaLayerWeights& lw = weights.layers[static_cast<size_t>(l)];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    tensors.push_back({p + "input_layernorm.weight", &lw.attn_norm, true, 0});
    tensors.push_back({p + "self_attn.q_proj.weight", &lw.wq, false, permute ? c.n_heads : 0});
    tensors.push_back({p + "self_attn.k_proj.weight", &lw.wk, false, permute ? c.n_kv_heads : 0});
    tensors.push_back({p + "self_attn.v_proj.weight", &lw.wv, false, 0});
    tensors.push_back({p + "self_attn.o_proj.weight", &lw.wo, false, 0});
    tensors.push_back({p + "post_attention_layernorm.weight", &lw.ffn_norm, true, 0});
    tensors.push_back({p + "mlp.gate_proj.weight", &lw.w1, false, 0});
    tensors.push_back({p + "mlp.up_proj.weight", &lw.w3, false, 0});
    tensors.push_back({p + "mlp.down_proj.weight", &lw.w2, false, 0});
  }
  tensors.push_back({"model.norm.weight", &weights.final_norm, true, 0});
  if (!c.tied_embeddings) tensors.push_back({"lm_head.weight", &weights.classifier, false, 0});

  // Greedy packing into shards in the order above.
  const size_t es = DTypeSize(options.dtype);
  std::vector<std::vector<const OutTensor*>> shards(1);
  int64_t shard_bytes = 0, total_bytes = 0;
  for (const OutTensor& t : tensors) {
    const int64_t bytes = static_cast<int64_t>(t.src->numel() * es);
    if (options.max_shard_bytes > 0 && !shards.back().empty() &&
        shard_bytes + bytes > options.max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(&t);
    shard_bytes += bytes;
    total_bytes += bytes;
  }

  LlamaConfig out_config = c;
  out_config.rope_style = RopeStyle::kHalfSplit;
  KVR_RETURN_IF_ERROR(WriteFile((fs::path(dir) / "config.json").string(),
                                HfConfigJson(out_config, TorchDtype(options.dtype))));
  if (options.max_shard_bytes <= 0) {
    return WriteShard((fs::path(dir) / "model.safetensors").string(), shards[0], options.dtype,
                      c.head_dim);
  }
  Json weight_map = Json::object();
  const size_t n = shards.size();
  for (size_t i = 0; i < n; ++i) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", i + 1, n);
    KVR_RETURN_IF_ERROR(
        WriteShard((fs::path(dir) / name).string(), shards[i], options.dtype, c.head_dim));
    for (const OutTensor* t : shards[i]) weight_map[t->name] = name;
  }
  Json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  return WriteFile((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2) + "\n");
}

absl::Status ConvertLlama2cToHf(const std::string& llama2c_path, const std::string& dir,
                                const HfWriteOptions& options) {
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<const LlamaWeights> w, LoadLlama2c(llama2c_path));
  return WriteHfCheckpoint(*w, dir, options);
}

}  // namespace kvr::worker
