#!/usr/bin/env python3
"""Chaos test (issue 15): `kvr cluster --workers 2 --replicas 2` (3 kvr_node
with data dirs, 2 kvr_worker, kvr_gateway; 127.0.0.1 only) serves 8 greedy
streamed /v1/completions requests, each on its own prompt, while nodes are
killed with SIGKILL in 3 rounds and a worker once; `kvr cluster` restarts
each. Asserts: 0 failed requests and every stream's text identical to the
fault-free run of the same requests on the same cluster.

Rounds (stream 0's event count picks the moment; the first kill comes with
stream 0's first token, while the other streams' prefills upload shards (8
streams on 2 workers: most are still queued or prefilling); every later kill
waits until both workers
report 3 nodes up and 0 under-replicated shards, so at most one replica of a
chunk is ever lost at a time, which is what R = 2 promises to survive):
  1. node-<r0> at stream 0's first event (prefill uploads);
  2. node-<r1> after 60 events (decode: appends and Attends);
  3. node-<r2> after 120 events;
  4. worker-0 after 180 events (the gateway resumes its streams on worker-1).
Node choices come from --seed (printed). Bounded: every wait has a deadline
(--timeout_seconds, default 120, for the whole chaos run).

Usage: chaos_test.py --kvr PATH [--seed N]
"""
import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                "bench"))
import failover_bench as fb  # noqa: E402

STREAMS = 8
MAX_TOKENS = 240
PROMPTS = [fb.PROMPT + suffix for suffix in (
    "", " One day", " Her dog", " The sun", " She said", " Then", " The ball", " Lily")]


