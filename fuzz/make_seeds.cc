// Regenerates the generated seeds of every harness under a corpus folder
// (fuzz/README.md) from real inputs: serialized small indexes of each kind,
// UCX frames of real Attend requests and replies, a tiny llama2.c
// checkpoint, a tiny HF checkpoint (model.safetensors + config.json), a tiny
// SentencePiece model and tokenizer.json, the bundled tok512.bin, OpenAI
// request bodies. Each seed starts with the mode byte its harness reads.
// Deterministic; kept small (the whole corpus stays well under 2 MB).
//
// Usage: make_seeds CORPUS_DIR MODELS_DIR
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "common/serialize.h"
#include "common/tensor.h"
#include "gpu_worker/model/random_weights.h"
#include "gpu_worker/model/safetensors_loader.h"
#include "fuzz/service_ops.h"
#include "kvr/v1/generation.pb.h"
#include "kvr/v1/retrieval.pb.h"
#include "nlohmann/json.hpp"
#include "retrieval_node/core/node_core.h"
#include "retrieval_node/index/attention_graph_index.h"
#include "retrieval_node/index/calibrate.h"
#include "retrieval_node/index/flat_index.h"
#include "retrieval_node/index/ivf_index.h"
#include "retrieval_node/wire/proto_convert.h"
#include "retrieval_node/store/shard_store.h"
#include "retrieval_node/wire/ucx_wire.h"
#include "rocksdb/db.h"

namespace fs = std::filesystem;


namespace {

fs::path g_corpus;

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void Write(const std::string& harness, const std::string& name, uint8_t mode,
           const std::string& bytes) {
  fs::create_directories(g_corpus / harness);
  std::ofstream out(g_corpus / harness / name, std::ios::binary);
  out.put(static_cast<char>(mode));
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
std::string Bytes(const T& v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(v));
}

kvr::Matrix Random(size_t rows, size_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  kvr::Matrix m(rows, cols);
  for (float& x : m.data) x = dist(rng);
  return m;
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "make_seeds: %s: %s\n", what, std::string(s.message()).c_str());
    std::exit(1);
  }
}

void UcxSeeds() {
  using namespace kvr::retrieval;  // NOLINT(build/namespaces)
  // Byte 0 = 16: a 16-byte header; reply partials shape 1 x 5.
  auto frame = [](const auto& header, const std::string& data) { return Bytes(header) + data; };
  kvr::v1::AttendRequest req;
  req.set_sequence_id(7);
  req.set_layer(0);
  const kvr::Matrix q = Random(2, 8, 1);
  PackMatrix(q.view(), req.mutable_queries());
  req.set_k(4);
  UcxRequestHeader h;
  h.call_id = 5;
  Write("ucx_wire", "attend", 16, frame(h, req.SerializeAsString()));
  req.set_beam(8);
  req.set_nprobe(2);
  req.set_scale(0.5f);
  Write("ucx_wire", "attend-knobs", 16, frame(h, req.SerializeAsString()));
  req.set_sequence_id(8);
  Write("ucx_wire", "attend-unknown-sequence", 16, frame(h, req.SerializeAsString()));
  req.set_sequence_id(7);
  req.set_k(0);
  Write("ucx_wire", "attend-bad-k", 16, frame(h, req.SerializeAsString()));
  // Version 2: a shard selection (the fuzz node holds kv head 0, chunk 0),
  // then one listing it twice and one naming a chunk the node lacks.
  req.set_k(4);
  h.version = kUcxWireVersionShards;
  kvr::v1::HeadChunk* sel = req.add_shards();
  sel->set_kv_head(0);
  sel->set_chunk(0);
  Write("ucx_wire", "attend-shards", 16, frame(h, req.SerializeAsString()));
  *req.add_shards() = *sel;
  Write("ucx_wire", "attend-shards-duplicate", 16, frame(h, req.SerializeAsString()));
  req.mutable_shards()->RemoveLast();
  req.mutable_shards(0)->set_chunk(3);
  Write("ucx_wire", "attend-shards-not-held", 16, frame(h, req.SerializeAsString()));
  req.clear_shards();
  h.version = kUcxWireVersion;
  h.flags = kUcxFlagPing;
  Write("ucx_wire", "ping", 16, frame(h, ""));
  kvr::v1::AttendResponse resp;
  kvr::v1::Partials* p = resp.mutable_partials();
  p->set_n(1);
  p->set_dim(5);
  const kvr::Matrix o = Random(1, 5, 2);
  p->set_o(std::string(reinterpret_cast<const char*>(o.data.data()), 5 * sizeof(float)));
  const float m = 1.5f, l = 2.0f;
  p->set_m(Bytes(m));
  p->set_l(Bytes(l));
  resp.mutable_stats()->set_shards_searched(2);
  UcxReplyHeader r;
  r.call_id = 5;
  Write("ucx_wire", "reply", 16, frame(r, resp.SerializeAsString()));
  r.code = 5;
  Write("ucx_wire", "reply-error", 16, frame(r, "sequence 8 not found"));
}

