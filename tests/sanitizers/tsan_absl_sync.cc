// TSan builds only (KVR_SANITIZE=thread; part of kvr_sanitizer_support,
// which the top-level CMakeLists.txt puts first on every executable's link
// line so that these definitions come before libabsl_synchronization's in
// the dynamic linker's search order).
//
// Makes the locking of Debian's absl::Mutex visible to ThreadSanitizer.
// Debian's abseil is not built with -fsanitize=thread, so its Mutex lock and
// unlock are plain atomics and futex calls that TSan never sees; gRPC (libgpr
// and libgrpc lock absl::Mutex for gpr_mu and grpc_core::Mutex) hands work
// between its threads under those mutexes, so every such hand-off looked like
// a race. Each function below calls abseil's own (found with
// dlsym(RTLD_NEXT)) and tells TSan what an instrumented abseil would: a lock
// acquires what the previous unlocks released; readers and writers are kept
// apart like TSan's own reader-writer locks (a reader acquires the writers'
// releases only; a writer acquires both). No access is hidden: this adds
// exactly the happens-before edges the mutex really provides.

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

#if defined(__SANITIZE_THREAD__)

// The mangled names below spell abseil's inline namespace.
#if !ABSL_OPTION_USE_INLINE_NAMESPACE
#error "tsan_absl_sync.cc expects abseil's inline namespace (Debian: absl::debian3)"
#endif
#define KVR_ABSL_NS_STR2(x) #x
#define KVR_ABSL_NS_STR(x) KVR_ABSL_NS_STR2(x)
static_assert(sizeof(KVR_ABSL_NS_STR(ABSL_OPTION_INLINE_NAMESPACE_NAME)) == sizeof("debian3"),
              "abseil's inline namespace is not debian3: update the mangled names");

extern "C" {
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}

namespace {

// The address writers release to; readers release to the next byte.
void* WriterClock(absl::Mutex* mu) { return mu; }
void* ReaderClock(absl::Mutex* mu) { return reinterpret_cast<char*>(mu) + 1; }

// KVR_TSAN_ABSL_SYNC=0 turns the annotations off (the locking itself is
// always abseil's), to see what TSan reports without them.
bool Enabled() {
  static const bool enabled = [] {
    const char* v = getenv("KVR_TSAN_ABSL_SYNC");
    return v == nullptr || v[0] != '0';
  }();
  return enabled;
}

void Acquire(void* clock) {
  if (Enabled()) __tsan_acquire(clock);
}
void Release(void* clock) {
  if (Enabled()) __tsan_release(clock);
}

void AcquireExclusive(absl::Mutex* mu) {
  Acquire(WriterClock(mu));
  Acquire(ReaderClock(mu));
}

// abseil's definition of `mangled` (the next one after this library's);
// aborts with the name when there is none.
template <typename Fn>
Fn Real(const char* mangled) {
  void* f = dlsym(RTLD_NEXT, mangled);
  if (f == nullptr) {
    // Not via stdio: this runs inside the locking of whoever called us.
    static const char kMsg[] = "kvr_sanitizer_support: abseil symbol not found\n";
    (void)!write(2, kMsg, sizeof(kMsg) - 1);
    std::abort();
  }
  return reinterpret_cast<Fn>(f);
}

using MutexFn = void (*)(absl::Mutex*);
using TryLockFn = bool (*)(absl::Mutex*);
using WaitFn = void (*)(absl::CondVar*, absl::Mutex*);
using WaitTimeoutFn = bool (*)(absl::CondVar*, absl::Mutex*, absl::Duration);
using WaitDeadlineFn = bool (*)(absl::CondVar*, absl::Mutex*, absl::Time);
using ReleaseFn = void (*)(absl::ReleasableMutexLock*);

}  // namespace

