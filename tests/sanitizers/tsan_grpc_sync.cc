// TSan builds only (KVR_SANITIZE=thread; part of kvr_sanitizer_support, first
// in every executable's search order, so these definitions come before
// libgrpc's).
//
// Makes gRPC's batch -> completion ordering visible to ThreadSanitizer.
// gRPC guarantees that what a thread did before grpc_call_start_batch(...,
// tag) happens before the batch's completion event for `tag` is returned by
// grpc_completion_queue_next / _pluck on whichever thread polls the queue;
// the callback API (Finish, StartRead, StartWrite and their On*Done
// reactions, the unary callback handler) is built on exactly that: the
// CallOpSet's ops are filled in by the caller of StartWrite/Finish, and the
// gRPC thread that dequeues the tag finalizes them and runs the reaction.
// Inside Debian's uninstrumented libgrpc that edge goes through lock-free
// queues TSan cannot see, so every such hand-off (for example
// CallOpSet::FillOps on the worker's scheduler thread vs
// CallOpSet::FinalizeResult on a gRPC thread) was reported as a race.
// libgrpc++ calls both functions through the PLT, so defining them here adds
// the edge: release on the tag before the batch starts, acquire on it when
// its completion is dequeued. No access is hidden.

#if defined(__SANITIZE_THREAD__) && __has_include(<grpc/grpc.h>)

#include <dlfcn.h>
#include <grpc/grpc.h>
#include <unistd.h>

#include <cstdlib>

extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}

namespace {

// KVR_TSAN_GRPC_SYNC=0 turns the annotations off (to see the reports
// without them); the gRPC calls themselves are unchanged.
bool Enabled() {
  static const bool enabled = [] {
    const char* v = getenv("KVR_TSAN_GRPC_SYNC");
    return v == nullptr || v[0] != '0';
  }();
  return enabled;
}

// libgrpc's definition of `name`; aborts when there is none.
template <typename Fn>
Fn Real(const char* name) {
  void* f = dlsym(RTLD_NEXT, name);
  if (f == nullptr) {
    static const char kMsg[] = "kvr_sanitizer_support: libgrpc symbol not found\n";
    (void)!write(2, kMsg, sizeof(kMsg) - 1);
    std::abort();
  }
  return reinterpret_cast<Fn>(f);
}

using StartBatchFn = grpc_call_error (*)(grpc_call*, const grpc_op*, size_t, void*, void*);
using NextFn = grpc_event (*)(grpc_completion_queue*, gpr_timespec, void*);
using PluckFn = grpc_event (*)(grpc_completion_queue*, void*, gpr_timespec, void*);

}  // namespace

extern "C" grpc_call_error grpc_call_start_batch(grpc_call* call, const grpc_op* ops, size_t nops,
                                                 void* tag, void* reserved) {
  static const StartBatchFn real = Real<StartBatchFn>("grpc_call_start_batch");
  if (Enabled() && tag != nullptr) __tsan_release(tag);
  return real(call, ops, nops, tag, reserved);
}

extern "C" grpc_event grpc_completion_queue_next(grpc_completion_queue* cq, gpr_timespec deadline,
                                                 void* reserved) {
  static const NextFn real = Real<NextFn>("grpc_completion_queue_next");
  const grpc_event event = real(cq, deadline, reserved);
  if (Enabled() && event.type == GRPC_OP_COMPLETE && event.tag != nullptr) {
    __tsan_acquire(event.tag);
  }
  return event;
}

extern "C" grpc_event grpc_completion_queue_pluck(grpc_completion_queue* cq, void* tag,
                                                  gpr_timespec deadline, void* reserved) {
  static const PluckFn real = Real<PluckFn>("grpc_completion_queue_pluck");
  const grpc_event event = real(cq, tag, deadline, reserved);
  if (Enabled() && event.type == GRPC_OP_COMPLETE && event.tag != nullptr) {
    __tsan_acquire(event.tag);
  }
  return event;
}

#endif  // __SANITIZE_THREAD__ && <grpc/grpc.h>