void IndexSeeds() {
  const kvr::Matrix keys = Random(48, 8, 3);
  std::vector<std::pair<std::string, std::unique_ptr<kvr::index::KeyIndex>>> indexes;
  auto flat = kvr::index::FlatIndex::Create(8);
  Check(flat.status(), "flat");
  Check((*flat)->Add(keys.view()), "flat add");
  indexes.emplace_back("flat", std::move(flat).value());
  kvr::index::IvfOptions io;
  io.nlist = 4;
  auto ivf = kvr::index::IvfIndex::Build(keys.view(), io, nullptr);
  Check(ivf.status(), "ivf");
  indexes.emplace_back("ivf", std::move(ivf).value());
  kvr::index::AttentionGraphOptions go;
  go.degree = 4;
  go.build_beam = 8;
  go.default_beam = 8;
  go.entry_points = 2;
  const kvr::Matrix train = Random(16, 8, 4);
  auto graph = kvr::index::AttentionGraphIndex::BuildFromQueries(keys.view(), train.view(), 4, go,
                                                                  nullptr);
  Check(graph.status(), "graph");
  indexes.emplace_back("graph", std::move(graph).value());
  // Calibrated wrappers (blob kind 4) around a flat and a graph index.
  {
    auto inner = kvr::index::FlatIndex::Create(8);
    Check(inner.status(), "calibrated flat");
    Check((*inner)->Add(keys.view()), "calibrated flat add");
    kvr::index::CalibrationResult c;
    c.kind = kvr::index::IndexType::kFlat;
    c.expected_recall = 1.0;
    c.target_recall = 0.95;
    c.k = 4;
    c.holdout_queries = 16;
    c.cost_per_query = 48;
    auto wrapped = kvr::index::CalibratedIndex::Create(std::move(inner).value(), c);
    Check(wrapped.status(), "calibrated flat wrap");
    indexes.emplace_back("calibrated-flat", std::move(wrapped).value());
    auto g = kvr::index::AttentionGraphIndex::BuildFromQueries(keys.view(), train.view(), 4, go,
                                                                nullptr);
    Check(g.status(), "calibrated graph");
    c.kind = kvr::index::IndexType::kGraph;
    c.beam = 6;
    c.expected_recall = 0.97;
    c.cost_per_query = 96;
    auto wrapped_graph = kvr::index::CalibratedIndex::Create(std::move(g).value(), c);
    Check(wrapped_graph.status(), "calibrated graph wrap");
    indexes.emplace_back("calibrated-graph", std::move(wrapped_graph).value());
  }
  for (auto& [name, idx] : indexes) {
    std::vector<uint8_t> blob;
    Check(idx->Serialize(&blob), "serialize");
    const std::string raw(blob.begin(), blob.end());
    Write("index", name + "-blob", 0, std::string(1, '\0') + raw);
    auto opened = kvr::OpenBlob(blob);
    Check(opened.status(), "open");
    // Payload mode: byte 0 = 1 | (kind - 1) << 1, byte 1 = version.
    const std::string payload(opened->payload.begin(), opened->payload.end());
    Write("index", name + "-payload", static_cast<uint8_t>(1 | ((opened->kind - 1) << 1)),
          std::string(1, static_cast<char>(opened->version)) + payload);
  }
}

