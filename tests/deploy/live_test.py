#!/usr/bin/python3
"""Live check of the chart's monitoring against a real cluster and Prometheus.

    live_test.py --render BIN --kvr KVR --node_binary ... --worker_binary ...
                 --gateway_binary ... --health_probe ... --prometheus BIN --work DIR

1. Renders the chart with the ServiceMonitor and PrometheusRule on.
2. Starts `kvr cluster` (3 kvr_node, kvr_worker, kvr_gateway on 127.0.0.1,
   port 0) and waits for its ready line; addresses come from cluster.json.
3. Checks the images' HEALTHCHECK binary against the live servers.
4. Runs a real Prometheus (loopback, port 0, temporary TSDB) whose scrape
   configuration is derived from the rendered ServiceMonitor: one job per
   Service it selects, named by the Service's jobLabel value, with the
   endpoint's path and scheme, the operator's target labels (namespace,
   service, endpoint, pod) and the relabelings' static results; scrape
   interval 1 s instead of the chart's (the only deliberate difference). The
   PrometheusRule's groups are loaded as its rule file.
5. Generates traffic through the gateway's OpenAI HTTP API (streaming and not)
   while it waits, polling Prometheus' HTTP API with a deadline, until every
   target is up; then every dashboard query (from the rendered ConfigMaps,
   $__rate_interval = 1m) must parse and return at least one finite sample,
   every alert expression must parse, and every rule must have been evaluated
   by Prometheus with health "ok".
Everything started is stopped (SIGTERM) before exit. Exit 0 when all pass.
"""
import argparse
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import deploy_checks  # noqa: E402  (render, find)

RATE_INTERVAL = "1m"
NAMESPACE = "serving"
failures = []


def check(cond, message):
    if not cond:
        failures.append(message)
    return cond


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def expired(self):
        return self.left() <= 0


def http(method, url, body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def listening_port(pid, deadline):
    """The TCP port process `pid` listens on (Prometheus started on port 0
    does not print it): its socket inodes matched against /proc/net/tcp."""
    while not deadline.expired():
        inodes = set()
        for fd in glob.glob(f"/proc/{pid}/fd/*"):
            try:
                m = re.match(r"socket:\[(\d+)\]", os.readlink(fd))
            except OSError:
                continue
            if m:
                inodes.add(m.group(1))
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    return int(cols[1].split(":")[1], 16)
        time.sleep(0.1)
    raise SystemExit(f"process {pid} never listened")


def scrape_config(docs, cluster):
    """Prometheus scrape_configs equivalent to the rendered ServiceMonitor."""
    (sm,) = deploy_checks.find(docs, "ServiceMonitor")
    spec = sm["spec"]
    addresses = {"node": [n["metrics"] for n in cluster["nodes"]],
                 "worker": [cluster["worker_metrics"]],
                 "gateway": [cluster["gateway_metrics"]]}
    configs = []
    for svc in deploy_checks.find(docs, "Service"):
        labels = svc["metadata"]["labels"]
        if not deploy_checks.selects(spec["selector"]["matchLabels"], labels):
            continue
        component = labels["app.kubernetes.io/component"]
        for ep in spec["endpoints"]:
            assert any(p["name"] == ep["port"] for p in svc["spec"]["ports"])
            static = []
            for i, addr in enumerate(addresses[component]):
                target_labels = {"namespace": NAMESPACE, "service": svc["metadata"]["name"],
                                 "endpoint": ep["port"],
                                 "pod": f"{svc['metadata']['name']}-{i}"}
                for rl in ep.get("relabelings", []):
                    # Only service-label relabelings exist in the chart; resolve
                    # them from the Service's labels as the operator would.
                    (src,) = rl["sourceLabels"]
                    prefix = "__meta_kubernetes_service_label_"
                    assert src.startswith(prefix) and rl.get("action", "replace") == "replace", rl
                    key = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in labels.items()}
                    target_labels[rl["targetLabel"]] = key[src[len(prefix):]]
                static.append({"targets": [addr], "labels": target_labels})
            configs.append({
                "job_name": labels[spec["jobLabel"]],
                "metrics_path": ep.get("path", "/metrics"),
                "scheme": ep.get("scheme", "http"),
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": static,
            })
    return configs


