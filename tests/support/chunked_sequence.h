// Loads one sequence of seeded random chunks plus an appended tail onto
// several retrieval clients alike (attend_batch_test, attend_parallel_test):
// for every (layer, kv head) `chunks` chunks of `chunk_keys` keys uploaded
// (the index is built by each node) and `appended` keys appended after them.
// Keys are RandomMatrix(.., seed, 0.5) and values RandomMatrix(.., seed +
// 500 / + 8) with seed = seed_base + layer * 100 + kv_head * 10 (+ chunk, or
// + 7 for the tail), so every client holds bit-identical data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "retrieval_node/client/retrieval_client.h"
#include "tests/support/test_data.h"

namespace kvr::test_support {

// Creates `spec` (with `capability`) on every client and fills it as above;
// fails the current test (ASSERT) on any error.
inline void LoadChunkedSequence(const std::vector<retrieval::RetrievalClient*>& clients,
                                const retrieval::SequenceSpec& spec, const std::string& capability,
                                uint32_t seed_base, int chunks, int chunk_keys, int appended) {
  const size_t d = static_cast<size_t>(spec.head_dim);
  for (retrieval::RetrievalClient* c : clients) {
    const absl::Status st = c->CreateSequence(spec, capability);
    ASSERT_TRUE(st.ok()) << st;
  }
  for (int layer = 0; layer < spec.n_layers; ++layer) {
    for (int g = 0; g < spec.n_kv_heads; ++g) {
      const uint32_t seed = seed_base + static_cast<uint32_t>(layer * 100 + g * 10);
      for (int c = 0; c < chunks; ++c) {
        const Matrix keys = RandomMatrix(static_cast<size_t>(chunk_keys), d, seed + c, 0.5f);
        const Matrix values = RandomMatrix(static_cast<size_t>(chunk_keys), d, seed + c + 500);
        retrieval::ShardUpload up;
        up.key = retrieval::ShardKey{spec.sequence_id, layer, g, c};
        up.first_position = int64_t{c} * chunk_keys;
        up.keys = keys.view();
        up.values = values.view();
        up.capability = capability;
        for (retrieval::RetrievalClient* client : clients) {
          const absl::Status st = client->UploadShard(up);
          ASSERT_TRUE(st.ok()) << st;
        }
      }
      const Matrix keys = RandomMatrix(static_cast<size_t>(appended), d, seed + 7, 0.5f);
      const Matrix values = RandomMatrix(static_cast<size_t>(appended), d, seed + 8);
      retrieval::AppendRequest a;
      a.sequence_id = spec.sequence_id;
      a.layer = layer;
      a.kv_head = g;
      a.first_position = int64_t{chunks} * chunk_keys;
      a.keys = keys.view();
      a.values = values.view();
      a.capability = capability;
      for (retrieval::RetrievalClient* client : clients) {
        const absl::Status st = client->Append(a);
        ASSERT_TRUE(st.ok()) << st;
      }
    }
  }
}

}  // namespace kvr::test_support