void Llama2cSeeds() {
  // dim 8, hidden 16, 1 layer, 2 heads, 2 kv heads, vocab 16 (negative:
  // unshared classifier), seq_len 8.
  for (int32_t vocab : {16, -16}) {
    const int32_t header[7] = {8, 16, 1, 2, 2, vocab, 8};
    std::string bytes(reinterpret_cast<const char*>(header), sizeof(header));
    const size_t floats = 816 + (vocab < 0 ? 128 : 0);
    for (size_t i = 0; i < floats; ++i) {
      const float v = static_cast<float>(static_cast<int>(i % 23) - 11) / 16.0f;
      bytes += Bytes(v);
    }
    // The harness reads the whole input as the file: no mode byte.
    fs::create_directories(g_corpus / "llama2c");
    std::ofstream(g_corpus / "llama2c" / (vocab < 0 ? "tiny-unshared.bin" : "tiny.bin"),
                  std::ios::binary)
        << bytes;
  }
}

const char* const kTexts[] = {
    "Once upon a time, there was a little girl named Lily.",
    "h\xc3\xa9llo w\xc3\xb6rld \xf0\x9f\x98\x80 123456789 \t\n\n  spaces",
    "<s></s><|begin_of_text|>hello<|eot_id|>",
    "\xff\xfe invalid \xc3 utf8 \xe2\x82",
};

void TokenizerSeeds(const fs::path& models) {
  // llama2c: load mode with vocab 512 (byte 0 = 1 | 3 << 1), encode mode.
  Write("llama2c_tokenizer", "load-tok512", 7, ReadFile(models / "tok512.bin"));
  for (size_t i = 0; i < std::size(kTexts); ++i) {
    Write("llama2c_tokenizer", "text-" + std::to_string(i), 0, kTexts[i]);
    Write("sentencepiece", "text-" + std::to_string(i), 0, kTexts[i]);
    Write("hf_bpe", "text-" + std::to_string(i), 0, kTexts[i]);
  }
  // SentencePiece's model: make_spm_seed (train_spm.cc).

  // tokenizer.json: byte-level BPE, 256 byte tokens, a few merges, added tokens.
  auto byte_char = [](int b) {
    int cp = b;
    if (!((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)) {
      int n = 0;
      for (int x = 0; x < b; ++x) {
        if (!((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174)) ++n;
      }
      cp = 256 + n;
    }
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    return s;
  };
  using Json = nlohmann::json;
  const std::string G = byte_char(' ');
  Json vocab = Json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"}, {G, "t"}, {G + "t", "he"}, {"he", "ll"}, {"hell", "o"}};
  Json mj = Json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;
    mj.push_back(a + " " + b);
  }
  Json added = Json::array();
  for (const auto& [content, aid] : std::vector<std::pair<std::string, int>>{
           {"<|begin_of_text|>", 300}, {"<|end_of_text|>", 301}, {"<|eot_id|>", 302}}) {
    added.push_back({{"id", aid}, {"content", content}, {"single_word", false},
                     {"lstrip", false}, {"rstrip", false}, {"normalized", false},
                     {"special", true}});
  }
  const Json tokenizer = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern",
            {{"Regex",
              "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
              "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"},
           {"add_prefix_space", false},
           {"trim_offsets", true},
           {"use_regex", false}}}}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", mj}}},
  };
  Write("hf_bpe", "tokenizer.json", 1, tokenizer.dump());
}

