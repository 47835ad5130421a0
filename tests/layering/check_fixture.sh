#!/usr/bin/env bash
# The layering checker on a small tree with known violations: it must exit 1
# and report exactly expected_fixture.txt.
set -u
python=$1
here=$(cd "$(dirname "$0")" && pwd)
out=$("$python" "$here/check_layering.py" "$here/fixture" 2>/dev/null)
rc=$?
if [[ $rc -ne 1 ]]; then
  echo "check_layering.py exited $rc on the fixture, expected 1"
  exit 1
fi
diff <(echo "$out") "$here/expected_fixture.txt" || { echo "report differs"; exit 1; }
echo "fixture: the three planted violations reported, nothing else"
