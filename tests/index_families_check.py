#!/usr/bin/env python3
"""index_bench runs every method on every data family in one run (issue 17).

Usage: index_families_check.py INDEX_BENCH

Runs index_bench at a small shape on --families=all with a stand-in for the
RoarGraph reference (two scripts that check the files index_bench hands them
and answer fixed numbers), then asserts: every family has rows of every
method, each row names its family, flat is exact, the RoarGraph rows carry
the stand-in's commit and numbers converted right (ms -> us, visited -> %
scanned), the summary names each family and the worst one; and that an
unknown family is refused naming the flag.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

N, D, TRAIN, TEST, K = 4096, 128, 1024, 100, 100
FAMILIES = ["topical", "lowrank", "flat", "positional", "sink"]

BUILD = r'''#!/usr/bin/env python3
import os, struct, sys
a = sys.argv[1:]
def arg(name):
    return a[a.index(name) + 1]
def header(path):
    with open(path, "rb") as f:
        return struct.unpack("<II", f.read(8))
# The files index_bench wrote: shapes and sizes.
rows, cols = header(arg("--base_data_path"))
assert (rows, cols) == ({N}, {D}), (rows, cols)
assert os.path.getsize(arg("--base_data_path")) == 8 + rows * cols * 4
# Training queries: those of the kept key positions (about N/(N+TEST) of them).
t, tc = header(arg("--sampled_query_data_path"))
assert {TRAIN} * 0.9 <= t <= {TRAIN} and tc == {D}, (t, tc)
assert os.path.getsize(arg("--sampled_query_data_path")) == 8 + t * tc * 4
g, gk = header(arg("--learn_base_nn_path"))
assert (g, gk) == (t, {K}) and arg("--M_sq") == "{K}", (g, gk)
assert os.path.getsize(arg("--learn_base_nn_path")) == 8 + g * gk * 4
assert arg("--dist") == "ip"
open(arg("--projection_index_save_path"), "w").write("fake index")
print("built")
'''

SEARCH = r'''#!/usr/bin/env python3
import os, struct, sys
a = sys.argv[1:]
def arg(name):
    return a[a.index(name) + 1]
q, qc = struct.unpack("<II", open(arg("--query_path"), "rb").read(8))
assert (q, qc) == ({TEST}, {D}), (q, qc)
gt = arg("--gt_path")
g, gk = struct.unpack("<II", open(gt, "rb").read(8))
assert (g, gk) == ({TEST}, {K}) and os.path.getsize(gt) == 8 + g * gk * 8, (g, gk)
# Distances are negated inner products, best first: ascending.
with open(gt, "rb") as f:
    f.seek(8 + g * gk * 4)
    dist = struct.unpack("<%df" % gk, f.read(4 * gk))
assert list(dist) == sorted(dist), dist[:5]
assert open(arg("--projection_index_save_path")).read() == "fake index"
assert arg("-T") == "1" and arg("--k") == "{K}"
ls = a[a.index("--L_pq") + 1:]
with open(arg("--evaluation_save_path"), "w") as out:
    for i, l in enumerate(ls):
        # L, QPS, avg visited, mean latency ms, recall, hops
        out.write("%s,1000,%.1f,%.3f,%.4f,7\n" % (l, 409.6 * (i + 1), 1.5 * (i + 1), 0.9 + 0.01 * i))
'''


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def main():
    bench = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        bindir = os.path.join(tmp, "roar")
        os.mkdir(bindir)
        fmt = dict(N=N, D=D, TRAIN=TRAIN, TEST=TEST, K=K)
        for name, text in (("test_build_roargraph", BUILD), ("test_search_roargraph", SEARCH)):
            path = os.path.join(bindir, name)
            with open(path, "w") as f:
                f.write(text.replace("{N}", str(N)).replace("{D}", str(D))
                        .replace("{TRAIN}", str(TRAIN)).replace("{TEST}", str(TEST))
                        .replace("{K}", str(K)))
            os.chmod(path, 0o755)
        with open(os.path.join(bindir, "COMMIT"), "w") as f:
            f.write("0123456789abcdef0123\n")
        js = os.path.join(tmp, "rows.json")
        cmd = [bench, "--sizes=%d" % N, "--n_test=%d" % TEST, "--n_train=%d" % TRAIN,
               "--families=all", "--methods=flat,ivf,graph,roargraph", "--attention=false",
               "--ood_gap=false", "--graph_beams=100,400", "--ivf_nprobes=8,64",
               "--roargraph_ls=100,200", "--roargraph_bin_dir=" + bindir, "--threads=2",
               "--json=" + js]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
        if p.returncode != 0:
            fail("index_bench exited %d:\n%s\n%s" % (p.returncode, p.stdout[-3000:], p.stderr[-3000:]))
        rows = json.load(open(js))
        for fam in FAMILIES:
            for method in ("flat", "ivf", "graph", "roargraph"):
                got = [r for r in rows if r["family"] == fam and r["method"] == method]
                if not got:
                    fail("no %s rows for family %s:\n%s" % (method, fam, p.stdout[-3000:]))
            flat = [r for r in rows if r["family"] == fam and r["method"] == "flat"]
            if flat[0]["recall"] != 1.0:
                fail("flat recall %s on %s, want 1.0" % (flat[0]["recall"], fam))
            roar = sorted((r for r in rows if r["family"] == fam and r["method"] == "roargraph"),
                          key=lambda r: r["param"])
            want = [("0123456789ab,L=100", 0.90, 1500.0, 10.0), ("0123456789ab,L=200", 0.91, 3000.0, 20.0)]
            for r, (param, recall, us, pct) in zip(roar, want):
                if (r["param"], round(r["recall"], 4), round(r["us_per_query"], 1),
                        round(r["scanned_pct"], 3)) != (param, recall, us, pct):
                    fail("roargraph row %s, want param %s recall %s us %s scanned %s" %
                         (r, param, recall, us, pct))
            if len(roar) != 2:
                fail("%d roargraph rows on %s, want 2" % (len(roar), fam))
        families = {r["family"] for r in rows}
        if families != set(FAMILIES):
            fail("families in the rows: %s" % sorted(families))
        for fam in FAMILIES:
            if not any(line.split()[:1] == [fam] and
                       ("MISSED" in line or line.rstrip().endswith("met"))
                       for line in p.stdout.splitlines()):
                fail("no target line for %s in the summary" % fam)
        if "worst family: " not in p.stdout:
            fail("summary names no worst family")

        bad = subprocess.run([bench, "--families=topical,bogus", "--sizes=64"],
                             capture_output=True, text=True, timeout=60)
        if bad.returncode != 2 or "--families" not in bad.stderr or "bogus" not in bad.stderr:
            fail("unknown family: exit %d, stderr %r" % (bad.returncode, bad.stderr))
    print("ok: %d rows over %d families" % (len(rows), len(FAMILIES)))


if __name__ == "__main__":
    main()
