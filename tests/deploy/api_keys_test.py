#!/usr/bin/python3
"""The chart's API-key Secret and mount against the real gateway.

    api_keys_test.py --render BIN --kvr KVR --gateway_binary KVR_GATEWAY --work DIR

1. `kvr apikey --id team-a` makes a key and its entry; the entry goes into
   apiKeys.keys of a values file (insecure: true, so that only the key
   wiring is under test) that values.schema.json must accept.
2. The chart is rendered; the Secret's keys file is laid out the way kubelet
   projects a Secret volume (the file a symlink into ..data, ..data a symlink
   to a timestamped directory) at the directory the rendered --api_keys_file
   points into, and kvr_gateway is started with the rendered arguments
   (listen ports on 127.0.0.1:0, no metrics, --workers naming a closed port).
3. /v1/models without a key and with a wrong key must be 401; with the key it
   must not be. /healthz needs no key (it answers 503 here: no worker).
4. Rotation as kubelet does it: a second render with a new key replaces the
   timestamped directory and swaps ..data atomically; within a deadline the
   new key must pass and the old one get 401, without a restart.
Exit 0 when all pass, 77 (skipped) while the gateway has no --api_keys_file
or kvr no apikey command; the gateway is stopped (SIGTERM, then SIGKILL)
before exit in every case.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jsonschema
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import deploy_checks  # noqa: E402  (render, find, flag, known_flags, merged_values)
from live_servers import SKIP, Server, check, failures, finish  # noqa: E402

def make_key(kvr, key_id):
    """(key, entry) from `kvr apikey`, or None when kvr has no such command."""
    r = subprocess.run([kvr, "apikey", "--id", key_id, "--max_concurrent", "4"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return None
    key, entry = r.stdout.splitlines()[:2]
    return key, json.loads(entry)


def render_keys(args, work, name, entries):
    """Renders the chart with these hashed entries; returns (gateway container,
    keys file text from the rendered Secret, secretKey)."""
    path = os.path.join(work, f"{name}.yaml")
    overlay = {"insecure": True, "networkPolicy": {"enabled": False},
               "apiKeys": {"keys": entries, "reloadSeconds": 1}}
    with open(path, "w") as f:
        yaml.safe_dump(overlay, f)
    with open(os.path.join(deploy_checks.CHART, "values.schema.json")) as f:
        schema = json.load(f)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in
              jsonschema.Draft7Validator(schema).iter_errors(deploy_checks.merged_values([path]))]
    check(not errors, f"values.schema.json rejects the entries kvr apikey makes: {errors}")
    values, docs, _ = deploy_checks.render(args.render, work, name, [path])
    (dep,) = [d for d in deploy_checks.find(docs, "Deployment")
              if d["metadata"]["name"].endswith("-gateway")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    key = values["apiKeys"]["secretKey"]
    (secret,) = [d for d in deploy_checks.find(docs, "Secret")
                 if d["metadata"]["name"].endswith("-api-keys")]
    return c, secret["stringData"][key], key


def project(volume_dir, file_name, text, version):
    """Writes the Secret the way kubelet's atomic writer does: a new
    timestamped directory, then ..data swapped to it by one rename."""
    os.makedirs(volume_dir, exist_ok=True)
    ts = f"..{version}"
    os.makedirs(os.path.join(volume_dir, ts))
    with open(os.path.join(volume_dir, ts, file_name), "w") as f:
        f.write(text)
    tmp = os.path.join(volume_dir, "..data_tmp")
    os.symlink(ts, tmp)
    os.replace(tmp, os.path.join(volume_dir, "..data"))
    link = os.path.join(volume_dir, file_name)
    if not os.path.islink(link):
        os.symlink(os.path.join("..data", file_name), link)


def http(url, key=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for a in ("render", "kvr", "gateway_binary", "work"):
        parser.add_argument(f"--{a}", required=True)
    args = parser.parse_args()
    if "api_keys_file" not in deploy_checks.known_flags(args.gateway_binary):
        print("skipped: kvr_gateway has no --api_keys_file (it predates API keys)")
        return SKIP
    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    first = make_key(args.kvr, "team-a")
    if first is None:
        print("skipped: kvr has no apikey command")
        return SKIP
    second = make_key(args.kvr, "team-b")

    c, text, file_name = render_keys(args, work, "keys-1", [first[1]])
    keys_file = deploy_checks.flag(c["args"], "api_keys_file")
    mount = os.path.dirname(keys_file)
    volume = os.path.join(work, "api-keys")
    project(volume, file_name, text, 1)
    replaced = {"listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "metrics_listen": "",
                "workers": "127.0.0.1:1"}
    argv = [f"--{a[2:].split('=', 1)[0]}={replaced[a[2:].split('=', 1)[0]]}"
            if a[2:].split("=", 1)[0] in replaced else a.replace(mount + "/", volume + "/")
            for a in c["args"]]
    print("kvr_gateway", " ".join(argv))
    gateway = None
    try:
        gateway = Server("kvr_gateway", [args.gateway_binary, *argv], ["http", "listening"],
                         timeout=60)
        base = f"http://{gateway.addrs['http']}"
        for what, key, want in (("no key", None, 401), ("a wrong key", second[0], 401)):
            status, body = http(base + "/v1/models", key)
            check(status == want, f"/v1/models with {what}: {status} {body[:200]}, want {want}")
            print(f"/v1/models with {what}: {status}")
        status, body = http(base + "/v1/models", first[0])
        check(status != 401, f"/v1/models with the key: {status} {body[:200]}")
        print(f"/v1/models with the key: {status}")
        status, _ = http(base + "/healthz")
        check(status != 401, f"/healthz must need no key: {status}")
        print(f"/healthz without a key: {status}")

        # Rotation through the Secret volume, as kubelet writes it.
        _, text2, _ = render_keys(args, work, "keys-2", [second[1]])
        project(volume, file_name, text2, 2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            new, _ = http(base + "/v1/models", second[0])
            old, _ = http(base + "/v1/models", first[0])
            if new != 401 and old == 401:
                break
            time.sleep(0.2)  # polling the gateway's reload, with the deadline above
        check(new != 401 and old == 401,
              f"after the Secret's update the new key got {new}, the old one {old}")
        print(f"after rotation: new key {new}, old key {old}")
    except RuntimeError as e:
        failures.append(str(e))
    finally:
        if gateway is not None:
            gateway.stop()
    return finish("api_keys")

if __name__ == "__main__":
    sys.exit(main())
