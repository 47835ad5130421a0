#!/usr/bin/python3
"""Offline checks of the kvr Helm chart, its rules and dashboards.

    deploy_checks.py manifests  --render BIN --work DIR
    deploy_checks.py values     --work DIR
    deploy_checks.py rules      --render BIN --work DIR [--promtool PATH]
    deploy_checks.py dashboards --work DIR

manifests: renders the chart (tests/deploy/render: Go text/template + sprig +
  Helm's functions) with the default values and every tests/deploy/values/*.yaml,
  checks each result against what the values promise (the oracle below),
  validates every manifest against the Kubernetes / prometheus-operator schemas
  and type-checks it strictly (validate.mjs), and checks that the validator
  does reject a broken manifest.
values: values.schema.json (Draft 7, python3-jsonschema) accepts the default
  values merged with each good values file, and rejects each values/bad/*.yaml
  with an error naming the field its "# expect:" line names.
rules: `promtool check rules` on the PrometheusRule's groups, `promtool test
  rules` on alert behaviour (rules_test.yaml), and deploy/prometheus/
  kvr-rules.yaml must equal the rules rendered with the default values.
dashboards: the dashboards' structure (uid, title, schemaVersion, unique panel
  ids, gridPos, Prometheus targets with expr) and the Grafana schema type check
  (validate.mjs against @grafana/schema).
Exit status 0 when every check passes; each failure is printed.
"""
import argparse
import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHART = os.path.join(ROOT, "helm", "kvr")
VALUES_DIR = os.path.join(HERE, "values")
DASHBOARDS = sorted(glob.glob(os.path.join(CHART, "dashboards", "*.json")))
MONITORING_APIS = "monitoring.coreos.com/v1"

failures = []


def check(cond, message):
    if not cond:
        failures.append(message)
    return cond


def value_sets():
    """(name, [values files]) for the default values and each values/*.yaml."""
    sets = [("default", [])]
    for f in sorted(glob.glob(os.path.join(VALUES_DIR, "*.yaml"))):
        sets.append((os.path.splitext(os.path.basename(f))[0], [f]))
    return sets


def render(render_bin, work, name, files):
    """Renders the chart; returns (values, {template file: [docs]}, notes)."""
    out = os.path.join(work, "render", name)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [render_bin, "--chart", CHART, "--out", out, "--release", "kvr",
           "--namespace", "serving", "--api-versions", MONITORING_APIS]
    for f in files:
        cmd += ["-f", f]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"render {name} failed: {proc.stderr.strip()}")
    with open(os.path.join(out, "values.json")) as f:
        values = json.load(f)
    docs = {}
    notes = ""
    for path in sorted(glob.glob(os.path.join(out, "kvr", "templates", "*"))):
        base = os.path.basename(path)
        with open(path) as f:
            text = f.read()
        if base == "NOTES.txt":
            notes = text
            continue
        docs[base] = [d for d in yaml.safe_load_all(text) if d is not None]
    return values, docs, notes


def merged_values(files):
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    for path in files:
        with open(path) as f:
            overlay = yaml.safe_load(f) or {}
        merge(values, overlay)
    return values


def merge(dst, src):
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        elif v is None:
            dst.pop(k, None)
        else:
            dst[k] = v


def all_docs(docs):
    return [d for ds in docs.values() for d in ds]


