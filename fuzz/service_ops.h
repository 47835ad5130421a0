// The op codes of the service harnesses' input streams (node_service_fuzzer.cc,
// worker_fuzzer.cc), shared with make_seeds.cc, which writes their seeds.
#pragma once

#include <cstdint>

namespace kvr::fuzz {

// Op codes of the node_service harness (byte & 0x0F; 0xC0 set = the call
// carries no deadline). make_seeds writes its seeds with these.
enum NodeOp : uint8_t {
  kNodeCreate = 0,       // CreateSequence from fields
  kNodeUpload = 1,       // a whole UploadShard stream (header, 1-3 data parts, close)
  kNodeUploadBegin = 2,  // opens a stream and sends its header (one open at a time)
  kNodeUploadPart = 3,   // a data part on the open stream
  kNodeUploadEnd = 4,    // closes the open stream and reads the reply
  kNodeAppend = 5,
  kNodeAttend = 6,
  kNodeDrop = 7,
  kNodeList = 8,
  kNodeStats = 9,
  kNodeEndpoints = 10,
  kNodeRaw = 11,  // a byte picks the RPC, then blobs parsed as its request protos
  kNodeSync = 12,      // SyncShards from fields (source: the second node, itself, a closed port)
  kNodeRead = 13,      // ReadShards from fields, read to the end or cancelled after a message
  kNodeOnSource = 14,  // the next op goes to the second node (SyncShards' source)
  kNodeOps = 15,
};

// Op codes of the worker harness (byte % kWorkerOps).
enum WorkerOp : uint8_t {
  kWorkerGenerate = 0,        // GenerateRequest from fields, read to the end
  kWorkerGenerateRaw = 1,     // a blob parsed as GenerateRequest
  kWorkerGenerateCancel = 2,  // from fields, cancelled after the first message
  kWorkerTokenize = 3,
  kWorkerDetokenize = 4,
  kWorkerInfo = 5,
  kWorkerRaw = 6,  // a byte picks Tokenize / Detokenize / GetModelInfo, a blob its request
  kWorkerOps = 7,
};

}  // namespace kvr::fuzz
