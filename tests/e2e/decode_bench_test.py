#!/usr/bin/env python3
"""Smoke test of bench/decode_bench at its smallest shape (tests/decode_bench.cmake).

Runs every mode (full, in-process retrieval, 3 kvr_node over gRPC, over UCX) at
context 1024, batch 2, one layer, with an exact (flat) node index and a top_k
covering the whole node range, so every retrieval mode computes full attention
exactly: its per-step logits must equal full attention's within
LOGIT_TOLERANCE (relative to the largest |logit|), with the same top-1 token
for every sequence and step. Then checks that every JSON row carries the
required fields with sane values, that a row over --memory_budget_bytes is
skipped with a note naming the flag, and that a bad --batches is refused
naming the flag and its range.

usage: decode_bench_test.py DECODE_BENCH KVR_NODE
"""
import json
import os
import subprocess
import sys
import tempfile

# fp32 sums in a different order (node partials + LSE merge vs one pass):
# measured 1.1e-6 absolute on logits of magnitude 3.7 (3e-7 relative).
LOGIT_TOLERANCE = 1e-4
MODES = ["full", "retrieval", "grpc", "ucx"]
FIELDS = ["mode", "context", "batch", "tokens_per_second", "step_s", "worker_compute_s",
          "retrieval_wait_s", "merge_s", "append_s", "node_cpu_s_per_token",
          "worker_rss_bytes", "node_rss_bytes", "bytes_per_step", "bound_tokens_per_second",
          "max_abs_logit_diff", "logits_max_abs", "top1_agreement", "note"]
TIMEOUT_S = 240


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
    small = [bench, "--kvr_node=" + node, "--contexts=1024", "--batches=2", "--layers=1",
             "--steps=2", "--vocab=4096", "--threads=1", "--node_threads=1"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        p = run(small + ["--modes=" + ",".join(MODES), "--index=flat", "--top_k=4096",
                         "--value_dtype=f32", "--json=" + out])
        if p.returncode != 0:
            fail(f"decode_bench exited {p.returncode}")
        with open(out) as f:
            rows = json.load(f)
        if [r["mode"] for r in rows] != MODES:
            fail(f"modes {[r['mode'] for r in rows]} != {MODES}")
        for r in rows:
            missing = [k for k in FIELDS if k not in r]
            if missing:
                fail(f"{r['mode']}: fields {missing} missing")
            if r["context"] != 1024 or r["batch"] != 2 or r["layers"] != 1:
                fail(f"{r['mode']}: shape {r['context']} x {r['batch']} x {r['layers']}")
            if not (r["tokens_per_second"] > 0 and r["step_s"] > 0
                    and abs(r["tokens_per_second"] * r["step_s"] - 2) < 1e-3):
                fail(f"{r['mode']}: tokens/s {r['tokens_per_second']} with step {r['step_s']} s "
                     "is not batch / step")
            parts = r["worker_compute_s"] + r["retrieval_wait_s"] + r["merge_s"] + r["append_s"]
            if abs(parts - r["step_s"]) > 1e-6 * max(1.0, r["step_s"]) + 1e-9:
                fail(f"{r['mode']}: split {parts} != step {r['step_s']}")
            if r["worker_rss_bytes"] <= 0 or r["bound_tokens_per_second"] <= 0:
                fail(f"{r['mode']}: worker RSS {r['worker_rss_bytes']}, "
                     f"bound {r['bound_tokens_per_second']}")
            if r["node_cpu_s_per_token"] < 0:
                fail(f"{r['mode']}: node CPU {r['node_cpu_s_per_token']}")
            if r["mode"] == "full":
                continue
            if r["mode"] in ("grpc", "ucx") and r["node_rss_bytes"] <= 0:
                fail(f"{r['mode']}: node RSS {r['node_rss_bytes']} (3 node processes)")
            if r["mode"] == "retrieval" and r["node_rss_bytes"] != -1:
                fail(f"retrieval: node RSS {r['node_rss_bytes']}, want -1 (in process)")
            if r["mode"] == "ucx" and r["note"]:
                fail(f"ucx: {r['note']}")
            bound = LOGIT_TOLERANCE * max(1.0, r["logits_max_abs"])
            if not (0 <= r["max_abs_logit_diff"] <= bound):
                fail(f"{r['mode']}: max |logit - full| {r['max_abs_logit_diff']} > {bound} "
                     "with an exact index covering the context")
            if r["top1_agreement"] != 1:
                fail(f"{r['mode']}: top-1 agreement {r['top1_agreement']} != 1")

        # A row over the budget is skipped, named, and the run still succeeds.
        p = run(small + ["--modes=full", "--memory_budget_bytes=1", "--json=" + out])
        if p.returncode != 0 or "skipped" not in p.stdout or "--memory_budget_bytes" not in p.stdout:
            fail("a row over --memory_budget_bytes was not reported as skipped")
        with open(out) as f:
            rows = json.load(f)
        if len(rows) != 1 or "--memory_budget_bytes" not in rows[0]["note"]:
            fail(f"skipped row: {rows}")

    # Hostile flags: refused before any work, naming the flag and its range.
    p = run(small + ["--batches=0"])
    if p.returncode != 1 or "--batches" not in p.stderr or "[1, 256]" not in p.stderr:
        fail("--batches=0 was not refused naming the flag and its range")
    print("PASS")


if __name__ == "__main__":
    main()