def find(docs, kind, name=None):
    return [d for d in all_docs(docs)
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def flag(args, name):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def check_pod(where, pod_spec, drain_flag_seconds, values):
    """Probes, graceful termination and hardening of one pod template."""
    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = values["termination"]["preStopSleepSeconds"]
    check(grace > pre_stop + drain_flag_seconds,
          f"{where}: terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain "
          f"{drain_flag_seconds}")
    check(pod_spec["securityContext"].get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
    for c in pod_spec["containers"]:
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe"):
            p = c.get(probe, {})
            check("grpc" in p and p["grpc"]["port"] == ports.get("grpc"),
                  f"{where}: {probe} must be a native gRPC probe on the grpc port {ports}")
        check(flag(c["args"], "listen") == f"0.0.0.0:{ports['grpc']}",
              f"{where}: --listen does not match the grpc port")
        check(flag(c["args"], "metrics_listen") == f"0.0.0.0:{ports['metrics']}",
              f"{where}: --metrics_listen does not match the metrics port")
        check(c["securityContext"].get("readOnlyRootFilesystem") is True,
              f"{where}: readOnlyRootFilesystem")


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check_render(name, values, docs, notes):
    """The oracle: what each value set promises about the rendered objects."""
    fullname = values["fullnameOverride"] or "kvr"
    ns = "serving"
    node_name, worker_name, gw_name = (f"{fullname}-{c}" for c in ("node", "worker", "gateway"))
    for d in all_docs(docs):
        md = d["metadata"]
        check(len(md["name"]) <= 63, f"{name}: name {md['name']} longer than 63")
    # Selectors of workloads and PDBs match their pod templates.
    for kind in ("StatefulSet", "Deployment"):
        for d in find(docs, kind):
            check(selects(d["spec"]["selector"]["matchLabels"],
                          d["spec"]["template"]["metadata"]["labels"]),
                  f"{name}: {kind} {d['metadata']['name']} selector does not match its pods")

    # Retrieval nodes.
    nv = values["node"]
    (sts,) = find(docs, "StatefulSet", node_name)
    check(sts["spec"]["replicas"] == nv["replicas"], f"{name}: node replicas")
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    budget = int(nv["memoryBudgetBytes"])
    uploads = int(nv["uploadMemoryBytes"])
    ucx_bytes = int(nv["ucx"]["maxInflightBytes"]) if nv["ucx"]["enabled"] else 0
    want_mem = budget * (100 + int(nv["memoryOverhead"]["percent"])) // 100 + int(
        nv["memoryOverhead"]["fixedBytes"]) + uploads + ucx_bytes
    check(flag(c["args"], "memory_budget_bytes") == str(budget),
          f"{name}: --memory_budget_bytes {flag(c['args'], 'memory_budget_bytes')} != {budget}")
    check(flag(c["args"], "upload_memory_bytes") == str(uploads),
          f"{name}: --upload_memory_bytes {flag(c['args'], 'upload_memory_bytes')} != {uploads}")
    for side in ("requests", "limits"):
        got = c["resources"][side]["memory"]
        check(str(got) == str(want_mem), f"{name}: node memory {side} {got} != {want_mem}")
    check(want_mem > budget, f"{name}: node memory limit must exceed the budget")
    check_pod(f"{name} node", pod, float(flag(c["args"], "drain_seconds")), values)
    check(c["readinessProbe"]["grpc"].get("service") == "kvr.v1.RetrievalNode",
          f"{name}: node readiness must ask for kvr.v1.RetrievalNode")
    check(flag(c["args"], "data_dir") == "/data"
          and any(m["mountPath"] == "/data" and m["name"] == "data" for m in c["volumeMounts"]),
          f"{name}: --data_dir must be the mounted data volume")
    has_pvc = bool(sts["spec"].get("volumeClaimTemplates"))
    check(has_pvc == nv["persistence"]["enabled"], f"{name}: PVC iff node.persistence.enabled")
    if has_pvc:
        pvc = sts["spec"]["volumeClaimTemplates"][0]
        check(pvc["spec"]["resources"]["requests"]["storage"] == nv["persistence"]["size"],
              f"{name}: PVC size")
        check(pvc["spec"].get("storageClassName", "") == nv["persistence"]["storageClass"],
              f"{name}: PVC storageClass")
    else:
        check(any(v["name"] == "data" and "emptyDir" in v for v in pod["volumes"]),
              f"{name}: emptyDir data volume without persistence")
    aff = pod.get("affinity", {}).get("podAntiAffinity", {})
    mode = nv["antiAffinity"]
    check(("requiredDuringSchedulingIgnoredDuringExecution" in aff) == (mode == "hard")
          and ("preferredDuringSchedulingIgnoredDuringExecution" in aff) == (mode == "soft"),
          f"{name}: node anti-affinity {mode}: {aff}")
    check((flag(c["args"], "ucx_listen") is not None) == nv["ucx"]["enabled"],
          f"{name}: --ucx_listen iff node.ucx.enabled")
    (headless,) = find(docs, "Service", f"{node_name}-headless")
    check(headless["spec"]["clusterIP"] == "None", f"{name}: node Service must be headless")
    check(sts["spec"]["serviceName"] == headless["metadata"]["name"],
          f"{name}: StatefulSet serviceName must be the headless Service")
    check(selects(headless["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"]),
          f"{name}: headless Service does not select the node pods")
    pdbs = find(docs, "PodDisruptionBudget", node_name)
    check(len(pdbs) == int(nv["podDisruptionBudget"]["enabled"]), f"{name}: node PDB switch")
    for pdb in pdbs:
        check(pdb["spec"]["maxUnavailable"] == nv["podDisruptionBudget"]["maxUnavailable"]
              and selects(pdb["spec"]["selector"]["matchLabels"],
                          sts["spec"]["template"]["metadata"]["labels"]),
              f"{name}: node PDB")

    # Workers.
    wv = values["worker"]
    (dep,) = find(docs, "Deployment", worker_name)
    wpod = dep["spec"]["template"]["spec"]
    (wc,) = wpod["containers"]
    check_pod(f"{name} worker", wpod, float(flag(wc["args"], "drain_seconds")), values)
    gpu = wv["gpu"]["resourceName"]
    limits = wc["resources"].get("limits", {})
    if wv["gpu"]["enabled"]:
        check(str(limits.get(gpu)) == str(wv["gpu"]["count"]), f"{name}: worker GPU limit")
        check(wc["image"].startswith(
            (values["images"]["registry"] + "/" if values["images"]["registry"] else "")
            + values["images"]["worker"]["repository"] + ":"), f"{name}: CUDA worker image")
    else:
        check(gpu not in limits and gpu not in wc["resources"].get("requests", {}),
              f"{name}: no GPU request when worker.gpu.enabled=false")
        check(values["images"]["workerCpu"]["repository"] in wc["image"],
              f"{name}: CPU worker image when gpu disabled")
    svc_domain = f"{node_name}-headless.{ns}.svc.{values['clusterDomain']}"
    nodes = flag(wc["args"], "nodes")
    port = nv["grpcPort"]
    if wv["nodeDiscovery"] == "dns":
        check(nodes == f"dns:///{svc_domain}:{port}", f"{name}: worker --nodes {nodes}")
    else:
        want = ",".join(f"{node_name}-{i}={node_name}-{i}.{svc_domain}:{port}"
                        for i in range(nv["replicas"]))
        check(nodes == want, f"{name}: worker --nodes {nodes} != {want}")
    model = wv["model"]
    check(flag(wc["args"], "model") == f"{model['mountPath']}/{model['file']}",
          f"{name}: worker --model")
    vols = {v["name"]: v for v in wpod["volumes"]}
    if model["source"] == "pvc":
        check(vols["models"]["persistentVolumeClaim"]["claimName"] == model["existingClaim"],
              f"{name}: model PVC")
    elif model["source"] == "hostPath":
        check(vols["models"]["hostPath"]["path"] == model["hostPath"], f"{name}: model hostPath")
    else:
        check("models" not in vols, f"{name}: no model volume when the model is in the image")
    (wsvc,) = find(docs, "Service", f"{worker_name}-headless")

    # Gateway.
    gv = values["gateway"]
    (gdep,) = find(docs, "Deployment", gw_name)
    gpod = gdep["spec"]["template"]["spec"]
    (gc,) = gpod["containers"]
    check_pod(f"{name} gateway", gpod, float(flag(gc["args"], "drain_seconds")), values)
    check(flag(gc["args"], "workers") ==
          f"dns:///{worker_name}-headless.{ns}.svc.{values['clusterDomain']}:{wv['grpcPort']}",
          f"{name}: gateway --workers {flag(gc['args'], 'workers')}")
    check(flag(gc["args"], "http_listen") == f"0.0.0.0:{gv['httpPort']}", f"{name}: --http_listen")
    (gsvc,) = find(docs, "Service", gw_name)
    check({p["name"] for p in gsvc["spec"]["ports"]} == {"grpc", "http", "metrics"}
          and gsvc["spec"]["type"] == gv["service"]["type"], f"{name}: gateway Service ports/type")
    hpas = find(docs, "HorizontalPodAutoscaler", gw_name)
    check(len(hpas) == int(gv["autoscaling"]["enabled"]), f"{name}: HPA switch")
    check(("replicas" in gdep["spec"]) != gv["autoscaling"]["enabled"],
          f"{name}: gateway replicas are left to the HPA when it is on")
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        check(ref["kind"] == "Deployment" and ref["name"] == gw_name, f"{name}: HPA target")
    ings = find(docs, "Ingress", gw_name)
    check(len(ings) == int(gv["ingress"]["enabled"]), f"{name}: Ingress switch")
    for ing in ings:
        be = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        check(be == {"name": gw_name, "port": {"name": "http"}}, f"{name}: Ingress backend {be}")

    # Monitoring.
    mon = values["monitoring"]
    sms = find(docs, "ServiceMonitor")
    check(len(sms) == int(mon["serviceMonitor"]["enabled"]), f"{name}: ServiceMonitor switch")
    for sm in sms:
        picked = [s for s in find(docs, "Service")
                  if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        jobs = sorted(s["metadata"]["labels"][sm["spec"]["jobLabel"]] for s in picked)
        check(jobs == ["kvr-gateway", "kvr-node", "kvr-worker"],
              f"{name}: ServiceMonitor selects jobs {jobs}")
        for s in picked:
            check(any(p["name"] == sm["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"]),
                  f"{name}: Service {s['metadata']['name']} lacks the metrics port")
        check(selects(mon["serviceMonitor"]["labels"], sm["metadata"]["labels"]),
              f"{name}: ServiceMonitor labels")
    rules = find(docs, "PrometheusRule")
    check(len(rules) == int(mon["prometheusRule"]["enabled"]), f"{name}: PrometheusRule switch")
    cms = [d for d in find(docs, "ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard")]
    check(len(cms) == (len(DASHBOARDS) if mon["dashboards"]["enabled"] else 0),
          f"{name}: one dashboard ConfigMap per dashboard")
    for cm in cms:
        check(cm["metadata"]["labels"]["grafana_dashboard"] == "1", f"{name}: dashboard label")
        check(cm["metadata"]["namespace"] == (mon["dashboards"]["namespace"] or ns),
              f"{name}: dashboard namespace")
        ((key, text),) = cm["data"].items()
        src = os.path.join(CHART, "dashboards", key[len("kvr-"):])
        with open(src) as f:
            check(text == f.read().rstrip("\n"), f"{name}: ConfigMap {key} differs from {src}")
    check(f"service/{gw_name}" in notes or (gv["ingress"]["enabled"] and gv["ingress"]["host"] in notes),
          f"{name}: NOTES.txt must say how to reach the gateway")
    check("/v1/completions" in notes, f"{name}: NOTES.txt shows the HTTP API")


def node_validate(work, manifests, dashboards):
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "manifests.json")
    with open(path, "w") as f:
        json.dump(manifests, f)
    proc = subprocess.run(
        ["node", os.path.join(HERE, "validate.mjs"), "--manifests", path,
         "--dashboards", ",".join(dashboards), "--work", os.path.join(work, "ts")],
        capture_output=True, text=True, cwd=HERE)
    return proc.returncode, proc.stdout + proc.stderr


def cmd_manifests(args):
    manifests = []
    for name, files in value_sets():
        values, docs, notes = render(args.render, args.work, name, files)
        check_render(name, values, docs, notes)
        for base, ds in docs.items():
            for i, d in enumerate(ds):
                manifests.append({"source": f"{name}/{base}#{i}", "object": d})
        print(f"rendered {name}: {sum(len(d) for d in docs.values())} manifests")
    rc, out = node_validate(args.work, manifests, [])
    print(out.strip())
    check(rc == 0, "schema validation of the rendered manifests failed")
    # The validator must catch what it claims to: a wrong type (JSON schema)
    # and an unknown field (strict type check).
    broken = copy.deepcopy(next(m for m in manifests if m["object"]["kind"] == "StatefulSet"))
    broken["source"] = "broken"
    broken["object"]["spec"]["replicas"] = "3"
    broken["object"]["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    rc, out = node_validate(os.path.join(args.work, "broken"), [broken], [])
    check(rc == 1 and "spec/replicas must be integer" in out and "livenessProbes" in out,
          f"the validator let a broken StatefulSet through:\n{out}")


def cmd_values(args):
    with open(os.path.join(CHART, "values.schema.json")) as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for name, files in value_sets():
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                  for e in validator.iter_errors(merged_values(files))]
        check(not errors, f"good values {name} rejected: {errors}")
    bad = sorted(glob.glob(os.path.join(VALUES_DIR, "bad", "*.yaml")))
    check(len(bad) >= 5, "want at least 5 bad values files")
    for path in bad:
        with open(path) as f:
            m = re.match(r"# expect: (\S+): (.*)", f.readline())
        if not check(m, f"{path}: first line must be '# expect: FIELD: MESSAGE'"):
            continue
        field, message = m.group(1), m.group(2).strip()
        errors = [(".".join(map(str, e.path)), e.message)
                  for e in validator.iter_errors(merged_values([path]))]
        ok = any(p == field and msg.startswith(message) for p, msg in errors)
        check(ok, f"{os.path.basename(path)}: want '{field}: {message}', got {errors}")
        print(f"rejected {os.path.basename(path)}: {errors}")


def render_default_rules(render_bin, work):
    """The PrometheusRule spec with the default thresholds (rules enabled)."""
    path = os.path.join(work, "rules-on.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"monitoring": {"prometheusRule": {"enabled": True}}}, f)
    _, docs, _ = render(render_bin, work, "rules-default", [path])
    (rule,) = find(docs, "PrometheusRule")
    return rule["spec"]


def cmd_rules(args):
    spec = render_default_rules(args.render, args.work)
    path = os.path.join(args.work, "kvr-rules.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    proc = subprocess.run([args.promtool, "check", "rules", path], capture_output=True, text=True)
    print(proc.stdout.strip(), proc.stderr.strip())
    check(proc.returncode == 0, f"promtool check rules failed: {proc.stdout} {proc.stderr}")
    alerts = {r["alert"] for g in spec["groups"] for r in g["rules"] if "alert" in r}
    check({"KvrNodeDown", "KvrAttendLatencyHigh", "KvrNodeMemoryBudgetNearlyFull",
           "KvrGatewayErrorRateHigh"} <= alerts, f"missing alerts: {alerts}")
    # Alert behaviour on synthetic series (promtool's rule unit tests).
    test = os.path.join(args.work, "rules_test.yaml")
    with open(os.path.join(HERE, "rules_test.yaml")) as f:
        text = f.read()
    with open(test, "w") as f:
        f.write(text)
    proc = subprocess.run([args.promtool, "test", "rules", test], capture_output=True, text=True,
                          cwd=args.work)
    print(proc.stdout.strip(), proc.stderr.strip())
    check(proc.returncode == 0, "promtool test rules failed")
    # deploy/prometheus/kvr-rules.yaml is the default render, kept in sync.
    shipped = os.path.join(ROOT, "deploy", "prometheus", "kvr-rules.yaml")
    if args.write_shipped:
        with open(shipped, "w") as f:
            f.write("# Generated from helm/kvr/rules/kvr-alerts.yaml with the chart's default\n"
                    "# values (tests/deploy/deploy_checks.py rules --write-shipped); do not edit.\n")
            yaml.safe_dump(spec, f, sort_keys=False, width=100)
    with open(shipped) as f:
        check(yaml.safe_load(f) == spec,
              f"{shipped} differs from the chart's rules rendered with default values; "
              f"regenerate it: python3 tests/deploy/deploy_checks.py rules --render BIN "
              f"--work DIR --write-shipped")


def dashboard_exprs(d):
    """(panel title, refId, expr) of every Prometheus target."""
    for p in d["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["refId"], t["expr"]


def cmd_dashboards(args):
    check(len(DASHBOARDS) == 3, f"want 3 dashboards, have {DASHBOARDS}")
    uids = set()
    for path in DASHBOARDS:
        name = os.path.basename(path)
        with open(path) as f:
            d = json.load(f)
        for key, typ in (("uid", str), ("title", str), ("schemaVersion", int),
                         ("panels", list), ("templating", dict)):
            check(isinstance(d.get(key), typ), f"{name}: {key} must be a {typ.__name__}")
        check(d["uid"] not in uids and len(d["uid"]) <= 40, f"{name}: uid unique and <= 40")
        uids.add(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        check(len(ids) == len(set(ids)), f"{name}: panel ids must be unique: {ids}")
        vars_ = {v["name"] for v in d["templating"]["list"]}
        cells = set()
        for p in d["panels"]:
            where = f"{name} panel {p['id']} {p['title']!r}"
            g = p.get("gridPos", {})
            check(all(isinstance(g.get(k), int) for k in "xywh") and g["x"] + g["w"] <= 24,
                  f"{where}: gridPos {g}")
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    check((x, y) not in cells, f"{where}: overlaps another panel at {x},{y}")
                    cells.add((x, y))
            check(p.get("targets"), f"{where}: no targets")
            refs = [t["refId"] for t in p["targets"]]
            check(len(refs) == len(set(refs)), f"{where}: refIds must be unique")
            for t in p["targets"]:
                check(t.get("expr"), f"{where}: target {t.get('refId')} has no expr")
                ds = t.get("datasource", p.get("datasource", {}))
                check(ds.get("type") == "prometheus", f"{where}: datasource must be Prometheus")
                uid_var = re.fullmatch(r"\$\{(\w+)\}", ds.get("uid", ""))
                check(uid_var and uid_var.group(1) in vars_,
                      f"{where}: datasource uid must be a dashboard variable")
                for var in re.findall(r"\$(\w+)", t["expr"]):
                    check(var == "__rate_interval" or var in vars_,
                          f"{where}: unknown variable ${var}")
        print(f"{name}: {len(d['panels'])} panels, "
              f"{sum(1 for _ in dashboard_exprs(d))} queries")
    # deploy/grafana links to the chart's files (one source).
    for path in DASHBOARDS:
        link = os.path.join(ROOT, "deploy", "grafana", os.path.basename(path))
        check(os.path.realpath(link) == os.path.realpath(path),
              f"{link} must be a symlink to {path}")
    rc, out = node_validate(args.work, [], DASHBOARDS)
    print(out.strip())
    check(rc == 0, "Grafana schema type check failed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=["manifests", "values", "rules", "dashboards"])
    parser.add_argument("--render", help="the tests/deploy/render binary")
    parser.add_argument("--work", required=True, help="scratch directory")
    parser.add_argument("--promtool", default=shutil.which("promtool") or "/usr/bin/promtool")
    parser.add_argument("--write-shipped", action="store_true",
                        help="rules: (re)write deploy/prometheus/kvr-rules.yaml")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    {"manifests": cmd_manifests, "values": cmd_values, "rules": cmd_rules,
     "dashboards": cmd_dashboards}[args.check](args)
    for f in failures:
        print("FAIL:", f)
    print(f"{args.check}: {'FAILED (%d)' % len(failures) if failures else 'passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
