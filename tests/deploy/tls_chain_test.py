#!/usr/bin/python3
"""The chart's mTLS wiring against the real binaries: node, worker, gateway.

    tls_chain_test.py --render BIN --node_binary KVR_NODE --worker_binary KVR_WORKER
                      --gateway_binary KVR_GATEWAY --health_probe PROBE
                      --openssl OPENSSL --model_dir DIR --work DIR

1. Renders the chart with its default (secure) values, a CPU worker
   (worker.gpu.enabled=false) and API keys off (apiKeys.enabled=false: this
   test is about TLS; deploy_manifests checks the keys' wiring).
2. Makes one CA and a certificate per role as the chart documents them (EC
   P-256, CN kvr-node / kvr-worker / kvr-gateway, SANs DNS:localhost and
   IP:127.0.0.1, EKU serverAuth + clientAuth) with the openssl command, each
   laid out like its mounted Secret (tls.crt, tls.key, ca.crt), plus a
   certificate from another CA.
3. Starts kvr_node, kvr_worker and kvr_gateway with their rendered container
   arguments, changed only where a pod differs from a test: --listen and
   --http_listen on 127.0.0.1:0, no metrics ports, a temporary --data_dir,
   --threads=1, the model directory, --nodes / --workers naming the started
   servers, and each Secret's mount path replaced by its directory; every
   --tls_* flag, and --tls_allowed_peers, is the chart's.
4. Each rendered exec probe of the node and the worker (startup, liveness,
   readiness) must exit 0. A probe without certificate flags (what kubelet's
   native gRPC probe would do) and one presenting the other CA's
   certificate must fail: the servers require the client certificate the
   chart hands its probes.
5. A completion through the gateway's HTTP API must succeed (gateway ->
   worker -> node over mTLS with the chart's identities and allowed peers);
   a gateway presenting the node's certificate instead (CN kvr-node, not in
   the worker's allowed peers) must get an error naming kvr-node.
Exit 0 when all pass, 77 (skipped) while kvr_node has no --tls_cert_file;
every process started is stopped (SIGTERM, then SIGKILL) before exit.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import deploy_checks  # noqa: E402  (render, find, flag, known_flags)
from live_servers import SKIP, Server, check, failures, finish  # noqa: E402

ROLES = ("node", "worker", "gateway")


def make_pki(openssl, out):
    """One CA and a leaf per role in out/<role>/{tls.crt,tls.key,ca.crt}, and
    a kvr-worker leaf of another CA in out/other/. Returns {name: dir}."""
    def run(*cmd):
        subprocess.run([openssl, *cmd], check=True, capture_output=True, cwd=out)

    ext = os.path.join(out, "leaf.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                "extendedKeyUsage=serverAuth,clientAuth\n"
                "keyUsage=critical,digitalSignature\n")
    for ca in ("kvr-ca", "other-ca"):
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{ca}.key")
        run("req", "-x509", "-new", "-key", f"{ca}.key", "-subj", f"/CN={ca}", "-days", "1",
            "-out", f"{ca}.crt")
    dirs = {}
    for name, cn, ca in [(r, f"kvr-{r}", "kvr-ca") for r in ROLES] + [
            ("other", "kvr-worker", "other-ca")]:
        d = os.path.join(out, name)
        os.makedirs(d)
        shutil.copy(os.path.join(out, f"{ca}.crt"), os.path.join(d, "ca.crt"))
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
            os.path.join(d, "tls.key"))
        run("req", "-new", "-key", os.path.join(d, "tls.key"), "-subj", f"/CN={cn}",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "1", "-extfile", ext, "-out", os.path.join(d, "tls.crt"))
        dirs[name] = d
    return dirs


def http(url, body=None):
    """(HTTP status, body text) of a GET, or a POST of the JSON body."""
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def completion(http_addr):
    """(HTTP status, body) of a short completion through the gateway, for the
    model the gateway lists ("" when it lists none)."""
    status, body = http(f"http://{http_addr}/v1/models")
    models = json.loads(body).get("data", []) if status == 200 else []
    model = models[0]["id"] if models else ""
    return http(f"http://{http_addr}/v1/completions",
                {"model": model, "prompt": "Once upon a time", "max_tokens": 8})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for a in ("render", "node_binary", "worker_binary", "gateway_binary", "health_probe",
              "openssl", "model_dir", "work"):
        parser.add_argument(f"--{a}", required=True)
    args = parser.parse_args()
    if "tls_cert_file" not in deploy_checks.known_flags(args.node_binary):
        print("skipped: kvr_node has no --tls_cert_file (it predates mTLS)")
        return SKIP
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    overlay = os.path.join(work, "overlay.yaml")
    with open(overlay, "w") as f:
        yaml.safe_dump({"worker": {"gpu": {"enabled": False}}, "apiKeys": {"enabled": False}}, f)
    values, docs, _ = deploy_checks.render(args.render, work, "secure", [overlay])
    fullname = values["fullnameOverride"] or "kvr"
    containers = {}
    for d in deploy_checks.find(docs, "StatefulSet") + deploy_checks.find(docs, "Deployment"):
        (containers[d["metadata"]["name"][len(fullname) + 1:]],) = \
            d["spec"]["template"]["spec"]["containers"]
    mount = values["tls"]["mountPath"] + "/"
    os.makedirs(os.path.join(work, "pki"))
    pki = make_pki(args.openssl, os.path.join(work, "pki"))
    data = os.path.join(work, "data")
    os.makedirs(data)
    model_mount = values["worker"]["model"]["mountPath"] + "/"

    def argv_of(role, replaced, secret=None):
        out = []
        for a in containers[role]["args"]:
            name = a[2:].split("=", 1)[0]
            if name in replaced:
                if replaced[name] is not None:
                    out.append(f"--{name}={replaced[name]}")
                continue
            out.append(a.replace(mount, (secret or pki[role]) + "/")
                       .replace(f"--model={model_mount}", f"--model={args.model_dir}/")
                       .replace(f"--tokenizer={model_mount}", f"--tokenizer={args.model_dir}/"))
        check(sum(a.startswith("--tls_") for a in out) >= 3,
              f"the chart passed no TLS flags to the {role}: {containers[role]['args']}")
        return out

    servers = []
    try:
        node = Server("kvr_node", [args.node_binary] + argv_of(
            "node", {"listen": "127.0.0.1:0", "metrics_listen": "", "data_dir": data,
                     "threads": "1"}), ["listening"])
        servers.append(node)
        worker = Server("kvr_worker", [args.worker_binary] + argv_of(
            "worker", {"listen": "127.0.0.1:0", "metrics_listen": "", "threads": "1",
                       "nodes": node.addrs["listening"]}), ["listening"])
        servers.append(worker)

        # 4. The rendered exec probes against the mTLS servers.
        for role, server in (("node", node), ("worker", worker)):
            c = containers[role]
            port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
            addr = server.addrs["listening"]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                cmd = [args.health_probe] + [
                    a.replace(mount, pki[role] + "/").replace(f"127.0.0.1:{port}", addr)
                    for a in c[probe]["exec"]["command"][1:]]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
                check(r.returncode == 0, f"{role} {probe} {cmd[1:]}: exit {r.returncode}: "
                                         f"{r.stderr}")
                print(f"{role} {probe}: exit {r.returncode}")
            service = deploy_checks.flag(c["readinessProbe"]["exec"]["command"], "service")
            plain = [args.health_probe, f"--addr={addr}", f"--service={service}",
                     "--timeout_ms=2000"]
            foreign = plain + [f"--tls_cert_file={pki['other']}/tls.crt",
                               f"--tls_key_file={pki['other']}/tls.key",
                               f"--tls_ca_file={pki[role]}/ca.crt"]
            for what, cmd in (("without a certificate", plain),
                              ("with another CA's certificate", foreign)):
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
                check(r.returncode == 1, f"{role}: a probe {what} got exit {r.returncode} "
                                         f"(the server must require the CA's mTLS): {r.stderr}")
                print(f"{role} probe {what}: exit {r.returncode}")

        # 5. Generation through the chain; a gateway with the wrong identity.
        for cert, want_ok in (("gateway", True), ("node", False)):
            gw = Server(f"kvr_gateway ({cert} certificate)", [args.gateway_binary] + argv_of(
                "gateway", {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0",
                            "metrics_listen": "", "workers": worker.addrs["listening"]},
                secret=pki[cert]), ["http", "listening"])
            servers.append(gw)
            status, body = completion(gw.addrs["http"])
            text = ""
            if status == 200:
                text = json.loads(body)["choices"][0]["text"]
            # Refused calls name the peer (contract: PERMISSION_DENIED naming it).
            check(status == 200 and bool(text) if want_ok else
                  status != 200 and f"kvr-{cert}" in body,
                  f"completion through a gateway with the {cert} certificate: {status} "
                  f"{body[:300]} (want {'a completion' if want_ok else 'a refusal naming kvr-' + cert})")
            print(f"completion via a gateway with the {cert} certificate: {status} "
                  f"{text[:40]!r}{body[:120] if status != 200 else ''}")
            gw.stop()
    except RuntimeError as e:
        failures.append(str(e))
    finally:
        for s in reversed(servers):
            s.stop()
    return finish("tls_chain")

if __name__ == "__main__":
    sys.exit(main())
