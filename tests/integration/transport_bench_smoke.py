#!/usr/bin/env python3
"""Smoke test of bench/transport_bench's mTLS path (issue 16: Attend p50 with
and without TLS in one run): the smallest shape, then the JSON must hold
gRPC plaintext and gRPC mTLS rows for every kind and mode, each with calls
made and ordered percentiles, and the overhead figure. Fails when the
bench's TLS set-up (certificates, kvr_node --tls_* flags, client
credentials) breaks."""
import json
import os
import subprocess
import sys
import tempfile

bench, node = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "tb.json")
    subprocess.run([bench, "--kvr_node", node, "--keys", "512", "--kv_heads", "1", "--heads", "2",
                    "--dim", "16", "--iters", "30", "--search_iters", "5", "--seconds", "0.2",
                    "--clients", "1", "--train", "64", "--train_k", "8", "--k", "8",
                    "--warmup", "5", "--ucx=false", "--index", "flat", "--json", out],
                   check=True, timeout=120, stdout=subprocess.DEVNULL)
    with open(out) as f:
        d = json.load(f)
rows = d["results"]
by = {}
for r in rows:
    by.setdefault((r["kind"], r["mode"]), set()).add(r["transport"])
    assert r["calls"] > 0 and 0 < r["p50_us"] <= r["p99_us"], r
for key, transports in by.items():
    assert {"grpc", "grpc-mtls"} <= transports, (key, transports)
assert ("latency", "excluding search") in by and ("throughput", "including search") in by, by
assert isinstance(d["mtls_overhead_p50_us"], (int, float)), d["mtls_overhead_p50_us"]
assert d["build_seconds_grpc_mtls"] > 0, d["build_seconds_grpc_mtls"]
print(f"transport_bench smoke: {len(rows)} rows, mTLS overhead p50 {d['mtls_overhead_p50_us']:.1f} us")
