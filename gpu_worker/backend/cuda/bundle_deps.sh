#!/usr/bin/env bash
# Bundles the Debian dependencies a KVR_WITH_SERVICES=OFF build needs into one
# folder that can be carried to a GPU machine that has CMake, ninja and nvcc
# but no package registry:
#   * abseil (headers, shared libraries, CMake config) — always needed;
#   * GoogleTest (headers, static libraries, CMake config) — for the tests;
#   * --with-json: nlohmann-json (header-only), which turns the Hugging Face
#     loaders and tokenizer.json back on; without it they compile out;
# SentencePiece is not bundled (it drags in protobuf-lite): the OFF build
# compiles the SentencePiece tokenizer out when libsentencepiece is absent.
# The folder mirrors /usr (include/, lib/<multiarch>/, share/), so CMake finds
# everything through one prefix:
#
#   gpu_worker/backend/cuda/bundle_deps.sh [--out DIR] [--with-json]   # here
#   cmake -S . -B build-gpu -G Ninja -DKVR_WITH_SERVICES=OFF \
#         -DKVR_DEPS_PREFIX=$PWD/.gpu_deps                             # there
#   cmake --build build-gpu --target cuda_backend_test gpu_decode_bench
#
# Binaries built there get the bundled library directory in their RPATH.
# The shared libraries were built on Debian 12 (glibc 2.36, GCC 12): the
# target needs a glibc and libstdc++ at least as new as the versions this
# script prints at the end (Ubuntu 22.04 and newer qualify).
# The default output, .gpu_deps/ at the repository root, should be ignored
# by git.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
out="$repo/.gpu_deps"
with_json=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --with-json) with_json=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "bundle_deps.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

arch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
src_lib=/usr/lib/$arch
need() {
  for p in "$@"; do
    if [[ ! -e $p ]]; then
      echo "bundle_deps.sh: $p is missing here (install the Debian package first:" \
           "scripts/install-deps.sh)" >&2
      exit 1
    fi
  done
}
need /usr/include/absl "$src_lib/cmake/absl/abslConfig.cmake" /usr/include/gtest \
     "$src_lib/cmake/GTest/GTestConfig.cmake" "$src_lib/libgtest.a"
[[ $with_json == 1 ]] && need /usr/include/nlohmann/json.hpp /usr/share/cmake/nlohmann_json

rm -rf "$out"
mkdir -p "$out/include" "$out/lib/$arch/cmake"

# abseil: headers, the shared libraries with their SONAME links, the config
# (its targets locate everything relative to the config file).
cp -a /usr/include/absl "$out/include/"
cp -a "$src_lib"/libabsl_*.so* "$out/lib/$arch/"
cp -a "$src_lib/cmake/absl" "$out/lib/$arch/cmake/"

# GoogleTest / GoogleMock: static libraries, nothing to carry at run time.
cp -a /usr/include/gtest /usr/include/gmock "$out/include/"
cp -a "$src_lib"/libgtest*.a "$src_lib"/libgmock*.a "$out/lib/$arch/"
cp -a "$src_lib/cmake/GTest" "$out/lib/$arch/cmake/"

if [[ $with_json == 1 ]]; then
  mkdir -p "$out/share/cmake"
  cp -a /usr/include/nlohmann "$out/include/"
  cp -a /usr/share/cmake/nlohmann_json "$out/share/cmake/"
fi

# What the shared libraries need from the target's C and C++ runtimes.
glibc=$(objdump -T "$out/lib/$arch"/libabsl_*.so.*.*.* | grep -o 'GLIBC_[0-9.]*' | sort -uV |
        tail -1)
glibcxx=$(objdump -T "$out/lib/$arch"/libabsl_*.so.*.*.* | grep -o 'GLIBCXX_[0-9.]*' |
          sort -uV | tail -1)
{
  echo "# kvr GPU dependency bundle, made $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release; echo "$PRETTY_NAME")"
  echo "abseil $(dpkg-query -W -f='${Version}' libabsl-dev 2>/dev/null || echo '?')"
  echo "googletest $(dpkg-query -W -f='${Version}' libgtest-dev 2>/dev/null || echo '?')"
  [[ $with_json == 1 ]] &&
    echo "nlohmann-json $(dpkg-query -W -f='${Version}' nlohmann-json3-dev 2>/dev/null || echo '?')"
  echo "needs at run time: $glibc, $glibcxx"
} > "$out/MANIFEST"
cat "$out/MANIFEST"
echo "bundle: $out ($(du -sh "$out" | cut -f1)); configure with -DKVR_WITH_SERVICES=OFF" \
     "-DKVR_DEPS_PREFIX=$out"
