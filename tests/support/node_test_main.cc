// main() of the GoogleTest binaries that start kvr_node (kvr_test NODE_MAIN):
// gtest's flags, then --kvr_node PATH (ParseNodeBinaryFlag; usage and exit 2
// when missing); SIGPIPE ignored so a server that closes a socket mid-write
// fails that write instead of killing the test.
#include <signal.h>

#include <gtest/gtest.h>

#include "tests/support/server_process.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (!kvr::test_support::ParseNodeBinaryFlag(argc, argv)) return 2;
  signal(SIGPIPE, SIG_IGN);
  return RUN_ALL_TESTS();
}