def metric(addr, name):
    """Sum of every sample of `name` on http://addr/metrics (None if unreachable)."""
    try:
        with urllib.request.urlopen("http://%s/metrics" % addr, timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
    return total if seen else None


def compare(streams, ref):
    """Failures: streams that failed or whose text differs from ref's."""
    failures = []
    for i, (s, r) in enumerate(zip(streams, ref)):
        if s.error:
            failures.append("stream %d failed: %s" % (i, s.error))
        elif s.text != r.text:
            failures.append("stream %d differs:\n  got  %r\n  want %r" % (i, s.text, r.text))
    return failures


def cluster_info(run_dir):
    with open(os.path.join(run_dir, "cluster.json")) as f:
        return json.load(f)


def healthy(run_dir, n_nodes):
    """Both workers reachable, seeing every node up and no under-replicated shard."""
    for w in cluster_info(run_dir)["workers"]:
        if metric(w["metrics"], "kvr_worker_retrieval_nodes_up") != n_nodes:
            return False
        if metric(w["metrics"], "kvr_worker_under_replicated_shards") != 0:
            return False
    return True


def lose_every_replica(args):
    """--scenario lose_replicas: one worker, R = 2; two nodes killed at the
    same moment mid-stream, so every shard they both own loses both replicas.
    The worker recomputes the affected requests from their token ids on the
    live nodes (kvr_worker --max_recomputes); asserts 0 failed requests, every
    text identical to the fault-free run, and that a recompute happened."""
    rng = random.Random(args.seed)
    victims = rng.sample(range(3), 2)
    print("seed %d: nodes %s killed together" % (args.seed, victims))
    with tempfile.TemporaryDirectory(prefix="kvr_chaos_test") as run_dir:
        proc, info = fb.start_cluster(args.kvr, run_dir, 2)
        try:
            http_addr = info["gateway_http"]
            ref, stats = fb.run_streams(http_addr, STREAMS, MAX_TOKENS, prompts=PROMPTS)
            assert stats["errors"] == 0, [s.error for s in ref if s.error]
            killed = []

            def on_event(stream):
                if not killed and len(stream.times) >= 60:
                    for v in victims:
                        pid = cluster_info(run_dir)["nodes"][v]["pid"]
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)

            streams, stats = fb.run_streams(http_addr, STREAMS, MAX_TOKENS, on_event,
                                            prompts=PROMPTS)
            print("run: %d tokens, %d errors, max gap %.1f ms" %
                  (stats["tokens"], stats["errors"], stats["max"]))
            failures = compare(streams, ref)
            if len(killed) != 2:
                failures.append("the nodes were not killed (streams too short?)")
            with open(os.path.join(run_dir, "worker.log")) as f:
                recomputes = f.read().count("kvr_worker: recomputing a request")
            print("recomputed requests:", recomputes)
            if recomputes == 0:
                failures.append("no request was recomputed: the test did not test it")
            for f in failures:
                print("FAIL:", f)
            return 1 if failures else 0
        finally:
            fb.stop_cluster(proc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvr", required=True)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 1000)
    ap.add_argument("--timeout_seconds", type=float, default=120)
    ap.add_argument("--scenario", choices=["rounds", "lose_replicas"], default="rounds")
    args = ap.parse_args()
    if args.scenario == "lose_replicas":
        return lose_every_replica(args)
    rng = random.Random(args.seed)
    victims = [rng.randrange(3) for _ in range(3)]
    print("seed %d: nodes killed in order %s, then worker-0" % (args.seed, victims))

    with tempfile.TemporaryDirectory(prefix="kvr_chaos_test") as tmp:
        # $KVR_CHAOS_RUN_DIR keeps the run dir (the children's logs) for a post-mortem.
        run_dir = os.environ.get("KVR_CHAOS_RUN_DIR") or tmp
        proc, info = fb.start_cluster(args.kvr, run_dir, 2, extra=["--workers", "2"])
        try:
            http_addr = info["gateway_http"]
            n_nodes = len(info["nodes"])
            ref, stats = fb.run_streams(http_addr, STREAMS, MAX_TOKENS, prompts=PROMPTS)
            assert stats["errors"] == 0, [s.error for s in ref if s.error]

            # The fault schedule: (events of stream 0 before the fault, what).
            plan = [(1, ("nodes", victims[0])), (60, ("nodes", victims[1])),
                    (120, ("nodes", victims[2])), (180, ("workers", 0))]
            done = []
            lock = threading.Lock()
            deadline = time.monotonic() + args.timeout_seconds
            progress = {"events": 0}
            wake = threading.Condition(lock)

            def on_event(stream):
                with lock:
                    progress["events"] = len(stream.times)
                    wake.notify_all()

            def controller():
                for at, (kind, index) in plan:
                    with lock:
                        while progress["events"] < at and time.monotonic() < deadline:
                            wake.wait(timeout=0.5)
                    # Never lose a second replica: wait until the last victim was
                    # restarted (a new pid) and the workers see it in sync again.
                    while done and not healed(done):
                        if time.monotonic() > deadline:
                            return
                        time.sleep(0.05)  # polling the cluster's metrics, not a sync
                    pid = cluster_info(run_dir)[kind][index]["pid"]
                    os.kill(pid, signal.SIGKILL)
                    done.append((kind, index, pid, progress["events"]))

            def healed(faults):
                info_now = cluster_info(run_dir)
                for kind, index, pid, _ in faults:
                    if info_now[kind][index]["pid"] == pid:
                        return False
                return healthy(run_dir, n_nodes)

            chaos = threading.Thread(target=controller, daemon=True)
            chaos.start()
            streams, stats = fb.run_streams(http_addr, STREAMS, MAX_TOKENS, on_event,
                                            prompts=PROMPTS)
            chaos.join(timeout=max(1.0, deadline - time.monotonic()))
            print("faults (kind, index, pid, stream-0 events):", done)
            print("chaos run: %d tokens, %d errors, max gap %.1f ms" %
                  (stats["tokens"], stats["errors"], stats["max"]))
            failures = compare(streams, ref)
            if len(done) < len(plan):
                failures.append("only %d of %d faults happened (streams ended first?)" %
                                (len(done), len(plan)))
            # The cluster heals afterwards: every victim restarted, every node
            # back in sync on both workers.
            heal_deadline = time.monotonic() + 30
            while not healed(done) and time.monotonic() < heal_deadline:
                time.sleep(0.05)  # polling the cluster's metrics, not a sync
            if not healed(done):
                failures.append("not restarted and back in sync within 30 s of the run")
            for f in failures:
                print("FAIL:", f)
            return 1 if failures else 0
        finally:
            fb.stop_cluster(proc)


if __name__ == "__main__":
    sys.exit(main())
