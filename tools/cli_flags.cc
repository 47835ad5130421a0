#include "tools/cli_flags.h"

#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace kvr::cli {
namespace {

// `v` into *out when lo <= v <= hi, else "--flag: v outside [lo, hi]".
template <typename T>
absl::Status StoreInRange(std::string_view flag, T v, T lo, T hi, T* out) {
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", std::string(flag), ": ", v, " outside [", lo, ", ", hi, "]"));
  }
  *out = v;
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseFlags(const std::vector<std::string>& args, const FlagTable& flags,
                        std::string_view command, bool* help) {
  for (size_t i = 0; i < args.size(); ++i) {
    std::string_view a = args[i];
    if (a == "--help" || a == "-h" || a == "--helpfull") {
      *help = true;
      return absl::OkStatus();
    }
    if (a.substr(0, 2) != "--") {
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument \"", std::string(a),
                                                     "\" (flags start with --)"));
    }
    a.remove_prefix(2);
    std::string name(a), value;
    bool has_value = false;
    if (const size_t eq = a.find('='); eq != std::string_view::npos) {
      name = std::string(a.substr(0, eq));
      value = std::string(a.substr(eq + 1));
      has_value = true;
    }
    auto it = flags.find(name);
    if (it == flags.end()) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", name, " (see kvr ",
                                                     std::string(command), " --help)"));
    }
    if (!has_value) {
      if (it->second.boolean) {
        value = "true";
      } else if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      } else {
        value = args[++i];
      }
    }
    if (absl::Status s = it->second.handler(name, value); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status ParseInt(std::string_view flag, const std::string& value, int64_t lo, int64_t hi,
                      int64_t* out) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(value, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", std::string(flag), ": \"", value, "\" is not an integer"));
  }
  return StoreInRange(flag, v, lo, hi, out);
}

absl::Status ParseFloat(std::string_view flag, const std::string& value, float* out) {
  if (!absl::SimpleAtof(value, out)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", std::string(flag), ": \"", value, "\" is not a number"));
  }
  return absl::OkStatus();
}

absl::Status ParseDouble(std::string_view flag, const std::string& value, double lo, double hi,
                         double* out) {
  double v = 0;
  if (!absl::SimpleAtod(value, &v) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", std::string(flag), ": \"", value, "\" is not a finite number"));
  }
  return StoreInRange(flag, v, lo, hi, out);
}

absl::Status ParseBool(std::string_view flag, const std::string& value, bool* out) {
  if (value == "true" || value == "1" || value == "yes") {
    *out = true;
  } else if (value == "false" || value == "0" || value == "no") {
    *out = false;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--", std::string(flag), ": \"", value, "\" is not true or false"));
  }
  return absl::OkStatus();
}

FlagSpec FloatFlag(float* field) {
  return {[=](std::string_view name, const std::string& v) { return ParseFloat(name, v, field); }};
}

FlagSpec StringFlag(std::string* field) {
  return {[=](std::string_view, const std::string& v) {
    *field = v;
    return absl::OkStatus();
  }};
}

FlagSpec BoolFlag(bool* field) {
  return {[=](std::string_view name, const std::string& v) { return ParseBool(name, v, field); },
          /*boolean=*/true};
}

}  // namespace kvr::cli
