#!/usr/bin/env python3
"""Checks every project #include against the layering rules in the folder READMEs.

Each folder that holds C++/CUDA sources is governed by the nearest README.md at
or above it (within the repository) that has a rule line:

    May include: `common/`, `retrieval_node/index/`, `kvr/v1/` (generated)

Backticked entries are path prefixes an #include "..." may start with; a
folder may always include its own files and those of folders below it (the
README's own folder). Includes of external libraries (absl/, grpcpp/, ...) are
not the rules' business: only includes whose first component is a top-level
folder of the repository, or a generated-code prefix named in any rule
(kvr/v1/, grpc/health/v1/), are checked. A source folder with no rule above it
is itself a violation, so a new folder has to declare its dependencies.

Usage: check_layering.py ROOT   (exit 0: clean; 1: violations, one per line)
"""
import os
import re
import sys

SOURCE_SUFFIXES = (".h", ".cc", ".cu", ".cuh")
SKIP_DIRS = {".git", "node_modules", "fixture"}
INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')
RULE_RE = re.compile(r"^May include:(.*)$")
ENTRY_RE = re.compile(r"`([^`]+)`")


def read_rule(readme):
    """The allowed prefixes of README `readme`, or None when it has no rule."""
    with open(readme, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        m = RULE_RE.match(line.strip())
        if not m:
            continue
        text = m.group(1)
        # The rule may wrap onto following lines until a blank line.
        for cont in lines[i + 1:]:
            if not cont.strip():
                break
            text += " " + cont
        entries = ENTRY_RE.findall(text)
        if "nothing" in text.lower() and not entries:
            return []
        return [e.strip() for e in entries]
    return None


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = os.path.abspath(sys.argv[1])
    build_dirs = {d for d in os.listdir(root) if d.startswith("build")}
    top_level = {d for d in os.listdir(root)
                 if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")}

    rules = {}  # folder (relative, "" = root) -> list of prefixes
    sources = []  # relative paths
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames
                       if d not in SKIP_DIRS and not (rel_dir == "" and d in build_dirs)]
        if "README.md" in filenames and rel_dir:
            rule = read_rule(os.path.join(dirpath, "README.md"))
            if rule is not None:
                rules[rel_dir] = rule
        for name in filenames:
            if name.endswith(SOURCE_SUFFIXES):
                sources.append(os.path.join(rel_dir, name) if rel_dir else name)

    generated = {e for rule in rules.values() for e in rule if e.split("/")[0] not in top_level}
    checked_roots = top_level | {e.split("/")[0] for e in generated}

    def governing(rel_path):
        folder = os.path.dirname(rel_path)
        while folder:
            if folder in rules:
                return folder
            folder = os.path.dirname(folder)
        return None

    violations = []
    for rel in sorted(sources):
        owner = governing(rel)
        if owner is None:
            violations.append(f"{rel}: no README.md with a 'May include:' rule at or above "
                              f"{os.path.dirname(rel) or '.'}")
            continue
        allowed = [owner + "/"] + rules[owner]
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                m = INCLUDE_RE.match(line)
                if not m:
                    continue
                target = m.group(1)
                if target.split("/")[0] not in checked_roots:
                    continue  # an external library, or a same-folder relative include
                if not any(target.startswith(p) for p in allowed):
                    violations.append(
                        f"{rel}:{lineno}: includes \"{target}\", but {owner}/README.md "
                        f"allows only {', '.join(allowed)}")
    for v in violations:
        print(v)
    if violations:
        print(f"{len(violations)} layering violation(s)", file=sys.stderr)
        return 1
    print(f"layering: {len(sources)} files checked against {len(rules)} folder rules, clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
