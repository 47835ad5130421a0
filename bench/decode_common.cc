#include "bench/decode_common.h"

#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace kvr::bench {

double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

float Noise(uint64_t seed, uint64_t i) {
  uint64_t x = seed * 0x9e3779b97f4a7c15ull + i;
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(x >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

void Fill(ThreadPool& pool, float* p, size_t n, uint64_t seed) {
  pool.ParallelFor(n, 1 << 20, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) p[i] = Noise(seed, i);
  });
}

worker::LlamaConfig Llama3_8BConfig(int vocab) {
  worker::LlamaConfig c = worker::Llama3_8BConfig();
  c.vocab_size = vocab;
  c.seq_len = 1 << 22;  // synthetic contexts go past the checkpoint's 8192
  return c;
}

absl::Status WriteJsonRows(const std::string& path, const std::vector<std::string>& rows) {
  std::ofstream out(path);
  out << "[\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    out << "  " << rows[i] << (i + 1 < rows.size() ? ",\n" : "\n");
  }
  out << "]\n";
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("--json: cannot write ", path));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int64_t>> ParseIntList(absl::string_view flag, absl::string_view text,
                                                  int64_t lo, int64_t hi) {
  std::vector<int64_t> out;
  for (absl::string_view s : absl::StrSplit(text, ',')) {
    int64_t n = 0;
    if (!absl::SimpleAtoi(s, &n) || n < lo || n > hi) {
      return absl::InvalidArgumentError(absl::StrCat("--", flag, ": \"", s, "\" outside [", lo,
                                                     ", ", hi, "]"));
    }
    out.push_back(n);
  }
  return out;
}

int64_t ParseVmRssBytes(absl::string_view status_text) {
  for (absl::string_view line : absl::StrSplit(status_text, '\n')) {
    if (!absl::ConsumePrefix(&line, "VmRSS:")) continue;
    std::vector<absl::string_view> parts =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    int64_t kb = 0;
    if (parts.size() != 2 || parts[1] != "kB" || !absl::SimpleAtoi(parts[0], &kb) || kb < 0 ||
        kb > (int64_t{1} << 50)) {
      return 0;
    }
    return kb * 1024;
  }
  return 0;
}

}  // namespace kvr::bench
