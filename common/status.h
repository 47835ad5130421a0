// Error-handling helpers shared by every kvr layer.
//
// Fallible functions return absl::Status / absl::StatusOr<T>. KVR_CHECK is for
// broken invariants (programmer errors) only and stays on in release builds.
#pragma once

#include <cstdio>
#include <cstdlib>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define KVR_STATUS_CONCAT_INNER_(a, b) a##b
#define KVR_STATUS_CONCAT_(a, b) KVR_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function if `expr` (an absl::Status) is not OK.
#define KVR_RETURN_IF_ERROR(expr)                                  \
  do {                                                             \
    ::absl::Status kvr_status_ = (expr);                           \
    if (!kvr_status_.ok()) return kvr_status_;                     \
  } while (0)

// `KVR_ASSIGN_OR_RETURN(auto x, F());` declares/assigns the value of a
// StatusOr or returns its error from the enclosing function.
#define KVR_ASSIGN_OR_RETURN(lhs, expr) \
  KVR_ASSIGN_OR_RETURN_IMPL_(KVR_STATUS_CONCAT_(kvr_statusor_, __LINE__), lhs, expr)
#define KVR_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return std::move(tmp).status();   \
  lhs = std::move(tmp).value()

namespace kvr::internal {
[[noreturn]] inline void CheckFailed(const char* file, int line, const char* cond,
                                     const char* msg) {
  std::fprintf(stderr, "KVR_CHECK failed at %s:%d: %s %s\n", file, line, cond, msg);
  std::fflush(stderr);
  std::abort();
}
}  // namespace kvr::internal

// Aborts with a message when an internal invariant does not hold.
#define KVR_CHECK(cond)                                                          \
  do {                                                                           \
    if (!(cond)) ::kvr::internal::CheckFailed(__FILE__, __LINE__, #cond, ""); \
  } while (0)
#define KVR_CHECK_MSG(cond, msg)                                                     \
  do {                                                                               \
    if (!(cond)) ::kvr::internal::CheckFailed(__FILE__, __LINE__, #cond, (msg)); \
  } while (0)
