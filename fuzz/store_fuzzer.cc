// Fuzzes the node's RocksDB record decoding and recovery
// (retrieval_node/store/shard_store.h + NodeCore::Recover): the input is a
// list of RocksDB records, each `key length u8 | key | value length u32 LE
// | value`, written into a fresh database; then ShardStore::Open and
// NodeCore::Recover over it, as kvr_node does at startup. Any record set
// must give a status (DataLoss / FailedPrecondition ...), never a crash or
// an unbounded allocation. Seeds are real stores (make_seeds).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <unistd.h>

#include "retrieval_node/core/node_core.h"
#include "retrieval_node/store/shard_store.h"
#include "rocksdb/db.h"
#include "rocksdb/write_batch.h"

namespace {

// One scratch database per process, under /dev/shm when there is one.
const std::string& ScratchDir() {
  static const std::string dir = [] {
    const std::string base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : "/tmp";
    return base + "/kvr_fuzz_store_" + std::to_string(getpid());
  }();
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string& dir = ScratchDir();
  std::filesystem::remove_all(dir);
  {
    rocksdb::Options o;
    o.create_if_missing = true;
    rocksdb::DB* raw = nullptr;
    if (!rocksdb::DB::Open(o, dir, &raw).ok()) std::abort();
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::WriteBatch batch;
    size_t at = 0;
    while (at < size) {
      const size_t klen = data[at++];
      if (size - at < klen + 4) break;
      const std::string key(reinterpret_cast<const char*>(data + at), klen);
      at += klen;
      uint32_t vlen = 0;
      std::memcpy(&vlen, data + at, 4);
      at += 4;
      if (vlen > size - at) vlen = static_cast<uint32_t>(size - at);
      batch.Put(key, rocksdb::Slice(reinterpret_cast<const char*>(data + at), vlen));
      at += vlen;
    }
    if (!db->Write(rocksdb::WriteOptions(), &batch).ok()) std::abort();
  }
  kvr::retrieval::ShardStoreOptions so;
  so.sync = false;
  so.group_commit = false;
  auto store = kvr::retrieval::ShardStore::Open(dir, so);
  if (store.ok()) {
    kvr::retrieval::NodeCoreOptions no;
    no.threads = 1;
    no.persistence = store->get();
    auto core = kvr::retrieval::NodeCore::Create(no);
    if (core.ok()) (void)(*core)->Recover();
  }
  return 0;
}
