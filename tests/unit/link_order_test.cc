// libsentencepiece bundles a small copy of absl flags and exports its own
// FLAGS_help / FLAGS_version / FLAGS_minloglevel (32-byte Flag<bool> objects
// it reaches through its GOT). Debian's libabsl_flags_usage_internal defines
// 1-byte dummies `bool FLAGS_help` etc. under the same names. When abseil's
// library came first in the search order, libsentencepiece's static
// initializers built their Flag objects over abseil's dummies and the .bss
// after them, which holds the Mutex that absl::ParseCommandLine locks
// (kvr_worker aborted with "Mutex corrupt" under TSan). kvr_link_protobuf_first
// puts libsentencepiece before abseil's flags libraries; this test checks the
// binding that results and that flag parsing works.

#include <dlfcn.h>

#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "gmock/gmock.h"
#include "google/protobuf/stubs/common.h"
#include "gtest/gtest.h"

ABSL_FLAG(int, link_order_probe, 1, "set by the test");

namespace {

using ::testing::HasSubstr;

// The file defining the process-wide (first in search order) `symbol`.
std::string DefiningLibrary(const char* symbol) {
  void* address = dlsym(RTLD_DEFAULT, symbol);
  if (address == nullptr) return "(undefined)";
  Dl_info info;
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "(unknown)";
  return info.dli_fname;
}

TEST(LinkOrder, SentencePieceFlagsBindToSentencePiece) {
  // With --as-needed (the release build) nothing here uses libsentencepiece,
  // so it is not loaded and cannot clash; the sanitizer builds load it.
  void* sentencepiece = dlopen("libsentencepiece.so.0", RTLD_NOW | RTLD_NOLOAD);
  if (sentencepiece == nullptr) GTEST_SKIP() << "libsentencepiece is not loaded";
  dlclose(sentencepiece);
  for (const char* name : {"FLAGS_help", "FLAGS_version", "FLAGS_minloglevel"}) {
    EXPECT_THAT(DefiningLibrary(name), HasSubstr("libsentencepiece")) << name;
  }
}

TEST(LinkOrder, AbseilParsesFlags) {
  std::vector<std::string> args = {"link_order_test", "--link_order_probe=7"};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  absl::ParseCommandLine(static_cast<int>(argv.size()), argv.data());
  EXPECT_EQ(absl::GetFlag(FLAGS_link_order_probe), 7);
}

}  // namespace

int main(int argc, char** argv) {
  GOOGLE_PROTOBUF_VERIFY_VERSION;  // libprotobuf first in DT_NEEDED
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
