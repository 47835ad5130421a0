#!/usr/bin/python3
"""Offline checks of the kvr Helm chart, its rules and dashboards.

    deploy_checks.py manifests  --render BIN --work DIR
    deploy_checks.py values     --work DIR
    deploy_checks.py rules      --render BIN --work DIR [--promtool PATH]
    deploy_checks.py dashboards --work DIR
    deploy_checks.py flags      --render BIN --work DIR --binary ROLE=PATH ...

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
flags: every flag the chart renders (args and exec probes) is one the
  built binary defines (--binary ROLE=PATH; a binary without a feature's
  marker flag is reported as predating it).
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
GOLDEN_DIR = os.path.join(HERE, "golden")
# What `insecure: true` (with NetworkPolicies off) must render: the plaintext
# chart exactly as it was before TLS, API keys and NetworkPolicies existed
# (golden/plaintext-<value set>.yaml, written from that chart).
PLAINTEXT_OVERLAY = {"insecure": True, "networkPolicy": {"enabled": False}}

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


def check_pod(where, pod_spec, drain_flag_seconds, values, role):
    """Probes, graceful termination and hardening of one pod template."""
    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    pre_stop = values["termination"]["preStopSleepSeconds"]
    check(grace > pre_stop + drain_flag_seconds,
          f"{where}: terminationGracePeriodSeconds {grace} <= preStop {pre_stop} + drain "
          f"{drain_flag_seconds}")
    check(pod_spec["securityContext"].get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
    for c in pod_spec["containers"]:
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe not in c:
                check(probe == "startupProbe", f"{where}: no {probe}")
                continue
            p = c[probe]
            if role != "gateway" and not values["insecure"]:
                # mTLS port: kubelet's gRPC probe cannot connect.
                check_tls_probe(f"{where} {probe}", p, c, ports, values)
            elif role == "gateway" and not values["insecure"] and \
                    values["tls"]["public"]["secretName"]:
                # Public TLS: its certificate need not name 127.0.0.1.
                check({"livenessProbe": p.get("tcpSocket") == {"port": "grpc"},
                       "readinessProbe": p.get("httpGet") == {"path": "/healthz", "port": "http"}
                       }[probe], f"{where}: {probe} with public TLS must be tcpSocket grpc "
                                 f"(liveness) or GET /healthz (readiness): {p}")
            else:
                # Plaintext port (the gateway's is client-facing, never mTLS).
                check("grpc" in p and p["grpc"]["port"] == ports.get("grpc"),
                      f"{where}: {probe} must be a native gRPC probe on the grpc port {ports}")
        check(flag(c["args"], "listen") == f"0.0.0.0:{ports['grpc']}",
              f"{where}: --listen does not match the grpc port")
        check(flag(c["args"], "metrics_listen") == f"0.0.0.0:{ports['metrics']}",
              f"{where}: --metrics_listen does not match the metrics port")
        check(c["securityContext"].get("readOnlyRootFilesystem") is True,
              f"{where}: readOnlyRootFilesystem")


def probe_service(probe):
    """The grpc.health.v1 service a native or kvr_health_probe probe asks for."""
    if "grpc" in probe:
        return probe["grpc"].get("service", "")
    if "exec" in probe:
        return flag(probe["exec"]["command"], "service") or ""
    return None


def check_tls_probe(where, probe, container, ports, values):
    """With mTLS, kubelet's gRPC probe cannot connect: the probe must exec the
    image's kvr_health_probe on 127.0.0.1:<grpc port> with the same
    certificate files as the server, and give up before kubelet's timeout."""
    cmd = probe.get("exec", {}).get("command", [])
    if not check(cmd and cmd[0].endswith("/kvr_health_probe"),
                 f"{where}: must exec kvr_health_probe under mTLS, got {probe}"):
        return
    check(flag(cmd, "addr") == f"127.0.0.1:{ports['grpc']}", f"{where}: --addr {flag(cmd, 'addr')}")
    for f in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
        check(flag(cmd, f) is not None and flag(cmd, f) == flag(container["args"], f),
              f"{where}: --{f} {flag(cmd, f)} != the server's {flag(container['args'], f)}")
    timeout_ms = int(flag(cmd, "timeout_ms") or 2000)
    check(timeout_ms < 1000 * probe.get("timeoutSeconds", 1),
          f"{where}: --timeout_ms {timeout_ms} must end before timeoutSeconds "
          f"{probe.get('timeoutSeconds', 1)}")


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
    check_pod(f"{name} node", pod, float(flag(c["args"], "drain_seconds")), values, "node")
    check(probe_service(c["readinessProbe"]) == "kvr.v1.RetrievalNode",
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
    check_pod(f"{name} worker", wpod, float(flag(wc["args"], "drain_seconds")), values,
              "worker")
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
    check_pod(f"{name} gateway", gpod, float(flag(gc["args"], "drain_seconds")), values,
              "gateway")
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
    # Host names callers verify: workers dial --nodes (and nodes dial each
    # other by pod name under the headless Service), the gateway --workers.
    clients = {"node": [a.rsplit(":", 1)[0].split("=")[-1].replace("dns:///", "")
                        for a in nodes.split(",")] + [f"{node_name}-0.{svc_domain}"],
               "worker": [flag(gc["args"], "workers").replace("dns:///", "").rsplit(":", 1)[0]],
               "gateway": [f"{gw_name}.{ns}.svc.{values['clusterDomain']}"]}
    pods = {"node": (pod, c, sts["spec"]["template"]["metadata"]["labels"]),
            "worker": (wpod, wc, dep["spec"]["template"]["metadata"]["labels"]),
            "gateway": (gpod, gc, gdep["spec"]["template"]["metadata"]["labels"])}
    check_security(name, values, docs, pods, clients)
    if name == "default":
        # Secure by default: mTLS flags on every component, API keys at the
        # gateway, the three NetworkPolicies.
        for role, (_, cont, _) in pods.items():
            check(flag(cont["args"], "tls_cert_file") is not None,
                  f"default: {role} has no --tls_cert_file (the chart must default to mTLS)")
        check(flag(gc["args"], "api_keys_file") is not None,
              "default: the gateway has no --api_keys_file (API keys must default on)")
        check(len(find(docs, "NetworkPolicy")) == 3, "default: NetworkPolicies must default on")
    check(f"service/{gw_name}" in notes or (gv["ingress"]["enabled"] and gv["ingress"]["host"] in notes),
          f"{name}: NOTES.txt must say how to reach the gateway")
    check("/v1/completions" in notes, f"{name}: NOTES.txt shows the HTTP API")
    keys = bool(flag(gc["args"], "api_keys_file"))
    check(("Authorization: Bearer" in notes) == keys
          and ("WARNING: apiKeys.enabled=false" in notes) == (not keys and not values["insecure"]),
          f"{name}: NOTES.txt shows the Authorization header iff API keys are on, and warns "
          f"when a secure install has them off")
    public = not values["insecure"] and values["tls"]["public"]["secretName"]
    check(("grpcurl -plaintext" in notes) == (not public)
          and ("WARNING: insecure" in notes) == values["insecure"],
          f"{name}: NOTES.txt: plaintext grpcurl unless public TLS, the warning iff insecure")
    for v in pods.values():
        for vol in v[0]["volumes"]:
            if vol["name"] in ("tls", "api-keys"):
                check(vol["secret"]["secretName"] in notes,
                      f"{name}: NOTES.txt must name Secret {vol['secret']['secretName']}")


def plaintext_objects(docs):
    """[{source, object}] of a render, less the dashboard ConfigMaps (checked
    byte-equal to their files above)."""
    return [{"source": f"{base}#{i}", "object": d} for base, ds in sorted(docs.items())
            if base != "dashboards.yaml" for i, d in enumerate(ds)]


def check_plaintext(render_bin, work, write_golden):
    """`insecure: true` + networkPolicy off renders the pre-TLS chart exactly;
    `insecure: true` alone adds NetworkPolicies and nothing else."""
    overlay = os.path.join(work, "plaintext-overlay.yaml")
    with open(overlay, "w") as f:
        yaml.safe_dump(PLAINTEXT_OVERLAY, f)
    insecure_only = os.path.join(work, "insecure-only.yaml")
    with open(insecure_only, "w") as f:
        yaml.safe_dump({"insecure": True}, f)
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    # The value sets that existed before TLS (the later ones configure TLS and
    # API keys, which the old chart did not have).
    checked = 0
    for name, files in value_sets():
        golden = os.path.join(GOLDEN_DIR, f"plaintext-{name}.yaml")
        if not write_golden and not os.path.exists(golden):
            continue
        checked += 1
        _, docs, _ = render(render_bin, work, f"plaintext-{name}", files + [overlay])
        got = plaintext_objects(docs)
        if write_golden:
            with open(golden, "w") as f:
                f.write("# The chart's plaintext render (insecure: true, networkPolicy.enabled: false)\n"
                        f"# with {'values/' + name + '.yaml' if files else 'the default values'}; generated by deploy_checks.py manifests\n"
                        "# --write-golden from the chart before TLS; do not edit.\n")
                yaml.safe_dump(got, f, sort_keys=False, width=100)
        with open(golden) as f:
            want = yaml.safe_load(f)
        if not check(got == want, f"plaintext-{name}: insecure render differs from {golden}"):
            import difflib
            a = yaml.safe_dump(want, sort_keys=False).splitlines()
            b = yaml.safe_dump(got, sort_keys=False).splitlines()
            print("\n".join(list(difflib.unified_diff(a, b, "golden", "render", lineterm=""))[:80]))
        _, docs, _ = render(render_bin, work, f"insecure-{name}", files + [insecure_only])
        extra = [o for o in plaintext_objects(docs) if o not in want]
        kinds = sorted({o["object"]["kind"] for o in extra})
        check(kinds == ["NetworkPolicy"] and len(plaintext_objects(docs)) == len(want) + len(extra),
              f"insecure-{name}: insecure: true must add only NetworkPolicies to the plaintext "
              f"chart, added {kinds}")
    check(checked >= 4, f"want the 4 golden plaintext renders, found {checked}")


ROLES = ("node", "worker", "gateway")
CERT_MANAGER_APIS = "cert-manager.io/v1"


def dns_matches(pattern, host):
    """RFC 6125 matching of one DNS SAN (a leading "*." covers one label)."""
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


def peer_matches(peer, policy_ns, pod):
    """Whether a NetworkPolicyPeer selects pod = (namespace, ns labels, labels)."""
    ns, ns_labels, labels = pod
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"].get("matchLabels", {}), ns_labels):
            return False
    elif ns != policy_ns:
        return False
    return selects(peer.get("podSelector", {}).get("matchLabels", {}), labels)


def admits(policies, policy_ns, target_labels, source, port):
    """Kubernetes' ingress rule evaluation: traffic from source to a pod with
    target_labels on TCP port is allowed when no policy selects the pod, or
    some rule of a selecting policy matches both the source and the port."""
    selecting = [p for p in policies
                 if selects(p["spec"]["podSelector"].get("matchLabels", {}), target_labels)]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            peers = rule.get("from")
            ports = rule.get("ports")
            if peers is not None and not any(peer_matches(x, policy_ns, source) for x in peers):
                continue
            if ports is not None and not any(x.get("protocol", "TCP") == "TCP"
                                             and x.get("port") == port for x in ports):
                continue
            return True
    return False


def image_files():
    """{Dockerfile stage: files COPY'd into it (absolute paths)}, with the
    files of the stage it is built FROM."""
    stages, cur = {}, None
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 4 and words[0] == "FROM" and words[2].upper() == "AS":
            cur = words[3]
            stages[cur] = set(stages.get(words[1], set()))
        elif words and words[0] == "COPY" and cur:
            paths = [w for w in words[1:] if not w.startswith("--")]
            dest = paths[-1]
            for src in paths[:-1]:
                stages[cur].add(os.path.join(dest, os.path.basename(src))
                                if dest.endswith("/") else dest)
    return stages


def image_stage(values, role):
    """The deploy/Dockerfile target a role's pods run."""
    if role == "worker":
        return "worker" if values["worker"]["gpu"]["enabled"] else "worker-cpu"
    return role


def peer_source(peer, ns, other_ns):
    """A pod that the NetworkPolicyPeer describes: its pod labels, in a
    namespace carrying its namespaceSelector's labels (or the release's)."""
    labels = dict(peer.get("podSelector", {}).get("matchLabels", {}))
    if "namespaceSelector" not in peer:
        return (ns, {"kubernetes.io/metadata.name": ns}, labels)
    return (other_ns, dict(peer["namespaceSelector"].get("matchLabels", {})), labels)


def check_security(name, values, docs, pods, clients):
    """mTLS flags, certificate Secrets and cert-manager objects, API keys and
    NetworkPolicies against the values (pods: role -> (pod template, its
    container); clients: role -> the host names its callers dial)."""
    fullname = values["fullnameOverride"] or "kvr"
    ns = "serving"
    tls_on = not values["insecure"]
    tv = values["tls"]
    secrets = {}
    for role in ROLES:
        pod, c, _ = pods[role]
        args = c["args"]
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        if not tls_on:
            check(not [a for a in args if a.startswith(("--tls_", "--public_tls_", "--ucx_allow"))]
                  and "tls" not in vols and "public-tls" not in vols,
                  f"{name} {role}: insecure must render no TLS flags or volumes: {args}")
            continue
        d = tv["mountPath"]
        want = {"tls_cert_file": f"{d}/tls.crt", "tls_key_file": f"{d}/tls.key",
                "tls_ca_file": f"{d}/ca.crt", "tls_reload_seconds": str(tv["reloadSeconds"]),
                "tls_allowed_peers": tv[role].get("allowedPeers") or None}
        for f, v in want.items():
            check(flag(args, f) == v, f"{name} {role}: --{f}={flag(args, f)}, want {v}")
        secret = tv[role]["secretName"] or f"{fullname}-{role}-tls"
        secrets[role] = secret
        check(vols.get("tls", {}).get("secret", {}).get("secretName") == secret,
              f"{name} {role}: tls volume must be Secret {secret}: {vols.get('tls')}")
        m = mounts.get("tls", {})
        check(m.get("mountPath") == d and m.get("readOnly") is True and "subPath" not in m,
              f"{name} {role}: the certificate Secret must be mounted read-only as a directory "
              f"at {d} (a subPath mount never sees rotated files): {m}")
        check(vols["tls"]["secret"].get("defaultMode") == 0o440,
              f"{name} {role}: certificate files mode 0440")
        # The exec probe's binary is in the role's image.
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            cmd = c.get(probe, {}).get("exec", {}).get("command")
            if cmd:
                files = image_files().get(image_stage(values, role), set())
                check(cmd[0] in files, f"{name} {role}: {probe} runs {cmd[0]}, which the "
                      f"Dockerfile's {image_stage(values, role)} stage does not copy: {files}")
        if role != "gateway":
            check_tls_probe(f"{name} {role} readiness", c["readinessProbe"], c,
                            {p["name"]: p["containerPort"] for p in c["ports"]}, values)
    # UCX: unencrypted, so only when explicitly allowed (the render fails otherwise).
    ucx = values["node"]["ucx"]["enabled"]
    for role in ("node", "worker"):
        check(("--ucx_allow_unencrypted" in pods[role][1]["args"]) == (ucx and tls_on),
              f"{name} {role}: --ucx_allow_unencrypted iff UCX with TLS")

    # Public (server-only) TLS on the gateway's gRPC port.
    gpod, gc, _ = pods["gateway"]
    public = tls_on and tv["public"]["secretName"]
    gvols = {v["name"]: v for v in gpod["volumes"]}
    check(bool(flag(gc["args"], "public_tls_cert_file")) == bool(public)
          and bool(flag(gc["args"], "public_tls_key_file")) == bool(public),
          f"{name}: --public_tls_* iff tls.public.secretName")
    if public:
        check(gvols.get("public-tls", {}).get("secret", {}).get("secretName") == public,
              f"{name}: public TLS volume")

    # cert-manager.
    cm = tv["certManager"]
    certs = {d["metadata"]["name"]: d for d in find(docs, "Certificate")}
    issuers = {d["metadata"]["name"]: d for d in find(docs, "Issuer")}
    if not (tls_on and cm["enabled"]):
        check(not certs and not issuers, f"{name}: cert-manager objects without certManager")
    else:
        role_certs = {}
        for role in ROLES:
            cert = certs.get(f"{fullname}-{role}")
            if not check(cert, f"{name}: no Certificate for {role}: {sorted(certs)}"):
                continue
            role_certs[role] = cert
            spec = cert["spec"]
            check(spec["secretName"] == secrets[role],
                  f"{name} {role}: Certificate writes {spec['secretName']}, pods mount "
                  f"{secrets[role]}")
            check(spec["commonName"] == f"kvr-{role}", f"{name} {role}: CN {spec['commonName']}")
            check({"server auth", "client auth"} <= set(spec["usages"]),
                  f"{name} {role}: usages {spec['usages']}")
            check("127.0.0.1" in spec.get("ipAddresses", []),
                  f"{name} {role}: IP SAN 127.0.0.1 for the exec probe")
            for host in clients[role]:
                check(any(dns_matches(p, host) for p in spec["dnsNames"]),
                      f"{name} {role}: callers dial {host}, not in dnsNames {spec['dnsNames']}")
        refs = {r: c["spec"]["issuerRef"] for r, c in role_certs.items()}
        if cm["issuerRef"]:
            want = {"name": cm["issuerRef"]["name"],
                    "kind": cm["issuerRef"].get("kind", "Issuer"),
                    "group": cm["issuerRef"].get("group", "cert-manager.io")}
            check(all(r == want for r in refs.values()) and not issuers
                  and set(certs) == {f"{fullname}-{r}" for r in ROLES},
                  f"{name}: role certificates must use issuerRef {want}: {refs}")
        else:
            # selfSigned Issuer -> CA Certificate (kvr-ca) -> CA Issuer -> roles.
            ca_issuers = [i for i in issuers.values() if "ca" in i["spec"]]
            self_signed = [i for i in issuers.values() if "selfSigned" in i["spec"]]
            ca_certs = [c for c in certs.values() if c["spec"].get("isCA")]
            if check(len(ca_issuers) == 1 and len(self_signed) == 1 and len(ca_certs) == 1,
                     f"{name}: want one selfSigned Issuer, one CA Certificate, one CA Issuer"):
                (ca_issuer,), (ss,), (ca_cert,) = ca_issuers, self_signed, ca_certs
                check(ca_cert["spec"]["commonName"] == "kvr-ca"
                      and ca_cert["spec"]["issuerRef"]["name"] == ss["metadata"]["name"],
                      f"{name}: the CA Certificate must be kvr-ca from the selfSigned Issuer")
                check(ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"],
                      f"{name}: the CA Issuer must sign with the CA Certificate's Secret")
                want = {"name": ca_issuer["metadata"]["name"], "kind": "Issuer",
                        "group": "cert-manager.io"}
                check(all(r == want for r in refs.values()),
                      f"{name}: role certificates must use the CA Issuer: {refs}")

    # API keys.
    kv = values["apiKeys"]
    keys_on = kv["enabled"] and (tls_on or bool(kv["existingSecret"]) or bool(kv["keys"]))
    keys_file = flag(gc["args"], "api_keys_file")
    check(bool(keys_file) == keys_on, f"{name}: --api_keys_file {keys_file}, want keys {keys_on}")
    made = [d for d in find(docs, "Secret") if d["metadata"]["name"].endswith("-api-keys")]
    if keys_on:
        secret = kv["existingSecret"] or f"{fullname}-gateway-api-keys"
        vol = gvols.get("api-keys", {}).get("secret", {})
        check(vol.get("secretName") == secret, f"{name}: api-keys volume {vol}, want {secret}")
        (m,) = [m for m in gc["volumeMounts"] if m["name"] == "api-keys"]
        check("subPath" not in m and keys_file == f"{m['mountPath']}/{kv['secretKey']}"
              and any(i["key"] == kv["secretKey"] for i in vol.get("items", [])),
              f"{name}: --api_keys_file must be the mounted Secret's {kv['secretKey']}: {m}")
        check(flag(gc["args"], "api_keys_reload_seconds") == str(kv["reloadSeconds"]),
              f"{name}: --api_keys_reload_seconds")
        if kv["keys"] and not kv["existingSecret"]:
            if check(len(made) == 1 and made[0]["metadata"]["name"] == secret,
                     f"{name}: want the Secret {secret} from apiKeys.keys, got {made}"):
                body = json.loads(made[0]["stringData"][kv["secretKey"]])
                want = {"keys": [{"id": k["id"], "salt": k["salt"], "sha256": k["sha256"],
                                  "max_concurrent": int(k.get("max_concurrent", 0)),
                                  "tokens_per_minute": int(k.get("tokens_per_minute", 0))}
                                 for k in kv["keys"]]}
                check(body == want, f"{name}: keys file {body} != {want}")
        else:
            check(not made, f"{name}: no API-key Secret when existingSecret or no keys")
    else:
        check(not made and "api-keys" not in gvols, f"{name}: API keys off")

    # NetworkPolicies, evaluated: who may reach which port of which component.
    nps = find(docs, "NetworkPolicy")
    check(len(nps) == (3 if values["networkPolicy"]["enabled"] else 0),
          f"{name}: {len(nps)} NetworkPolicies")
    if not nps:
        return
    for p in nps:
        check(p["spec"].get("policyTypes") == ["Ingress"] and "egress" not in p["spec"],
              f"{name}: {p['metadata']['name']}: Ingress-only policies")
    labels = {r: pods[r][2] for r in ROLES}
    ports = {r: {pt["name"]: pt["containerPort"] for pt in pods[r][1]["ports"]} for r in ROLES}
    stranger = ("other", {"kubernetes.io/metadata.name": "other"}, {"app": "curl"})
    neighbour = (ns, {"kubernetes.io/metadata.name": ns}, {"app": "curl"})
    src = {r: (ns, {"kubernetes.io/metadata.name": ns}, labels[r]) for r in ROLES}
    ucx_port = values["node"]["ucx"]["port"]

    def allowed(source, role, port):
        return admits(nps, ns, labels[role], source, port)

    def want(cond, source_name, source, role, port):
        got = allowed(source, role, port)
        check(got == cond, f"{name}: {source_name} -> {role}:{port} "
                           f"{'allowed' if got else 'denied'}, want the opposite")

    # Prometheus: the pod networkPolicy.prometheus describes reaches every
    # metrics port and no gRPC port of a node or worker; other pods only
    # when a peer selects them too.
    np_prom = values["networkPolicy"]["prometheus"]
    for peer in np_prom:
        prom = peer_source(peer, ns, "monitoring")
        for role in ROLES:
            want(True, f"prometheus {peer}", prom, role, ports[role]["metrics"])
        for role in ("node", "worker"):
            want(False, f"prometheus {peer}", prom, role, ports[role]["grpc"])
    for role in ROLES:
        want(any(peer_matches(x, ns, stranger) for x in np_prom), "a pod of another namespace",
             stranger, role, ports[role]["metrics"])
    # Nodes: workers and nodes on gRPC; workers on UCX iff UCX; never the gateway.
    want(True, "worker", src["worker"], "node", ports["node"]["grpc"])
    want(True, "node", src["node"], "node", ports["node"]["grpc"])
    want(False, "gateway", src["gateway"], "node", ports["node"]["grpc"])
    want(False, "a pod of the namespace", neighbour, "node", ports["node"]["grpc"])
    want(ucx, "worker", src["worker"], "node", ucx_port)
    want(False, "gateway", src["gateway"], "node", ucx_port)
    if not ucx:
        want(False, "worker", src["worker"], "node", ports["node"]["metrics"])
    # Workers: the gateway only (and nodes' UCX connections when UCX is on).
    want(True, "gateway", src["gateway"], "worker", ports["worker"]["grpc"])
    want(ucx, "node", src["node"], "worker", ports["worker"]["grpc"])
    want(False, "a pod of the namespace", neighbour, "worker", ports["worker"]["grpc"])
    want(False, "worker", src["worker"], "worker", ports["worker"]["grpc"])
    # Gateway: networkPolicy.gateway.from (default any) on gRPC and HTTP.
    gw_from = values["networkPolicy"]["gateway"]["from"]
    for port in (ports["gateway"]["grpc"], ports["gateway"]["http"]):
        for who, pod in (("a pod of another namespace", stranger),
                         ("a pod of the namespace", neighbour)):
            want(not gw_from or any(peer_matches(x, ns, pod) for x in gw_from), who, pod,
                 "gateway", port)
        for peer in gw_from:
            want(True, f"peer {peer}", peer_source(peer, ns, "ingress"), "gateway", port)


def render_fails(render_bin, work, name, overlay, message):
    """The chart must refuse overlay with an error containing message."""
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(overlay, f)
    out = os.path.join(work, "render", name)
    proc = subprocess.run([render_bin, "--chart", CHART, "--out", out, "--release", "kvr",
                           "--namespace", "serving", "-f", path], capture_output=True, text=True)
    check(proc.returncode != 0 and message in proc.stderr,
          f"{name}: want a render error naming '{message}', got rc {proc.returncode}: "
          f"{proc.stderr.strip()}")


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
    check_plaintext(args.render, args.work, args.write_golden)
    # Unencrypted UCX under mTLS only when asked for; a named issuer needs a name.
    render_fails(args.render, args.work, "ucx-tls", {"node": {"ucx": {"enabled": True}}},
                 "node.ucx.allowUnencrypted")
    render_fails(args.render, args.work, "issuer-no-name",
                 {"tls": {"certManager": {"enabled": True, "issuerRef": {"kind": "ClusterIssuer"}}}},
                 "tls.certManager.issuerRef.name")
    entry = {"salt": "00" * 16, "sha256": "ab" * 32}
    render_fails(args.render, args.work, "duplicate-key-id",
                 {"apiKeys": {"keys": [dict(entry, id="team-a"), dict(entry, id="team-a")]}},
                 'id "team-a" appears twice')
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
    # ... and a cert-manager Certificate with a usage cert-manager does not know.
    certs = [m for m in manifests if m["object"]["kind"] == "Certificate"
             and not m["object"]["spec"].get("isCA")]
    if not check(certs, "no value set renders a role Certificate"):
        return
    cert = copy.deepcopy(certs[0])
    cert["source"] = "broken-certificate"
    cert["object"]["spec"]["usages"] = ["server auth", "clientAuth"]
    rc, out = node_validate(os.path.join(args.work, "broken-certificate"), [cert], [])
    check(rc == 1 and "spec/usages/1 must be equal to one of the allowed values" in out,
          f"the validator let a broken Certificate through:\n{out}")


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


# Flags of issue 16's features, by the flag whose presence shows that a
# binary has the feature: a binary without the marker predates the feature
# (its flags are reported, not failed); one with it must know every flag of
# the group the chart passes.
FEATURE_FLAGS = {
    "tls_cert_file": {"tls_cert_file", "tls_key_file", "tls_ca_file", "tls_reload_seconds",
                      "tls_allowed_peers", "ucx_allow_unencrypted", "public_tls_cert_file",
                      "public_tls_key_file"},
    "api_keys_file": {"api_keys_file", "api_keys_reload_seconds"},
}


def known_flags(binary):
    """The flags a binary accepts: absl's --helpfull, or kvr_health_probe's usage."""
    proc = subprocess.run([binary, "--helpfull"], capture_output=True, text=True, timeout=60)
    text = proc.stdout + proc.stderr
    if "Flags from" in text:
        return set(re.findall(r"^\s+--([a-z0-9_]+) \(", text, re.M))
    usage = text[text.find("usage:"):] if "usage:" in text else ""
    return set(re.findall(r"--([a-z0-9_]+)", usage))


def cmd_flags(args):
    """Every flag the chart passes (container args and exec probes, every value
    set) must be one the binary it is passed to defines."""
    binaries = dict(b.split("=", 1) for b in args.binary)
    known = {role: known_flags(path) for role, path in binaries.items()}
    pending = set()
    checked = 0
    for name, files in value_sets():
        values, docs, _ = render(args.render, args.work, name, files)
        fullname = values["fullnameOverride"] or "kvr"
        for d in find(docs, "StatefulSet") + find(docs, "Deployment"):
            role = d["metadata"]["name"][len(fullname) + 1:]
            for c in d["spec"]["template"]["spec"]["containers"]:
                uses = [(role, c["args"])]
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    cmd = c.get(probe, {}).get("exec", {}).get("command")
                    if cmd:
                        check(os.path.basename(cmd[0]) == "kvr_health_probe",
                              f"{name} {role}: {probe} runs {cmd[0]}")
                        uses.append(("probe", cmd[1:]))
                for who, argv in uses:
                    if who not in known:
                        pending.add(f"{who}: no binary given (not built)")
                        continue
                    for a in argv:
                        f = a[2:].split("=", 1)[0]
                        checked += 1
                        if f in known[who]:
                            continue
                        marker = next((m for m, g in FEATURE_FLAGS.items() if f in g), None)
                        if marker and marker not in known[who]:
                            pending.add(f"{who} --{f}")
                            continue
                        check(False, f"{name}: the chart passes --{f} to {who} "
                                     f"({binaries[who]}), which does not define it")
    for p in sorted(pending):
        print(f"not checked (the binary predates the feature): {p}")
    print(f"flags: {checked} flag uses checked against {sorted(binaries)}")


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
    parser.add_argument("check", choices=["manifests", "values", "rules", "dashboards", "flags"])
    parser.add_argument("--binary", action="append", default=[],
                        help="flags: ROLE=PATH (node, worker, gateway, probe)")
    parser.add_argument("--render", help="the tests/deploy/render binary")
    parser.add_argument("--work", required=True, help="scratch directory")
    parser.add_argument("--promtool", default=shutil.which("promtool") or "/usr/bin/promtool")
    parser.add_argument("--write-shipped", action="store_true",
                        help="rules: (re)write deploy/prometheus/kvr-rules.yaml")
    parser.add_argument("--write-golden", action="store_true",
                        help="manifests: (re)write golden/plaintext-*.yaml (only when the "
                             "plaintext chart is meant to change)")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    {"manifests": cmd_manifests, "values": cmd_values, "rules": cmd_rules,
     "dashboards": cmd_dashboards, "flags": cmd_flags}[args.check](args)
    for f in failures:
        print("FAIL:", f)
    print(f"{args.check}: {'FAILED (%d)' % len(failures) if failures else 'passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
