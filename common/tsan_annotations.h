// ThreadSanitizer happens-before annotations for hand-offs that TSan cannot
// see (docs/security.md "Sanitizers").
//
// Debian's gRPC and abseil are not built with -fsanitize=thread, so the
// ordering that gRPC's callback API guarantees (everything a thread did
// before Finish() / StartRead() / StartWrite() happens before the matching
// OnDone() / OnReadDone() / OnWriteDone() on a gRPC thread) goes through
// uninstrumented synchronization. KVR_TSAN_RELEASE(p) on the handing thread
// and KVR_TSAN_ACQUIRE(p) on the receiving thread, with the same address p
// (the reactor or call object), tell TSan about that one edge.
//
// Use them only where an API documents the ordering; never to quiet a report
// that is a real race (the pair adds an edge; it does not hide accesses).
// Both are no-ops unless the translation unit is compiled with
// -fsanitize=thread (gcc: __SANITIZE_THREAD__; clang: thread_sanitizer).

#ifndef KVR_COMMON_TSAN_ANNOTATIONS_H_
#define KVR_COMMON_TSAN_ANNOTATIONS_H_

#if defined(__SANITIZE_THREAD__)
#define KVR_TSAN_ENABLED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVR_TSAN_ENABLED 1
#endif
#endif

#ifdef KVR_TSAN_ENABLED
extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
// Everything this thread did so far happens before whatever a later
// KVR_TSAN_ACQUIRE(p) (same p) on any thread does after it.
#define KVR_TSAN_RELEASE(p) \
  __tsan_release(const_cast<void*>(static_cast<const volatile void*>(p)))
// The acquiring side of KVR_TSAN_RELEASE(p).
#define KVR_TSAN_ACQUIRE(p) \
  __tsan_acquire(const_cast<void*>(static_cast<const volatile void*>(p)))
#else
#define KVR_TSAN_RELEASE(p) static_cast<void>(p)
#define KVR_TSAN_ACQUIRE(p) static_cast<void>(p)
#endif

#endif  // KVR_COMMON_TSAN_ANNOTATIONS_H_
