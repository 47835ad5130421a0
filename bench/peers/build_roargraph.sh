#!/usr/bin/env bash
# Builds the RoarGraph reference (github.com/matchyc/RoarGraph, VLDB'24) OUTSIDE
# the kvr tree, for measurement only: index_bench --roargraph_bin_dir runs its two
# programs as a peer. No RoarGraph code enters kvr.
#
#   bench/peers/build_roargraph.sh SRC_DIR [BUILD_DIR] [COMMIT]
#
# SRC_DIR    a RoarGraph source tree (src/, include/, tests/, CMakeLists.txt; its
#            thirdparty/ submodules are not needed), e.g. from
#            `git --git-dir=<mirror> archive HEAD CMakeLists.txt src include tests | tar -x -C SRC_DIR`.
# BUILD_DIR  scratch folder (default ${TMPDIR:-/tmp}/kvr-roargraph); must lie outside the
#            kvr repository.
# COMMIT     the source's commit, recorded in BUILD_DIR/bin/COMMIT (default: `git -C
#            SRC_DIR rev-parse HEAD` when SRC_DIR is a checkout, else "unknown").
#
# Needs cmake, a C++17 compiler with OpenMP, Boost.ProgramOptions and tsl::robin_map
# (Debian: libboost-program-options-dev robin-map-dev; see bench/README.md). It
# compiles with -march=native (RoarGraph's own flags): measure on the machine that
# built it. Prints the bin directory (test_build_roargraph, test_search_roargraph,
# COMMIT) on its last line.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
  echo "usage: $0 SRC_DIR [BUILD_DIR] [COMMIT]" >&2
  exit 2
fi
src=$(cd "$1" && pwd)
build=${2:-${TMPDIR:-/tmp}/kvr-roargraph}
for f in CMakeLists.txt src include tests/test_build_roargraph.cpp tests/test_search_roargraph.cpp; do
  [[ -e "$src/$f" ]] || { echo "$0: $src has no $f (not a RoarGraph source tree)" >&2; exit 2; }
done
repo_root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$build"
build=$(cd "$build" && pwd)
case "$build/" in
  "$repo_root"/*) echo "$0: BUILD_DIR $build lies inside the kvr tree; pick one outside it" >&2; exit 2 ;;
esac

commit=${3:-}
if [[ -z "$commit" ]]; then
  commit=$(git -C "$src" rev-parse HEAD 2>/dev/null || echo unknown)
fi

# A private copy: the top CMakeLists loses the lines naming thirdparty/ (the
# DiskANN and robin-map submodules; the packaged robin-map headers are used).
rm -rf "$build/src-copy" "$build/cmake-build"
mkdir -p "$build/src-copy" "$build/cmake-build" "$build/bin"
cp -r "$src/src" "$src/include" "$src/tests" "$build/src-copy/"
grep -v thirdparty "$src/CMakeLists.txt" > "$build/src-copy/CMakeLists.txt"

jobs=${JOBS:-2}
cmake -S "$build/src-copy" -B "$build/cmake-build" -DCMAKE_BUILD_TYPE=Release >"$build/cmake.log" 2>&1 ||
  { tail -20 "$build/cmake.log" >&2; exit 1; }
cmake --build "$build/cmake-build" -j "$jobs" --target test_build_roargraph test_search_roargraph \
  >"$build/make.log" 2>&1 || { tail -30 "$build/make.log" >&2; exit 1; }
cp "$build/cmake-build/tests/test_build_roargraph" "$build/cmake-build/tests/test_search_roargraph" \
  "$build/bin/"
echo "$commit" > "$build/bin/COMMIT"
echo "RoarGraph $commit built; pass --roargraph_bin_dir=$build/bin to index_bench" >&2
echo "$build/bin"
