// Replays inputs through a libFuzzer harness without libFuzzer (the main,
// gcc build's regression runner): every file named on the command line (a
// folder: every file in it, sorted), then for each file a fixed set of
// deterministic mutations (truncations to 1/16 .. 15/16 of its length and
// `--mutations` single-byte changes from a fixed seed). A harness that
// crashes or trips a check kills the process, so ctest reports it.
//
// Memory is capped like libFuzzer's -rss_limit_mb (address space,
// `--memory_mb`, default 2048): an input that makes a parser allocate more
// fails the run at once instead of exhausting the machine.
//
// Usage: fuzz_<name>_replay [--mutations=N] [--memory_mb=M] PATH...
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <sys/resource.h>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::vector<uint8_t> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void Run(const std::vector<uint8_t>& input) {
  // A copy in its own allocation, so an over-read past the end is caught by
  // a sanitizer when one is on.
  std::vector<uint8_t> copy(input);
  LLVMFuzzerTestOneInput(copy.empty() ? nullptr : copy.data(), copy.size());
}

}  // namespace

int main(int argc, char** argv) {
  int mutations = 500;
  long memory_mb = 2048;
  std::vector<std::filesystem::path> files;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--mutations=", 0) == 0) {
      mutations = std::atoi(arg.c_str() + std::strlen("--mutations="));
      continue;
    }
    if (arg.rfind("--memory_mb=", 0) == 0) {
      memory_mb = std::atol(arg.c_str() + std::strlen("--memory_mb="));
      continue;
    }
    const std::filesystem::path path(arg);
    if (std::filesystem::is_directory(path)) {
      std::vector<std::filesystem::path> in_dir;
      for (const auto& entry : std::filesystem::directory_iterator(path)) {
        if (entry.is_regular_file()) in_dir.push_back(entry.path());
      }
      std::sort(in_dir.begin(), in_dir.end());
      files.insert(files.end(), in_dir.begin(), in_dir.end());
    } else if (std::filesystem::is_regular_file(path)) {
      files.push_back(path);
    } else {
      std::fprintf(stderr, "replay: %s is neither a file nor a folder\n", arg.c_str());
      return 2;
    }
  }
  if (files.empty()) {
    std::fprintf(stderr, "replay: no inputs (usage: %s [--mutations=N] PATH...)\n", argv[0]);
    return 2;
  }
  if (memory_mb > 0) {
    const rlimit limit{static_cast<rlim_t>(memory_mb) << 20, static_cast<rlim_t>(memory_mb) << 20};
    if (setrlimit(RLIMIT_AS, &limit) != 0) std::perror("replay: setrlimit");
  }
  std::mt19937 rng(20261207);
  size_t runs = 0;
  for (const auto& file : files) {
    const std::vector<uint8_t> input = ReadFile(file);
    Run(input);
    ++runs;
    for (size_t part = 1; part < 16 && input.size() >= 16; ++part) {
      Run(std::vector<uint8_t>(input.begin(), input.begin() + input.size() * part / 16));
      ++runs;
    }
    for (int m = 0; m < mutations && !input.empty(); ++m) {
      std::vector<uint8_t> mutated(input);
      const size_t at = rng() % mutated.size();
      switch (rng() % 3) {
        case 0: mutated[at] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
        case 1: mutated[at] = static_cast<uint8_t>(rng()); break;
        default: mutated[at] = (rng() % 2) != 0 ? 0xFF : 0x00; break;
      }
      Run(mutated);
      ++runs;
    }
  }
  std::printf("replay: %zu inputs from %zu files, no crash\n", runs, files.size());
  return 0;
}
