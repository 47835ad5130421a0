#!/usr/bin/python3
"""Checks deploy/Dockerfile's runtime package lists against real binaries.

    runtime_packages.py --dockerfile deploy/Dockerfile --binary STAGE=PATH ...

For each binary, every shared library `ldd` resolves must belong (dpkg's file lists) to
a package the Dockerfile installs in that stage (`apt-get install` lines of
the FROM ... AS STAGE block and the stages it is built FROM), or to the
packages every Debian image has (libc6, libgcc-s1, libstdc++6, the base
system). Prints the missing packages per stage; exit 1 if any.
"""
import argparse
import os
import re
import subprocess
import sys

# Essential / required packages present in debian:12-slim.
BASE = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libzstd1", "liblzma5", "libbz2-1.0",
        "libselinux1", "libpcre2-8-0", "libcrypt1", "libtinfo6", "libgmp10", "libacl1",
        "libattr1", "libaudit1", "libcap-ng0", "libmd0", "libsystemd0", "liblz4-1",
        "libgcrypt20", "libgpg-error0", "libcap2", "libdebconfclient0", "libsemanage2",
        "libsepol2", "libudev1", "libdb5.3", "libpam0g", "libhogweed6", "libnettle8",
        "libffi8", "libp11-kit0", "libtasn1-6", "libunistring2", "libidn2-0",
        "libgnutls30", "libxxhash0", "libseccomp2", "libsmartcols1", "libuuid1",
        "libmount1", "libblkid1", "libext2fs2", "libcom-err2", "libss2"}


def stage_packages(dockerfile):
    """{stage: set of packages}, following FROM <stage> inheritance."""
    with open(dockerfile) as f:
        text = f.read().replace("\\\n", " ")
    stages, parent, current = {}, {}, None
    for line in text.splitlines():
        m = re.match(r"\s*FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2)
            stages[current] = set()
            parent[current] = m.group(1)
            continue
        m = re.search(r"apt-get install ([^&]*)", line)
        if m and current:
            stages[current] |= {w for w in m.group(1).split()
                                if not w.startswith("-") and "$" not in w}
    resolved = {}
    for s in stages:
        pkgs, cur = set(), s
        while cur in stages:
            pkgs |= stages[cur]
            cur = parent[cur]
        resolved[s] = pkgs
    return resolved


def file_owners():
    """{path: package} from dpkg's file lists (one read instead of a dpkg -S
    per library)."""
    owners = {}
    info = "/var/lib/dpkg/info"
    for name in os.listdir(info):
        if name.endswith(".list"):
            pkg = name[:-len(".list")].split(":")[0]
            with open(os.path.join(info, name), errors="replace") as f:
                for line in f:
                    owners[line.rstrip("\n")] = pkg
    return owners


def library_packages(binary, owners):
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    pkgs = {}
    for line in out.splitlines():
        m = re.search(r"=>\s+(/\S+)", line)
        if not m:
            continue
        lib = m.group(1)
        candidates = [lib, os.path.realpath(lib)]
        # Merged /usr: dpkg lists some libraries under /lib, others under /usr/lib.
        candidates += [c.replace("/lib/", "/usr/lib/", 1) for c in candidates
                       if c.startswith("/lib/")]
        candidates += [c.replace("/usr/lib/", "/lib/", 1) for c in candidates
                       if c.startswith("/usr/lib/")]
        pkgs[lib] = next((owners[c] for c in candidates if c in owners), None)
    return pkgs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dockerfile", required=True)
    parser.add_argument("--binary", action="append", default=[], help="STAGE=PATH")
    args = parser.parse_args()
    stages = stage_packages(args.dockerfile)
    owners = file_owners()
    failed = False
    for spec in args.binary:
        stage, path = spec.split("=", 1)
        if stage not in stages:
            print(f"FAIL: no stage {stage} in {args.dockerfile}")
            failed = True
            continue
        libs = library_packages(path, owners)
        missing = {f"{lib} ({pkg})" for lib, pkg in libs.items()
                   if pkg is None or (pkg not in stages[stage] and pkg not in BASE)}
        needed = sorted({p for p in libs.values() if p} - BASE)
        print(f"{stage}: {os.path.basename(path)} needs {' '.join(needed)}")
        if missing:
            failed = True
            print(f"FAIL: stage {stage} lacks the packages of: {', '.join(sorted(missing))}")
    print("runtime_packages:", "FAILED" if failed else "passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