void SafetensorsSeeds() {
  kvr::worker::LlamaConfig c;
  c.dim = 8;
  c.hidden_dim = 16;
  c.n_layers = 1;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.head_dim = 4;
  c.vocab_size = 16;
  c.seq_len = 32;
  c.tied_embeddings = false;
  auto w = kvr::worker::MakeRandomWeights(c);
  Check(w.status(), "random weights");
  const fs::path tmp = fs::temp_directory_path() / "kvr_make_seeds_hf";
  for (auto dtype : {kvr::DType::kF32, kvr::DType::kBf16}) {
    kvr::worker::HfWriteOptions o;
    o.dtype = dtype;
    Check(kvr::worker::WriteHfCheckpoint(**w, tmp.string(), o), "write hf");
    const std::string suffix = dtype == kvr::DType::kF32 ? "f32" : "bf16";
    Write("safetensors", "model-" + suffix + ".safetensors", 0,
          ReadFile(tmp / "model.safetensors"));
    Write("safetensors", "config-" + suffix + ".json", 1, ReadFile(tmp / "config.json"));
  }
  fs::remove_all(tmp);
}

void OpenAiSeeds() {
  // Byte 0: 0 = /v1/completions, 1 = /v1/chat/completions.
  const std::pair<uint8_t, const char*> bodies[] = {
      {0, R"({"model":"stories260K","prompt":"Once upon a time","max_tokens":16})"},
      {0, R"({"model":"m","prompt":[1,2,3,4],"max_tokens":8,"temperature":0.7,"top_p":0.9,)"
          R"("top_k":40,"seed":3,"stop":["\n","The end"],"stream":true,)"
          R"("stream_options":{"include_usage":true}})"},
      {0, R"({"model":"m","prompt":"x","kvr":{"mode":"retrieval","sinks":4,"window":64,)"
          R"("k":32,"budget":128}})"},
      {0, R"({"model":"m","prompt":"x","n":2,"logprobs":1})"},
      {0, R"({"model":"m","prompt":"x","max_tokens":"many","temperature":[1]})"},
      {1, R"({"model":"m","messages":[{"role":"system","content":"Be brief."},)"
          R"({"role":"user","content":"Tell me a story about a cat."}],)"
          R"("max_completion_tokens":32,"repetition_penalty":1.1})"},
      {1, R"({"model":"m","messages":[{"role":"user","content":[{"type":"text",)"
          R"("text":"hi"}]}],"tools":[]})"},
      {1, R"({"model":"m","messages":"not a list"})"},
      {0, R"({"model":"m","prompt":"\ud83d\ude00 \u00e9","n":[[[[1]]]]})"},
      {0, R"({"model":)"},
  };
  int i = 0;
  for (const auto& [route, body] : bodies) {
    Write("openai", "request-" + std::to_string(i++), route, body);
  }
}

