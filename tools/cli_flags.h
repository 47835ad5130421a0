// Flag parsing for the `kvr` subcommands (generate, client, cluster): each
// command names its flags with a handler per flag, and errors name the flag
// and its limit ("--max_tokens: -1 outside [0, 1048576]").
//
// Accepted forms: --name VALUE, --name=VALUE, and, for flags registered as
// booleans, a bare --name (true) or --name=true|false. --help / -h stop
// parsing and set *help.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

namespace kvr::cli {

// Called with the flag's name (without "--") and its value.
using FlagHandler = std::function<absl::Status(std::string_view name, const std::string& value)>;

struct FlagSpec {
  FlagHandler handler;
  bool boolean = false;  // may be given without a value (then "true")
};

using FlagTable = std::map<std::string, FlagSpec, std::less<>>;

// Runs the handler of every flag in `args` in order. `command` is named in
// the unknown-flag error ("see kvr <command> --help").
absl::Status ParseFlags(const std::vector<std::string>& args, const FlagTable& flags,
                        std::string_view command, bool* help);

// Value parsers; the error names --flag and the value or limit.
absl::Status ParseInt(std::string_view flag, const std::string& value, int64_t lo, int64_t hi,
                      int64_t* out);
absl::Status ParseFloat(std::string_view flag, const std::string& value, float* out);
absl::Status ParseDouble(std::string_view flag, const std::string& value, double lo, double hi,
                         double* out);
absl::Status ParseBool(std::string_view flag, const std::string& value, bool* out);

// Handlers storing into a variable that outlives the parse.
template <typename T>
FlagSpec IntFlag(int64_t lo, int64_t hi, T* field) {
  return {[=](std::string_view name, const std::string& v) -> absl::Status {
    int64_t x = 0;
    absl::Status s = ParseInt(name, v, lo, hi, &x);
    if (s.ok()) *field = static_cast<T>(x);
    return s;
  }};
}
FlagSpec FloatFlag(float* field);
FlagSpec StringFlag(std::string* field);
FlagSpec BoolFlag(bool* field);

}  // namespace kvr::cli
