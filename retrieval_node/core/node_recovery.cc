// NodeCore::Recover: rebuilding the node from its ShardPersistence at
// startup, every recovered head checked against its sequence's spec.
#include <algorithm>
#include <cstdio>
#include <span>
#include <string>
#include <utility>

#include "retrieval_node/core/node_core.h"
#include "retrieval_node/core/node_state.h"
#include "retrieval_node/index/flat_index.h"

namespace kvr::retrieval {

absl::Status NodeCore::Recover() {
  if (options_.persistence == nullptr) {
    return absl::FailedPreconditionError("Recover: the node has no persistence");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!sequences_.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "Recover: the node already holds ", sequences_.size(), " sequences"));
    }
  }
  std::shared_ptr<Sequence> current;
  const auto on_sequence = [&](const SequenceSpec& spec,
                               const SequenceOwner& owner) -> absl::Status {
    const absl::Status valid = internal::ValidateSpec(spec);
    if (!valid.ok()) {
      return absl::DataLossError(absl::StrCat("recovery: sequence ", spec.sequence_id,
                                              ": stored spec is invalid: ", valid.message()));
    }
    current = NewSequence(spec);
    current->owner = owner;
    std::lock_guard<std::mutex> lock(mu_);
    if (!sequences_.emplace(spec.sequence_id, current).second) {
      return absl::DataLossError(
          absl::StrCat("recovery: sequence ", spec.sequence_id, " stored twice"));
    }
    return absl::OkStatus();
  };
  const auto on_head = [&](uint64_t sequence_id, RecoveredHead head) -> absl::Status {
    if (current == nullptr || current->spec.sequence_id != sequence_id) {
      return absl::DataLossError(absl::StrCat("recovery: sequence ", sequence_id,
                                              ": shards without a stored spec"));
    }
    std::unique_lock<std::shared_mutex> lock(current->mu);
    KVR_RETURN_IF_ERROR(InstallHead(current.get(), std::move(head)));
    const int64_t budget = options_.memory_budget_bytes;
    if (options_.recovery_quarantine && budget > 0 && MemoryUsedBytes() > budget) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "recovery: sequence ", sequence_id, " does not fit memory_budget_bytes ", budget,
          " (", MemoryUsedBytes(), " bytes with it)"));
    }
    return absl::OkStatus();
  };
  // Every recovered lease starts again now (the owners had no way to renew
  // while the node was down).
  const auto restart_leases = [&] {
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, seq] : sequences_) {
      if (!seq->owner.lease_owner.empty()) lease_renewed_[seq->owner.lease_owner] = now;
    }
  };
  if (!options_.recovery_quarantine) {
    const absl::Status st = options_.persistence->Recover(on_sequence, on_head);
    restart_leases();
    return st;
  }
  const auto on_bad = [&](uint64_t sequence_id, const absl::Status& why) {
    if (current != nullptr && current->spec.sequence_id == sequence_id) {
      std::lock_guard<std::mutex> lock(mu_);
      quarantined_capability_[sequence_id] = current->owner.capability_sha256;
    }
    if (current != nullptr && current->spec.sequence_id == sequence_id) current.reset();
    Quarantine(sequence_id, why);
  };
  const absl::Status st =
      options_.persistence->RecoverSkippingBadSequences(on_sequence, on_head, on_bad);
  restart_leases();
  return st;
}

void NodeCore::Quarantine(uint64_t sequence_id, const absl::Status& why) {
  std::shared_ptr<Sequence> seq;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = sequences_.find(sequence_id); it != sequences_.end()) {
      seq = std::move(it->second);
      sequences_.erase(it);
    }
    quarantined_[sequence_id] = why.ToString();
  }
  if (seq != nullptr) {
    std::unique_lock<std::shared_mutex> lock(seq->mu);
    seq->dropped = true;
    int64_t bytes = 0;
    for (const auto& h : seq->heads) bytes += h->accounted_bytes;
    memory_used_.fetch_sub(bytes, std::memory_order_relaxed);
  }
  std::fprintf(stderr,
               "kvr_node: QUARANTINED sequence %llu at recovery: %s -- not served; its records "
               "stay in the data dir (DropSequence %llu deletes them)\n",
               static_cast<unsigned long long>(sequence_id), why.ToString().c_str(),
               static_cast<unsigned long long>(sequence_id));
}

std::vector<std::pair<uint64_t, std::string>> NodeCore::QuarantinedSequences() {
  std::lock_guard<std::mutex> lock(mu_);
  return {quarantined_.begin(), quarantined_.end()};
}