// Real stores: a node with persistence given a sequence per index kind (one
// uploaded chunk, appended rows in the tail), dumped record by record in
// the store harness's format (key length u8 | key | value length u32 | value).
void StoreSeeds() {
  using namespace kvr::retrieval;  // NOLINT(build/namespaces)
  const fs::path tmp = fs::temp_directory_path() / "kvr_make_seeds_store";
  for (auto type : {kvr::index::IndexType::kFlat, kvr::index::IndexType::kIvf,
                    kvr::index::IndexType::kGraph}) {
    fs::remove_all(tmp);
    {
      auto store = ShardStore::Open(tmp.string());
      Check(store.status(), "store");
      NodeCoreOptions o;
      o.threads = 1;
      o.tail_capacity = 8;
      o.train_k = 4;
      o.persistence = store->get();
      auto core = NodeCore::Create(o);
      Check(core.status(), "core");
      SequenceSpec spec;
      spec.sequence_id = 3;
      spec.n_layers = 1;
      spec.n_heads = 2;
      spec.n_kv_heads = 1;
      spec.head_dim = 4;
      spec.index_type = type;
      Check((*core)->CreateSequence(spec), "create");
      const kvr::Matrix keys = Random(12, 4, 5), values = Random(12, 4, 6);
      ShardUpload up;
      up.key = ShardKey{3, 0, 0, 0};
      up.keys = keys.view();
      up.values = values.view();
      Check((*core)->UploadShard(up), "upload");
      AppendRequest a;
      a.sequence_id = 3;
      a.first_position = 12;
      a.keys = keys.view().rows_slice(0, 3);
      a.values = values.view().rows_slice(0, 3);
      Check((*core)->Append(a), "append");
    }
    rocksdb::DB* raw = nullptr;
    rocksdb::Options ro;
    ro.enable_blob_files = true;
    if (!rocksdb::DB::OpenForReadOnly(ro, tmp.string(), &raw).ok()) std::exit(1);
    std::unique_ptr<rocksdb::DB> db(raw);
    std::string records;
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      const rocksdb::Slice k = it->key(), v = it->value();
      records.push_back(static_cast<char>(k.size()));
      records.append(k.data(), k.size());
      const auto vlen = static_cast<uint32_t>(v.size());
      records += Bytes(vlen);
      records.append(v.data(), v.size());
    }
    // No mode byte: the whole input is records.
    fs::create_directories(g_corpus / "store");
    std::ofstream(g_corpus / "store" / (std::string(kvr::index::IndexTypeName(type)) + "-node"),
                  std::ios::binary)
        << records;
  }
  fs::remove_all(tmp);
}

// Op streams for the service harnesses (node_service_fuzzer.cc,
// worker_fuzzer.cc read them field by field; a byte < 0xF0 is a small value).
class Ops {
 public:
  Ops& B(std::initializer_list<int> bytes) {
    for (int b : bytes) s_.push_back(static_cast<char>(b));
    return *this;
  }
  Ops& Blob(const std::string& bytes) {
    B({static_cast<int>(bytes.size() & 0xFF), static_cast<int>(bytes.size() >> 8)});
    s_ += bytes;
    return *this;
  }
  const std::string& str() const { return s_; }

 private:
  std::string s_;
};

// Node ops, in the harness's field order. Dim index 0 = head_dim 8.
void NodeCreate(Ops& o, int id, int index_type, int dtype = 1) {
  o.B({kvr::fuzz::kNodeCreate, id, 1, 2, 1, 0, dtype, index_type, 0});
}
// Header fields then begin / part fields; train: 0 none, 1 topk, 2 queries.
void NodeHeader(Ops& o, int op, int id, int chunk, int first, int n_keys, int dtype, int train) {
  o.B({op, id, 0, 0, chunk, first, n_keys, 0, dtype, dtype, train});
  if (train == 1) o.B({n_keys, 8});
  if (train == 2) o.B({16});
  o.B({8, 7, 0});  // train_k, seed, header first
}
void NodeUpload(Ops& o, int id, int chunk, int first, int n_keys, int dtype, int train,
                int parts = 0, int tweak = 0) {
  NodeHeader(o, kvr::fuzz::kNodeUpload, id, chunk, first, n_keys, dtype, train);
  o.B({parts, tweak});
}
void NodeAppend(Ops& o, int id, int first, int rows) {
  o.B({kvr::fuzz::kNodeAppend, id, 0, 0, first, rows, 0, 3, 0, 0, 0, 0, 0});
}
void NodeAttend(Ops& o, int id, int k) {
  o.B({kvr::fuzz::kNodeAttend, id, 0, 2, 0, 5, 0, 0, k, 0, 0, 0, 0});
}

