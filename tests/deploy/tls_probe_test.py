#!/usr/bin/python3
"""The chart's mTLS wiring of a retrieval node against the real binaries.

    tls_probe_test.py --render BIN --node_binary KVR_NODE --health_probe PROBE
                      --openssl OPENSSL --work DIR

1. Renders the chart with its default (secure) values.
2. Makes a CA and a kvr-node certificate as the chart documents them (EC
   P-256, CN kvr-node, SANs DNS:localhost and IP:127.0.0.1, EKU serverAuth +
   clientAuth) with the openssl command, laid out like the mounted Secret
   (tls.crt, tls.key, ca.crt), plus a certificate from another CA.
3. Starts kvr_node with the rendered container arguments, changed only where
   a pod differs from a test: --listen=127.0.0.1:0, no metrics port, a
   temporary --data_dir, --threads=1, and the Secret's mount path replaced by
   the directory of step 2 (every --tls_* flag is the chart's).
4. Runs each rendered exec probe (startup, liveness, readiness) with the same
   path and port substitution: each must exit 0 (SERVING). A probe without
   certificate flags (what kubelet's native gRPC probe would do) and one
   presenting the other CA's certificate must both fail: the node really
   requires the client certificate the chart hands its probes.
Exit 0 when all pass, 77 (skipped) when kvr_node has no --tls_cert_file yet;
the node is stopped (SIGTERM, then SIGKILL) before exit in every case.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import deploy_checks  # noqa: E402  (render, find, flag, known_flags)

SKIP = 77
failures = []


def check(cond, message):
    if not cond:
        failures.append(message)
    return cond


def make_pki(openssl, out):
    """CA + kvr-node leaf in out/secret/{tls.crt,tls.key,ca.crt}; a leaf of
    another CA in out/other/. Returns (secret dir, other dir)."""
    def run(*cmd):
        subprocess.run([openssl, *cmd], check=True, capture_output=True, cwd=out)

    ext = os.path.join(out, "leaf.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                "extendedKeyUsage=serverAuth,clientAuth\n"
                "keyUsage=critical,digitalSignature\n")
    dirs = []
    for name, cn in (("secret", "kvr-node"), ("other", "kvr-worker")):
        d = os.path.join(out, name)
        os.makedirs(d)
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}-ca.key")
        run("req", "-x509", "-new", "-key", f"{name}-ca.key", "-subj", f"/CN={name}-ca",
            "-days", "1", "-out", os.path.join(d, "ca.crt"))
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
            os.path.join(d, "tls.key"))
        run("req", "-new", "-key", os.path.join(d, "tls.key"), "-subj", f"/CN={cn}",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", os.path.join(d, "ca.crt"),
            "-CAkey", f"{name}-ca.key", "-CAcreateserial", "-days", "1", "-extfile", ext,
            "-out", os.path.join(d, "tls.crt"))
        dirs.append(d)
    return dirs


def start_node(binary, argv):
    """Starts kvr_node; returns (process, "127.0.0.1:PORT") once it prints its
    listening line (deadline 60 s), or raises SystemExit with its output."""
    proc = subprocess.Popen([binary, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    found = []
    done = threading.Event()  # set on the listening line or at end of output

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.match(r"kvr_node listening on (127\.0\.0\.1:\d+)", line)
            if m and not found:
                found.append(m.group(1))
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    done.wait(timeout=60)
    if not found:
        stop(proc)
        raise SystemExit("kvr_node did not start with the chart's arguments:\n"
                         + "".join(lines[-20:]))
    return proc, found[0]


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            failures.append("kvr_node did not stop within 30 s of SIGTERM")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for a in ("render", "node_binary", "health_probe", "openssl", "work"):
        parser.add_argument(f"--{a}", required=True)
    args = parser.parse_args()
    if "tls_cert_file" not in deploy_checks.known_flags(args.node_binary):
        print("skipped: kvr_node has no --tls_cert_file (it predates mTLS)")
        return SKIP
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    values, docs, _ = deploy_checks.render(args.render, work, "secure-default", [])
    (sts,) = deploy_checks.find(docs, "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    mount = values["tls"]["mountPath"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
    secret, other = make_pki(args.openssl, work)
    data = os.path.join(work, "data")
    os.makedirs(data)

    def local(a):
        return a.replace(mount + "/", secret + "/")

    replaced = {"listen": "127.0.0.1:0", "metrics_listen": "", "data_dir": data, "threads": "1"}
    argv = []
    for a in c["args"]:
        name = a[2:].split("=", 1)[0]
        argv.append(f"--{name}={replaced[name]}" if name in replaced else local(a))
    tls_args = [a for a in argv if a.startswith("--tls_")]
    check(len(tls_args) >= 3, f"the chart passed no TLS flags to the node: {c['args']}")
    print("kvr_node", " ".join(argv))

    proc, addr = start_node(args.node_binary, argv)
    try:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            cmd = c[probe]["exec"]["command"]
            run = [args.health_probe] + [local(a).replace(f"127.0.0.1:{port}", addr)
                                         for a in cmd[1:]]
            r = subprocess.run(run, capture_output=True, text=True, timeout=30)
            check(r.returncode == 0, f"{probe} {run[1:]}: exit {r.returncode}: {r.stderr}")
            print(f"{probe}: exit {r.returncode}")
        service = deploy_checks.flag(c["readinessProbe"]["exec"]["command"], "service")
        plain = [args.health_probe, f"--addr={addr}", f"--service={service}", "--timeout_ms=2000"]
        r = subprocess.run(plain, capture_output=True, text=True, timeout=30)
        check(r.returncode == 1, f"a probe without a certificate got exit {r.returncode} "
                                 f"(the node must require mTLS): {r.stderr}")
        print(f"probe without a certificate: exit {r.returncode}")
        stranger = plain + [f"--tls_cert_file={other}/tls.crt", f"--tls_key_file={other}/tls.key",
                            f"--tls_ca_file={secret}/ca.crt"]
        r = subprocess.run(stranger, capture_output=True, text=True, timeout=30)
        check(r.returncode == 1, f"a probe with another CA's certificate got exit "
                                 f"{r.returncode}: {r.stderr}")
        print(f"probe with another CA's certificate: exit {r.returncode}")
    finally:
        stop(proc)
    for f in failures:
        print("FAIL:", f)
    print(f"tls_probe: {'FAILED (%d)' % len(failures) if failures else 'passed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
