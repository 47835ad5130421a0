// Fuzzes every index deserializer: index::LoadIndex (flat, IVF, graph,
// flat_sq8, pca_sq8 and calibrated blobs inside the common/serialize.h envelope) and, on what
// loads, a search.
// Input: byte 0 picks the mode:
//  * even: the rest is a whole blob (envelope fuzzing: magic, lengths, crc);
//  * odd: the rest is an index payload, sealed with a valid checksum as kind
//    (byte 0 >> 1) % 6 + 1 (flat / IVF / graph / calibrated / flat_sq8 / pca_sq8)
//    and version byte 1 (so the fuzzer reaches each loader's own checks
//    instead of the crc).
// A loaded index must search without a crash (k = min(size, 4)).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <vector>

#include "common/serialize.h"
#include "common/tensor.h"
#include "retrieval_node/index/index.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  std::span<const uint8_t> rest(data + 2, size - 2);
  std::vector<uint8_t> sealed;
  std::span<const uint8_t> blob = rest;
  if ((data[0] & 1) != 0) {
    const uint32_t kind = static_cast<uint32_t>((data[0] >> 1) % 6) + 1;
    sealed = kvr::SealBlob(kind, data[1], rest);
    blob = sealed;
  }
  absl::StatusOr<std::unique_ptr<kvr::index::KeyIndex>> index = kvr::index::LoadIndex(blob);
  if (!index.ok()) return 0;
  const kvr::index::KeyIndex& idx = **index;
  if (idx.size() == 0 || idx.dim() == 0 || idx.dim() > kvr::index::kMaxDim) return 0;
  kvr::Matrix query(1, idx.dim());
  for (size_t i = 0; i < idx.dim(); ++i) query.data[i] = (i % 2 == 0) ? 0.5f : -0.25f;
  kvr::index::SearchParams params;
  params.k = static_cast<int>(std::min<size_t>(idx.size(), 4));
  std::vector<int64_t> ids(params.k);
  std::vector<float> scores(params.k);
  const absl::Status st = idx.Search(query.view(), params, ids, scores);
  if (st.ok()) {
    for (int64_t id : ids) {
      if (id < -1 || id >= static_cast<int64_t>(idx.size())) std::abort();  // out-of-range id
    }
  }
  std::vector<uint8_t> again;
  (void)idx.Serialize(&again);
  return 0;
}