void NodeServiceSeeds() {
  using namespace kvr::fuzz;  // NOLINT(build/namespaces): the op codes
  for (int type : {1, 2, 3}) {  // graph, flat, IVF
    Ops o;
    NodeCreate(o, 0, type);
    NodeUpload(o, 0, 0, 0, 40, 1, 0);
    NodeAppend(o, 0, 40, 5);
    NodeAttend(o, 0, 8);
    o.B({kNodeList, 0, 0, kNodeStats, kNodeEndpoints, kNodeDrop, 0, kNodeStats});
    Write("node_service", "lifecycle-" + std::to_string(type), kNodeCreate, o.str().substr(1));
  }
  {  // bf16 / f16, training data of both kinds, two chunks, split parts
    Ops o;
    NodeCreate(o, 1, 1, 2);
    NodeUpload(o, 1, 0, 0, 40, 2, 1, 1);
    NodeUpload(o, 1, 1, 40, 40, 3, 2, 2);
    NodeAttend(o, 1, 4);
    NodeAppend(o, 1, 80, 20);
    NodeAttend(o, 1, 16);
    o.B({kNodeList, 1, kNodeDrop, 1});
    Write("node_service", "dtypes-training", kNodeCreate, o.str().substr(1));
  }
  {  // an open upload stream across an append, a drop and a re-create
    Ops o;
    NodeCreate(o, 2, 1);
    NodeHeader(o, kNodeUploadBegin, 2, 0, 0, 40, 1, 0);
    o.B({kNodeUploadPart, 1});
    NodeAppend(o, 2, 40, 3);
    o.B({kNodeDrop, 2});
    NodeCreate(o, 2, 2);
    o.B({kNodeUploadPart, 3, kNodeUploadEnd, kNodeStats});
    NodeAttend(o, 2, 1);
    Write("node_service", "upload-interleaved", kNodeCreate, o.str().substr(1));
  }
  {  // broken uploads: a short part, an extra byte, a second header, an empty part
    Ops o;
    NodeCreate(o, 3, 1);
    for (int tweak = 1; tweak <= 6; ++tweak) NodeUpload(o, 3, tweak, 0, 40, 1, 0, 0, tweak);
    o.B({kNodeStats});
    Write("node_service", "upload-broken", kNodeCreate, o.str().substr(1));
  }
  {  // calls without a deadline, unknown sequences, bad enums
    Ops o;
    o.B({0xC0 | kNodeCreate, 0, 1, 2, 1, 0, 1, 1, 0});
    o.B({kNodeCreate, 0, 1, 3, 2, 0, 0, 4, 0});
    NodeAttend(o, 3, 8);
    NodeAppend(o, 1, 0, 1);
    o.B({0xC0 | kNodeStats, 0xC0 | kNodeList, 1, 0xC0 | kNodeDrop, 0});
    Write("node_service", "refusals", kNodeCreate, o.str().substr(1));
  }
  {  // request protos as a client serializes them
    kvr::v1::CreateSequenceRequest create;
    kvr::v1::SequenceSpec* spec = create.mutable_spec();
    spec->set_sequence_id(9);
    spec->set_n_layers(1);
    spec->set_n_heads(2);
    spec->set_n_kv_heads(1);
    spec->set_head_dim(4);
    spec->set_value_dtype(kvr::v1::DTYPE_F32);
    spec->set_index_type(kvr::v1::INDEX_TYPE_FLAT);
    kvr::v1::UploadShardRequest header;
    kvr::v1::ShardHeader* h = header.mutable_header();
    h->mutable_key()->set_sequence_id(9);
    h->set_n_keys(2);
    h->set_head_dim(4);
    h->set_key_dtype(kvr::v1::DTYPE_F32);
    h->set_value_dtype(kvr::v1::DTYPE_F32);
    kvr::v1::UploadShardRequest data;
    const std::string eight(8 * sizeof(float), '\0');
    data.mutable_data()->set_keys(eight);
    data.mutable_data()->set_values(eight);
    kvr::v1::AttendRequest attend;
    attend.set_sequence_id(9);
    attend.mutable_queries()->set_dtype(kvr::v1::DTYPE_F32);
    attend.mutable_queries()->set_rows(2);
    attend.mutable_queries()->set_cols(4);
    attend.mutable_queries()->set_data(eight);
    attend.set_k(2);
    kvr::v1::ListShardsRequest list;
    list.set_sequence_id(9);
    kvr::v1::DropSequenceRequest drop;
    drop.set_sequence_id(9);
    Ops o;
    o.B({kNodeRaw, 0}).Blob(create.SerializeAsString());
    o.B({kNodeRaw, 1, 2}).Blob(header.SerializeAsString()).Blob(data.SerializeAsString());
    o.B({kNodeRaw, 3}).Blob(attend.SerializeAsString());
    o.B({kNodeRaw, 5}).Blob(list.SerializeAsString());
    o.B({kNodeRaw, 6}).Blob("");
    o.B({kNodeRaw, 7}).Blob("");
    o.B({kNodeRaw, 4}).Blob(drop.SerializeAsString());
    Write("node_service", "raw-protos", kNodeRaw, o.str().substr(1));
  }
  {  // the second node holds a sequence; the node under test syncs it and is read back
    Ops o;
    o.B({kNodeOnSource});
    NodeCreate(o, 2, 2);
    o.B({kNodeOnSource});
    NodeUpload(o, 2, 0, 0, 40, 1, 0);
    o.B({kNodeOnSource});
    NodeAppend(o, 2, 40, 5);
    // SyncShards: spec fields as NodeCreate, source (0: the second node),
    // keep the spec, no shard list (all).
    o.B({kNodeSync, 2, 1, 2, 1, 0, 1, 2, 0, 0, 0});
    o.B({kNodeRead, 2, 0, 0, 0});  // ReadShards: all, no cursor, read to the end
    NodeAttend(o, 2, 8);
    // ReadShards of one chunk with a cursor (after_position 39, 40 index rows).
    o.B({kNodeRead, 2, 1, 1, 0, 0, 0, 39, 40, 0});
    o.B({kNodeRead, 2, 0, 0, 1});  // cancelled after the header
    o.B({kNodeSync, 2, 1, 2, 1, 0, 1, 2, 0, 0, 1, 2, 0, 0, 0});  // one listed shard again
    o.B({kNodeSync, 2, 1, 2, 1, 0, 1, 2, 6, 0, 0});  // from the node itself
    o.B({kNodeSync, 3, 1, 2, 1, 0, 1, 2, 7, 0, 0});  // from a closed port
    o.B({kNodeOnSource, kNodeRead, 2, 0, 0, 0, kNodeStats});
    Write("node_service", "sync-read", kNodeOnSource, o.str().substr(1));
  }
  {  // SyncShards and ReadShards requests as a client serializes them
    kvr::v1::SyncShardsRequest sync;
    kvr::v1::SequenceSpec* spec = sync.mutable_spec();
    spec->set_sequence_id(1);
    spec->set_n_layers(1);
    spec->set_n_heads(2);
    spec->set_n_kv_heads(1);
    spec->set_head_dim(8);
    spec->set_value_dtype(kvr::v1::DTYPE_F32);
    spec->set_index_type(kvr::v1::INDEX_TYPE_FLAT);
    sync.set_source_address("replaced by the harness");
    kvr::v1::ShardKey* key = sync.add_shards();
    key->set_sequence_id(1);
    kvr::v1::ReadShardsRequest read;
    read.set_sequence_id(1);
    kvr::v1::SyncCursor* cursor = read.add_cursors();
    cursor->set_after_position(-1);
    cursor->set_known_index_rows(-1);
    Ops o;
    o.B({kNodeOnSource});
    NodeCreate(o, 1, 2);
    o.B({kNodeOnSource});
    NodeUpload(o, 1, 0, 0, 40, 1, 0);
    o.B({kNodeRaw, 8}).Blob(sync.SerializeAsString()).B({0});  // source: the second node
    o.B({kNodeRaw, 9}).Blob(read.SerializeAsString());
    read.set_all(true);
    o.B({kNodeRaw, 9}).Blob(read.SerializeAsString());
    Write("node_service", "sync-raw", kNodeOnSource, o.str().substr(1));
  }
}

