#!/usr/bin/env python3
"""Failover benchmark: decode throughput with R = 1 vs R = 2 replicas, and the
pause streams see when a retrieval node is killed (kill -9) mid-generation.

For each replica count it starts `kvr cluster --replicas R` (3 kvr_node with
data dirs, one kvr_worker, kvr_gateway; all on 127.0.0.1, run dir in a temp
dir) and runs --streams concurrent streamed /v1/completions requests (greedy,
a prompt longer than sinks + window so shards live on the nodes). With
R >= 2 it runs them again and SIGKILLs node --kill_node once the first stream
has received --kill_after events; `kvr cluster` restarts the node, which
re-joins by node-to-node sync. Prints one table:

  run | R | streams | tokens | errors | same text | tok/s | gap p50 ms | gap p99 ms | max gap ms

"same text" compares every stream with the fault-free run of the same R.
Gaps are between consecutive server-sent events of one stream, over every
stream. Exit status 1 if any stream failed or differed.

Usage: bench/failover_bench.py [--kvr build/tools/kvr] [--streams 4]
       [--max_tokens 400] [--kill_after 40] [--kill_node 1]
"""
import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play "
          "outside in the sun with her big red ball and her dog.")


def start_cluster(kvr, run_dir, replicas, timeout=120, extra=()):
    """Starts `kvr cluster` (plus `extra` flags); returns (process, cluster.json dict)."""
    proc = subprocess.Popen(
        [kvr, "cluster", "--run_dir", run_dir, "--replicas", str(replicas)] + list(extra),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("kvr cluster exited before it was ready")
        if line.startswith("kvr cluster ready: "):
            # Keep draining stdout so the supervisor never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            with open(os.path.join(run_dir, "cluster.json")) as f:
                return proc, json.load(f)
    proc.kill()
    raise RuntimeError("kvr cluster was not ready within %d s" % timeout)


def stop_cluster(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Stream(threading.Thread):
    """One streamed /v1/completions request; records each event's arrival."""

    def __init__(self, http_addr, max_tokens, on_event=None, prompt=PROMPT):
        super().__init__(daemon=True)
        self.prompt = prompt
        self.host, port = http_addr.rsplit(":", 1)
        self.port = int(port)
        self.max_tokens = max_tokens
        self.on_event = on_event
        self.times, self.text, self.error = [], "", None

    def run(self):
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            body = json.dumps({"model": "stories260K", "prompt": self.prompt, "stream": True,
                               "max_tokens": self.max_tokens, "temperature": 0})
            conn.request("POST", "/v1/completions", body,
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                self.error = "HTTP %d %s" % (resp.status, resp.read()[:200])
                return
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    self.error = str(event["error"])[:200]
                    return
                self.times.append(time.monotonic())
                self.text += event["choices"][0].get("text", "")
                if self.on_event:
                    self.on_event(self)
            self.error = "stream ended without [DONE]"
        except Exception as e:  # noqa: BLE001 - reported in the table
            self.error = repr(e)[:200]


def percentile(values, p):
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100.0 * len(s)))]


def run_streams(http_addr, n, max_tokens, on_event=None, prompts=None):
    """Runs n concurrent streams (stream i on prompts[i] when given; stream 0
    calls on_event); returns (streams, summary dict)."""
    streams = [Stream(http_addr, max_tokens, on_event if i == 0 else None,
                      prompts[i] if prompts else PROMPT) for i in range(n)]
    start = time.monotonic()
    for s in streams:
        s.start()
    for s in streams:
        s.join(timeout=300)
    elapsed = time.monotonic() - start
    gaps = [(b - a) * 1000 for s in streams for a, b in zip(s.times, s.times[1:])]
    tokens = sum(len(s.times) for s in streams)
    return streams, {"tokens": tokens, "errors": sum(1 for s in streams if s.error),
                     "tok/s": tokens / elapsed if elapsed > 0 else 0.0,
                     "p50": percentile(gaps, 50), "p99": percentile(gaps, 99),
                     "max": max(gaps) if gaps else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--kvr", default=os.path.join(here, "..", "build", "tools", "kvr"))
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--max_tokens", type=int, default=400)
    ap.add_argument("--kill_after", type=int, default=40,
                    help="events the first stream receives before the kill")
    ap.add_argument("--kill_node", type=int, default=1)
    ap.add_argument("--replicas", default="1,2")
    args = ap.parse_args()
    if not 1 <= args.streams <= 64 or not 1 <= args.max_tokens <= 4096:
        ap.error("--streams in [1, 64], --max_tokens in [1, 4096]")

    rows, failed = [], False
    for r in [int(x) for x in args.replicas.split(",")]:
        with tempfile.TemporaryDirectory(prefix="kvr_failover_bench") as run_dir:
            proc, info = start_cluster(args.kvr, run_dir, r)
            try:
                http_addr = info["gateway_http"]
                run_streams(http_addr, 1, 8)  # warm-up
                ref, stats = run_streams(http_addr, args.streams, args.max_tokens)
                rows.append(("fault-free", r, args.streams, stats, "-"))
                failed |= stats["errors"] > 0
                if r < 2:
                    continue
                victim = info["nodes"][args.kill_node]["pid"]
                killed = threading.Event()

                def kill(stream, victim=victim, killed=killed):
                    if not killed.is_set() and len(stream.times) >= args.kill_after:
                        killed.set()
                        os.kill(victim, signal.SIGKILL)

                streams, stats = run_streams(http_addr, args.streams, args.max_tokens, kill)
                same = all(s.text == t.text for s, t in zip(streams, ref))
                failed |= stats["errors"] > 0 or not same or not killed.is_set()
                for s in streams:
                    if s.error:
                        print("stream error:", s.error, file=sys.stderr)
                rows.append(("kill -9 node-%d" % args.kill_node, r, args.streams, stats,
                             "yes" if same else "NO"))
            finally:
                stop_cluster(proc)

    print("| run | R | streams | tokens | errors | same text | tok/s | gap p50 ms | "
          "gap p99 ms | max gap ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r, n, s, same in rows:
        print("| %s | %d | %d | %d | %d | %s | %.1f | %.2f | %.2f | %.1f |" %
              (name, r, n, s["tokens"], s["errors"], same, s["tok/s"], s["p50"], s["p99"],
               s["max"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
