#!/usr/bin/env python3
"""decode_bench --attend_batching=on,off at its smallest shape (tests/attend_batch.cmake).

Runs full, in-process retrieval, 3 kvr_node over gRPC and over UCX at context
1024, batch 3, one layer, with an exact (flat) node index and a top_k covering
the node range. Batching changes how the Attends and Appends travel, not what
the nodes compute: for every retrieval mode the "on" and "off" rows (timed one
after the other on one set-up, each over its own positions) must both exist,
side by side, "on" first, carry attend_batching and the same set-up time, and
each equal full attention at its positions within the smoke test's tolerance
with top-1 agreement 1. A bad --attend_batching value is refused naming the
flag.

usage: attend_batch_bench_test.py DECODE_BENCH KVR_NODE
"""
import json
import os
import subprocess
import sys
import tempfile

LOGIT_TOLERANCE = 1e-4  # as tests/e2e/decode_bench_test.py
TIMEOUT_S = 300


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def run(args):
    env = dict(os.environ, UCX_TLS="tcp", UCX_NET_DEVICES="lo", UCX_WARN_UNUSED_ENV_VARS="n")
    p = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    print(p.stdout)
    print(p.stderr, file=sys.stderr)
    return p


def main():
    bench, node = sys.argv[1], sys.argv[2]
    small = [bench, "--kvr_node=" + node, "--contexts=1024", "--batches=3", "--layers=1",
             "--steps=2", "--vocab=4096", "--threads=1", "--node_threads=1"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        p = run(small + ["--modes=full,retrieval,grpc,ucx", "--attend_batching=on,off",
                         "--index=flat", "--top_k=4096", "--value_dtype=f32", "--json=" + out])
        if p.returncode != 0:
            fail(f"decode_bench exited {p.returncode}")
        with open(out) as f:
            rows = json.load(f)
        got = [(r["mode"], r["attend_batching"]) for r in rows]
        want = [("full", "-"), ("retrieval", "on"), ("retrieval", "off"), ("grpc", "on"),
                ("grpc", "off"), ("ucx", "on"), ("ucx", "off")]
        if got != want:
            fail(f"rows {got} != {want}")
        by = {(r["mode"], r["attend_batching"]): r for r in rows}
        for mode in ("retrieval", "grpc", "ucx"):
            on, off = by[(mode, "on")], by[(mode, "off")]
            for r in (on, off):
                if not r["tokens_per_second"] > 0:
                    fail(f"{mode} {r['attend_batching']}: tokens/s {r['tokens_per_second']}")
                bound = LOGIT_TOLERANCE * max(1.0, r["logits_max_abs"])
                if not 0 <= r["max_abs_logit_diff"] <= bound:
                    fail(f"{mode} {r['attend_batching']}: |logit - full| "
                         f"{r['max_abs_logit_diff']} > {bound}")
                if r["top1_agreement"] != 1:
                    fail(f"{mode} {r['attend_batching']}: top-1 agreement {r['top1_agreement']}")
            if on["setup_s"] != off["setup_s"]:
                fail(f"{mode}: on / off set up separately ({on['setup_s']} / {off['setup_s']} s)")
            if mode == "ucx" and (on["note"] or off["note"]):
                fail(f"ucx: {on['note']} {off['note']}")

    p = run(small + ["--modes=retrieval", "--attend_batching=maybe"])
    if p.returncode != 1 or "--attend_batching" not in p.stderr:
        fail("--attend_batching=maybe was not refused naming the flag")
    print("PASS")


if __name__ == "__main__":
    main()