absl::Status NodeCore::InstallHead(Sequence* seq, RecoveredHead recovered) {
  const SequenceSpec& spec = seq->spec;
  const size_t d = static_cast<size_t>(spec.head_dim);
  const std::string where =
      absl::StrCat("(seq ", spec.sequence_id, ", layer ", recovered.layer, ", kv head ",
                   recovered.kv_head, ")");
  const auto loss = [&](const std::string& what, absl::string_view message) {
    return absl::DataLossError(absl::StrCat("recovery: ", what, ": ", message));
  };
  const absl::Status in_range = internal::CheckHead(spec, recovered.layer, recovered.kv_head);
  if (!in_range.ok()) return loss(where, in_range.message());
  HeadState& head = seq->head(recovered.layer, recovered.kv_head);
  if (!head.chunks.empty() || head.tail != nullptr) return loss(where, "stored twice");
  int64_t last = -1;
  const auto check_positions = [&](std::span<const int64_t> positions,
                                   const std::string& what) -> absl::Status {
    for (int64_t p : positions) {
      if (p <= last) {
        return loss(what, absl::StrCat("position ", p, " not after ", last));
      }
      last = p;
    }
    return absl::OkStatus();
  };
  for (RecoveredChunk& rc : recovered.chunks) {
    const std::string shard =
        absl::StrCat("shard ", ShardKey{spec.sequence_id, recovered.layer, recovered.kv_head,
                                        rc.chunk}.DebugString());
    if (!head.chunks.empty() && rc.chunk <= head.chunks.back().chunk) {
      return loss(shard, absl::StrCat("chunk not after chunk ", head.chunks.back().chunk));
    }
    Chunk chunk;
    chunk.chunk = rc.chunk;
    if (rc.index != nullptr) {
      const size_t n = rc.index->size();
      if (rc.index->dim() != d) {
        return loss(shard, absl::StrCat("index dim ", rc.index->dim(), " != head_dim ", d));
      }
      if (rc.values.rows() != n || rc.values.cols() != d ||
          rc.values.dtype() != spec.value_dtype || rc.positions.size() != n) {
        return loss(shard, absl::StrCat("index holds ", n, " keys but the values are ",
                                        rc.values.rows(), " x ", rc.values.cols(), " ",
                                        std::string(DTypeName(rc.values.dtype())), " with ",
                                        rc.positions.size(), " positions"));
      }
      KVR_RETURN_IF_ERROR(check_positions(rc.positions, shard));
      chunk.index = std::move(rc.index);
      chunk.values = std::move(rc.values);
      chunk.positions = std::move(rc.positions);
    } else if (rc.values.rows() != 0 || !rc.positions.empty()) {
      return loss(shard, "values without an index");
    }
    head.chunks.push_back(std::move(chunk));
  }
  const size_t tail_rows = recovered.tail_positions.size();
  if (tail_rows > 0) {
    const std::string tail = absl::StrCat("tail of ", where);
    if (head.chunks.empty()) return loss(tail, "tail without a chunk");
    if (recovered.tail_keys.rows != tail_rows || recovered.tail_keys.cols != d ||
        recovered.tail_values.rows() != tail_rows || recovered.tail_values.cols() != d ||
        recovered.tail_values.dtype() != spec.value_dtype) {
      return loss(tail, absl::StrCat(tail_rows, " positions but keys ", recovered.tail_keys.rows,
                                     " x ", recovered.tail_keys.cols, " and values ",
                                     recovered.tail_values.rows(), " x ",
                                     recovered.tail_values.cols()));
    }
    KVR_RETURN_IF_ERROR(check_positions(recovered.tail_positions, tail));
    KVR_ASSIGN_OR_RETURN(head.tail, index::FlatIndex::Create(d));
    head.tail->Reserve(std::max(options_.tail_capacity, tail_rows));
    const absl::Status added = head.tail->Add(recovered.tail_keys.view());
    if (!added.ok()) return loss(tail, added.message());
    head.tail_values = std::move(recovered.tail_values);
    head.tail_positions = std::move(recovered.tail_positions);
  }
  if (recovered.last_position != last) {
    return loss(where, absl::StrCat("stored last position ", recovered.last_position,
                                    " but the highest position held is ", last));
  }
  head.last_position = last;
  SettleMemory(&head, 0);
  return absl::OkStatus();
}

}  // namespace kvr::retrieval