def start_cluster(args, work):
    run_dir = os.path.join(work, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [args.kvr, "cluster", "--run_dir", run_dir,
           "--node_binary", args.node_binary, "--worker_binary", args.worker_binary,
           "--gateway_binary", args.gateway_binary,
           # A budget, so the memory-budget panel and alert have a denominator.
           "--node_args", "--memory_budget_bytes=268435456 --threads=1",
           "--worker_args", "--max_concurrent=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = Deadline(90)
    lines = []
    while not deadline.expired():
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("kvr cluster ready:"):
            # Keep draining its output so it never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            with open(os.path.join(run_dir, "cluster.json")) as f:
                return proc, json.load(f)
    proc.kill()
    raise SystemExit("kvr cluster did not become ready:\n" + "".join(lines[-30:]))


def stop(proc, name, timeout=40):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            failures.append(f"{name} did not stop within {timeout}s of SIGTERM")
    return proc.returncode


def prom_query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, body = http("GET", url)
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, {"status": "error", "error": body}


def finite_samples(result):
    data = result.get("data", {})
    if data.get("resultType") == "scalar":
        return [float(data["result"][1])]
    values = [float(s["value"][1]) for s in data.get("result", [])]
    return [v for v in values if math.isfinite(v)]


class Traffic(threading.Thread):
    """Completions through the gateway until stopped: long prompts so shards
    go to the nodes (sinks + window < prompt), some streamed."""

    PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play "
              "outside in the park with her friends. One day, she saw a big dog near the tree "
              "and she was scared, but her mom said the dog was kind and wanted to play.")

    def __init__(self, http_addr):
        super().__init__(daemon=True)
        self.base = f"http://{http_addr}"
        self.stop_event = threading.Event()
        self.ok = 0
        self.errors = []
        status, body = http("GET", self.base + "/v1/models")
        models = json.loads(body)["data"] if status == 200 else []
        self.model = models[0]["id"] if models else ""

    def run(self):
        i = 0
        while not self.stop_event.is_set():
            i += 1
            if i % 3 == 0:
                path, body = "/v1/chat/completions", {
                    "model": self.model,
                    "messages": [{"role": "user", "content": self.PROMPT}],
                    "max_tokens": 16, "stream": True}
            else:
                path, body = "/v1/completions", {"model": self.model, "prompt": self.PROMPT, "max_tokens": 16,
                                                 "stream": i % 2 == 0, "temperature": 0}
            try:
                status, text = http("POST", self.base + path, body, timeout=60)
            except OSError as e:
                status, text = 0, str(e)
            if status == 200:
                self.ok += 1
            else:
                self.errors.append(f"{path}: {status} {text[:200]}")
            if i % 5 == 0:
                # An invalid request: counted as a non-OK status by the gateway.
                http("POST", self.base + "/v1/completions", {"model": self.model, "prompt": "x",
                                                           "max_tokens": -1})


def main():
    parser = argparse.ArgumentParser()
    for a in ("render", "kvr", "node_binary", "worker_binary", "gateway_binary", "health_probe",
              "prometheus", "work"):
        parser.add_argument(f"--{a}", required=True)
    args = parser.parse_args()
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    on = os.path.join(work, "monitoring-on.yaml")
    with open(on, "w") as f:
        yaml.safe_dump({"monitoring": {"serviceMonitor": {"enabled": True},
                                       "prometheusRule": {"enabled": True}}}, f)
    _, docs, _ = deploy_checks.render(args.render, work, "live", [on])
    (rule,) = deploy_checks.find(docs, "PrometheusRule")
    dashboards = {}
    for cm in deploy_checks.find(docs, "ConfigMap"):
        if cm["metadata"]["labels"].get("grafana_dashboard") == "1":
            for key, text in cm["data"].items():
                dashboards[key] = json.loads(text)
    check(len(dashboards) == 3, f"want 3 dashboards, got {sorted(dashboards)}")

    cluster_proc, cluster = start_cluster(args, work)
    prom = None
    traffic = None
    try:
        # The images' HEALTHCHECK against live servers.
        probe = lambda *a: subprocess.run([args.health_probe, *a], capture_output=True,
                                          text=True, timeout=10)
        node0 = cluster["nodes"][0]["grpc"]
        r = probe(f"--addr={node0}", "--service=kvr.v1.RetrievalNode")
        check(r.returncode == 0, f"health probe on a serving node: {r.returncode} {r.stderr}")
        r = probe(f"--addr={cluster['gateway_grpc']}")
        check(r.returncode == 0, f"health probe on the gateway: {r.returncode} {r.stderr}")
        r = probe(f"--addr={node0}", "--service=no.such.Service")
        check(r.returncode == 1 and "no.such.Service" in r.stderr,
              f"health probe must fail for an unknown service: {r.returncode} {r.stderr}")

        rules_path = os.path.join(work, "kvr-rules.yaml")
        with open(rules_path, "w") as f:
            yaml.safe_dump(rule["spec"], f)
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [rules_path],
                  "scrape_configs": scrape_config(docs, cluster)}
        config_path = os.path.join(work, "prometheus.yml")
        with open(config_path, "w") as f:
            yaml.safe_dump(config, f)
        jobs = sorted(c["job_name"] for c in config["scrape_configs"])
        check(jobs == ["kvr-gateway", "kvr-node", "kvr-worker"], f"scrape jobs {jobs}")

        prom_log = open(os.path.join(work, "prometheus.log"), "w")
        prom = subprocess.Popen(
            [args.prometheus, f"--config.file={config_path}",
             f"--storage.tsdb.path={os.path.join(work, 'tsdb')}",
             "--web.listen-address=127.0.0.1:0", "--storage.tsdb.retention.time=1h"],
            stdout=prom_log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{listening_port(prom.pid, Deadline(30))}"

        traffic = Traffic(cluster["gateway_http"])
        traffic.start()

        # Every target up and the traffic visible at all three layers.
        deadline = Deadline(90)
        ready = ('count(up{job=~"kvr-.*"} == 1) == 5 and on() '
                 'sum(kvr_node_attend_keys_scanned_count) > 0 and on() '
                 'sum(kvr_worker_generated_tokens_total) > 0 and on() '
                 'sum(kvr_gateway_generated_tokens_total) > 0')
        while not deadline.expired():
            status, res = prom_query(base, ready)
            if status == 200 and res["data"]["result"]:
                break
            if prom.poll() is not None or cluster_proc.poll() is not None:
                break
            time.sleep(0.5)
        if check(status == 200 and res["data"]["result"],
                 f"targets/traffic never showed up in Prometheus: {res}; "
                 f"traffic ok={traffic.ok} errors={traffic.errors[:3]}"):
            evaluate(base, dashboards, rule, traffic)
    finally:
        if traffic:
            traffic.stop_event.set()
            traffic.join(timeout=70)
        if prom:
            stop(prom, "prometheus")
        rc = stop(cluster_proc, "kvr cluster")
        check(rc == 0, f"kvr cluster exit status {rc} after SIGTERM")

    for f in failures:
        print("FAIL:", f)
    print("live:", f"FAILED ({len(failures)})" if failures else "passed")
    return 1 if failures else 0


def evaluate(base, dashboards, rule, traffic):
    """Dashboard queries, alert expressions and rule health against Prometheus."""

    # Dashboard panels: each query parses and returns data (polled, as
    # some series need a second scrape with traffic in it for a rate).
    exprs = [(name, title, ref, expr.replace("$__rate_interval", RATE_INTERVAL))
             for name, d in sorted(dashboards.items())
             for title, ref, expr in deploy_checks.dashboard_exprs(d)]
    pending = list(exprs)
    last = {}
    deadline = Deadline(60)
    while pending and not deadline.expired():
        still = []
        for item in pending:
            status, res = prom_query(base, item[3])
            last[item] = (status, res)
            if status == 400:  # bad_data: does not parse; no point retrying
                continue
            if not (status == 200 and finite_samples(res)):
                still.append(item)
        pending = still
        if pending:
            time.sleep(1)
    for item in exprs:
        status, res = last[item]
        check(status == 200 and finite_samples(res),
              f"{item[0]} panel {item[1]!r} {item[2]}: {item[3]} -> {status} "
              f"{res.get('error') or res.get('data', {}).get('result')}")
    print(f"dashboards: {len(exprs) - len(pending)}/{len(exprs)} queries returned data")

    # Alerts: each expression parses (it need not fire), and Prometheus'
    # rule manager evaluated each rule without error.
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    for r in alerts:
        status, res = prom_query(base, r["expr"])
        check(status == 200 and res.get("status") == "success",
              f"alert {r.get('alert')}: {r['expr']} -> {status} {res.get('error')}")
    deadline = Deadline(20)
    while not deadline.expired():
        status, body = http("GET", f"{base}/api/v1/rules")
        groups = json.loads(body)["data"]["groups"]
        states = [(r["name"], r["health"], r.get("lastError", "")) for g in groups
                  for r in g["rules"]]
        if len(states) == len(alerts) and all(h == "ok" for _, h, _ in states):
            break
        time.sleep(0.5)
    check(len(states) == len(alerts) and all(h == "ok" for _, h, _ in states),
          f"rule evaluation in Prometheus: {states}")
    print(f"alerts: {len(alerts)} expressions parse; rule health {[s[:2] for s in states]}")
    check(not traffic.errors, f"traffic errors: {traffic.errors[:3]}")
    print(f"traffic: {traffic.ok} completions")


if __name__ == "__main__":
    sys.exit(main())
