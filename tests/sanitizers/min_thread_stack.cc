// Sanitizer builds only (KVR_SANITIZE=address|thread; the top-level
// CMakeLists.txt links this shared library into every executable there).
//
// Raises every explicitly requested thread stack to at least
// kMinThreadStackBytes. Why (docs/security.md "Sanitizers"): Debian's
// civetweb (the HTTP server under prometheus-cpp's Exposer, i.e. every
// /metrics endpoint) starts its threads with a compile-time 100 KiB stack
// (USE_STACK_SIZE=102400: `mov $0x19000,%esi` before each
// pthread_attr_setstacksize call in libcivetweb.so.1), and glibc carves the
// process's static TLS out of that same allocation. kvr_worker links
// libopenblas.so.0, whose static TLS is 60 KiB (PT_TLS memsz 0xf000), so its
// civetweb threads keep ~38 KiB of stack. That is enough for the
// uninstrumented serving path, but not for the sanitizers' larger frames:
// under ASan the /metrics thread overflowed into its guard page inside the
// vsnprintf interceptor (printf_common's `sub $0x888,%rsp`, rsp in the
// ---p page just below the 0x19000-byte stack mapping), reported as "SEGV on
// unknown address ... WRITE" in mg_printf. kvr_node, which does not link
// OpenBLAS, has ~100 KiB there and never crashed.
//
// Threads that ask for no size (the default 8 MiB, RLIMIT_STACK) are not
// affected; a request above the floor is passed through unchanged.

#include <dlfcn.h>
#include <pthread.h>

#include <cerrno>
#include <cstddef>

namespace {

// Comfortably above any sanitizer's frame growth on the civetweb path plus
// 60 KiB of TLS; stacks are reserved, not committed, so the cost is address
// space.
constexpr size_t kMinThreadStackBytes = size_t{1} << 20;

using SetStackSizeFn = int (*)(pthread_attr_t*, size_t);

// glibc's pthread_attr_setstacksize (the next definition after this one).
SetStackSizeFn RealSetStackSize() {
  static const SetStackSizeFn real =
      reinterpret_cast<SetStackSizeFn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  return real;
}

}  // namespace

// Interposes glibc's: same contract, with `size` raised to at least
// kMinThreadStackBytes. Returns ENOSYS if glibc's cannot be found (never on
// glibc).
extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  const SetStackSizeFn real = RealSetStackSize();
  if (real == nullptr) return ENOSYS;
  return real(attr, size < kMinThreadStackBytes ? kMinThreadStackBytes : size);
}
