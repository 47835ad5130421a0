#!/usr/bin/env python3
"""decode_bench --prefill_contexts and --search_threads (tests/attend_parallel.cmake).

Runs decode_bench at its smallest shape (context 1024, batch 1, one layer,
vocab 256) with --prefill_contexts=1024, full attention and the in-process
retrieval node with an exact (flat) index whose top_k covers the node's
range, at --search_threads=1,0. Asserts:
  * besides the synthetic rows, one full and two retrieval rows (search
    threads 1 and 0) carry fill "prefill" at context 1024;
  * the prefill really changed the context: full attention's logits (the
    retrieval rows' reference) differ from the synthetic context's (largest
    |logit| differs);
  * on the prefill context every retrieval row equals full attention within
    LOGIT_TOLERANCE relative and agrees on every top-1 token;
  * the search_threads 1 and 0 rows give the same max |logit difference|
    (per-head parallel search is bit-identical, so the logits are too);
  * a --prefill_contexts entry below 1024 is refused naming the flag.

usage: decode_prefill_test.py DECODE_BENCH
"""
import json
import os
import subprocess
import sys
import tempfile

LOGIT_TOLERANCE = 1e-4  # as decode_bench_test.py: fp32 summation order only
TIMEOUT_S = 500


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def run(args):
    p = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
    print(p.stdout)
    print(p.stderr, file=sys.stderr)
    return p


def main():
    bench = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        p = run([bench, "--contexts=1024", "--prefill_contexts=1024", "--batches=1",
                 "--layers=1", "--steps=2", "--vocab=256", "--modes=full,retrieval",
                 "--search_threads=1,0", "--index=flat", "--top_k=4096", "--value_dtype=f32",
                 "--json=" + out])
        if p.returncode != 0:
            fail(f"decode_bench exited {p.returncode}")
        with open(out) as f:
            rows = json.load(f)
        synthetic = [r for r in rows if r["fill"] == "synthetic"]
        prefill = [r for r in rows if r["fill"] == "prefill"]
        got = [(r["mode"], r["search_threads"]) for r in prefill]
        if got != [("full", -1), ("retrieval", 1), ("retrieval", 0)]:
            fail(f"prefill rows {got}")
        if any(r["context"] != 1024 for r in prefill):
            fail("prefill rows not at context 1024")
        for r in prefill[1:]:
            scale = max(1.0, r["logits_max_abs"])
            if not 0 <= r["max_abs_logit_diff"] <= LOGIT_TOLERANCE * scale:
                fail(f"search_threads {r['search_threads']}: max |logit diff| "
                     f"{r['max_abs_logit_diff']} over {LOGIT_TOLERANCE} x {scale}")
            if r["top1_agreement"] != 1:
                fail(f"search_threads {r['search_threads']}: top-1 agreement "
                     f"{r['top1_agreement']}")
        if prefill[1]["max_abs_logit_diff"] != prefill[2]["max_abs_logit_diff"]:
            fail(f"search_threads 1 vs 0: logit diffs {prefill[1]['max_abs_logit_diff']} vs "
                 f"{prefill[2]['max_abs_logit_diff']} (parallel search is not bit-identical)")
        syn_ret = [r for r in synthetic if r["mode"] == "retrieval"][0]
        if syn_ret["logits_max_abs"] == prefill[1]["logits_max_abs"]:
            fail("prefill logits equal the synthetic ones: the prefill did not fill the context")
        p = run([bench, "--contexts=1024", "--prefill_contexts=512", "--modes=full"])
        if p.returncode == 0 or "prefill_contexts" not in p.stderr:
            fail("--prefill_contexts=512 was not refused naming the flag")
    print("PASS")


if __name__ == "__main__":
    main()