namespace absl {
ABSL_NAMESPACE_BEGIN

void Mutex::Lock() {
  static const MutexFn real = Real<MutexFn>("_ZN4absl7debian35Mutex4LockEv");
  real(this);
  AcquireExclusive(this);
}

void Mutex::Unlock() {
  static const MutexFn real = Real<MutexFn>("_ZN4absl7debian35Mutex6UnlockEv");
  Release(WriterClock(this));
  real(this);
}

bool Mutex::TryLock() {
  static const TryLockFn real = Real<TryLockFn>("_ZN4absl7debian35Mutex7TryLockEv");
  const bool locked = real(this);
  if (locked) AcquireExclusive(this);
  return locked;
}

void Mutex::ReaderLock() {
  static const MutexFn real = Real<MutexFn>("_ZN4absl7debian35Mutex10ReaderLockEv");
  real(this);
  Acquire(WriterClock(this));
}

void Mutex::ReaderUnlock() {
  static const MutexFn real = Real<MutexFn>("_ZN4absl7debian35Mutex12ReaderUnlockEv");
  Release(ReaderClock(this));
  real(this);
}

// Await* unlock the mutex while the condition is false and hold it again
// when they return (also when they time out).
void Mutex::Await(const Condition& cond) {
  using Fn = void (*)(Mutex*, const Condition&);
  static const Fn real = Real<Fn>("_ZN4absl7debian35Mutex5AwaitERKNS0_9ConditionE");
  Release(WriterClock(this));
  real(this, cond);
  AcquireExclusive(this);
}

bool Mutex::AwaitWithTimeout(const Condition& cond, absl::Duration timeout) {
  using Fn = bool (*)(Mutex*, const Condition&, absl::Duration);
  static const Fn real =
      Real<Fn>("_ZN4absl7debian35Mutex16AwaitWithTimeoutERKNS0_9ConditionENS0_8DurationE");
  Release(WriterClock(this));
  const bool met = real(this, cond, timeout);
  AcquireExclusive(this);
  return met;
}

bool Mutex::AwaitWithDeadline(const Condition& cond, absl::Time deadline) {
  using Fn = bool (*)(Mutex*, const Condition&, absl::Time);
  static const Fn real =
      Real<Fn>("_ZN4absl7debian35Mutex17AwaitWithDeadlineERKNS0_9ConditionENS0_4TimeE");
  Release(WriterClock(this));
  const bool met = real(this, cond, deadline);
  AcquireExclusive(this);
  return met;
}

void Mutex::LockWhen(const Condition& cond) {
  using Fn = void (*)(Mutex*, const Condition&);
  static const Fn real = Real<Fn>("_ZN4absl7debian35Mutex8LockWhenERKNS0_9ConditionE");
  real(this, cond);
  AcquireExclusive(this);
}

// A wait unlocks `mu` and locks it again before it returns.
void CondVar::Wait(Mutex* mu) {
  static const WaitFn real = Real<WaitFn>("_ZN4absl7debian37CondVar4WaitEPNS0_5MutexE");
  Release(WriterClock(mu));
  real(this, mu);
  AcquireExclusive(mu);
}

bool CondVar::WaitWithTimeout(Mutex* mu, absl::Duration timeout) {
  static const WaitTimeoutFn real = Real<WaitTimeoutFn>(
      "_ZN4absl7debian37CondVar15WaitWithTimeoutEPNS0_5MutexENS0_8DurationE");
  Release(WriterClock(mu));
  const bool timed_out = real(this, mu, timeout);
  AcquireExclusive(mu);
  return timed_out;
}

bool CondVar::WaitWithDeadline(Mutex* mu, absl::Time deadline) {
  static const WaitDeadlineFn real = Real<WaitDeadlineFn>(
      "_ZN4absl7debian37CondVar16WaitWithDeadlineEPNS0_5MutexENS0_4TimeE");
  Release(WriterClock(mu));
  const bool timed_out = real(this, mu, deadline);
  AcquireExclusive(mu);
  return timed_out;
}

ABSL_NAMESPACE_END
}  // namespace absl

#endif  // __SANITIZE_THREAD__