// Worker Generate from fields: text prompt, max_tokens, no stop strings,
// greedy, attention mode (0 default, 1 full, 2 retrieval), `aopt` flags.
void WorkerGenerate(Ops& o, int op, const std::string& text, int max_tokens, int mode,
                    std::initializer_list<int> attention = {0}) {
  o.B({op, 0}).Blob(text).B({0, max_tokens, 0, 0, 0, 0, mode}).B(attention);
}

void WorkerSeeds() {
  using namespace kvr::fuzz;  // NOLINT(build/namespaces): the op codes
  {
    Ops o;
    WorkerGenerate(o, kWorkerGenerate, "Once upon a time", 4, 0);
    o.B({kWorkerInfo, 1});
    Write("worker", "generate", kWorkerGenerate, o.str().substr(1));
  }
  {  // full attention; retrieval with sinks 2, window 4, top_k 3, chunk_tokens 8
    Ops o;
    WorkerGenerate(o, kWorkerGenerate, "Lily and Tom went to the park.", 3, 1);
    WorkerGenerate(o, kWorkerGenerate, "Once upon a time there was a little girl named Lily.",
                   4, 2, {1 | 2 | 4 | 16, 2, 4, 3, 8});
    Write("worker", "attention-modes", kWorkerGenerate, o.str().substr(1));
  }
  {  // cancelled after its first message, then a stop string and sampling
    Ops o;
    WorkerGenerate(o, kWorkerGenerateCancel, "The cat sat", 4, 2);
    o.B({kWorkerGenerate, 0}).Blob("Once upon a time").B({0, 4, 1}).Blob(" ");
    o.B({64, 10, 1 | 2 | 4, 60, 80, 42, 0, 0});
    Write("worker", "cancel-stop-sampling", kWorkerGenerateCancel, o.str().substr(1));
  }
  {
    Ops o;
    o.B({kWorkerTokenize}).Blob("Once upon a time, h\xc3\xa9llo").B({1});
    o.B({kWorkerDetokenize, 6, 1, 200, 50, 0, 239, 2});
    o.B({kWorkerInfo, 0, kWorkerInfo, 2, 1});
    Write("worker", "tokenize-detokenize-info", kWorkerTokenize, o.str().substr(1));
  }
  {  // request protos: token prompt, a refused attention option, raw calls
    kvr::v1::GenerateRequest tokens;
    for (int id : {1, 403, 407, 261, 378}) tokens.mutable_tokens()->add_ids(id);
    tokens.set_max_tokens(2);
    tokens.set_request_id("seed-1");
    kvr::v1::GenerateRequest window = tokens;
    window.mutable_attention()->set_window(16777216);
    kvr::v1::TokenizeRequest tok;
    tok.set_text("Once upon a time");
    tok.set_add_bos(true);
    kvr::v1::DetokenizeRequest detok;
    for (int id : {1, 403, 407, 511, 512}) detok.add_ids(id);
    Ops o;
    o.B({kWorkerGenerateRaw}).Blob(tokens.SerializeAsString()).B({0});
    o.B({kWorkerGenerateRaw}).Blob(window.SerializeAsString()).B({0});
    o.B({kWorkerRaw, 0}).Blob(tok.SerializeAsString());
    o.B({kWorkerRaw, 1}).Blob(detok.SerializeAsString());
    o.B({kWorkerRaw, 2}).Blob("");
    Write("worker", "raw-protos", kWorkerGenerateRaw, o.str().substr(1));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR MODELS_DIR\n", argv[0]);
    return 2;
  }
  GOOGLE_PROTOBUF_VERIFY_VERSION;
  g_corpus = argv[1];
  UcxSeeds();
  IndexSeeds();
  Llama2cSeeds();
  TokenizerSeeds(argv[2]);
  SafetensorsSeeds();
  OpenAiSeeds();
  StoreSeeds();
  NodeServiceSeeds();
  WorkerSeeds();
  std::printf("make_seeds: wrote seeds under %s\n", g_corpus.c_str());
  return 0;
}
