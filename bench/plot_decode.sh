#!/bin/bash
# Plots decode_bench rows: tokens/s vs context, one panel per batch size, a
# line per mode (solid) and the memory-traffic bound of full and retrieval
# (dashed). Needs python3 and gnuplot (Debian: gnuplot-nox).
#
#   bench/plot_decode.sh OUT.svg ROWS.json [MORE_ROWS.json ...]
# KEEP_TMP=1 keeps the per-series data files and the gnuplot script (path on stderr).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 OUT.svg ROWS.json [MORE_ROWS.json ...]" >&2
  exit 2
fi
out=$1
shift
command -v gnuplot >/dev/null || { echo "$0: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
tmp=$(mktemp -d)
[[ -n "${KEEP_TMP:-}" ]] && echo "$0: data and plot.gp in $tmp" >&2
trap '[[ -n "${KEEP_TMP:-}" ]] || rm -rf "$tmp"' EXIT
# One data file per (batch, series): "context tokens_per_second", sorted.
python3 - "$tmp" "$@" <<'PY'
import json, os, sys
tmp, files = sys.argv[1], sys.argv[2:]
series = {}
for f in files:
    for r in json.load(open(f)):
        if r.get("tokens_per_second", 0) <= 0:
            continue  # skipped rows
        b, m = r["batch"], r["mode"]
        series.setdefault((b, m), []).append((r["context"], r["tokens_per_second"]))
        if m in ("full", "retrieval"):
            series.setdefault((b, m + "-bound"), []).append(
                (r["context"], r["bound_tokens_per_second"]))
batches = sorted({b for b, _ in series})
with open(os.path.join(tmp, "batches"), "w") as out:
    out.write(" ".join(map(str, batches)) + "\n")
for (b, m), pts in series.items():
    with open(os.path.join(tmp, f"b{b}_{m}.dat"), "w") as out:
        for c, t in sorted(dict(pts).items()):
            out.write(f"{c} {t}\n")
PY
read -r -a batches < "$tmp/batches"
n=${#batches[@]}
{
  echo "set terminal svg size $((420 * n)),380 dynamic font 'Helvetica,11'"
  echo "set output '$out'"
  echo "set multiplot layout 1,$n title 'decode\\_bench: tokens/s vs context (CPU backend, Llama-3-8B attention geometry)'"
  echo "set logscale xy; set xlabel 'context (tokens)'; set ylabel 'tokens/s'; set grid"
  echo "set key top right font ',9'"
  echo "set xtics ('4K' 4096, '8K' 8192, '16K' 16384, '32K' 32768, '64K' 65536, '128K' 131072)"
  for b in "${batches[@]}"; do
    plots=()
    i=1
    for m in full retrieval grpc ucx; do
      f="$tmp/b${b}_${m}.dat"
      [[ -f $f ]] && plots+=("'$f' using 1:2 with linespoints lw 2 lc $i title '$m'")
      i=$((i + 1))
    done
    i=1
    for m in full retrieval; do
      f="$tmp/b${b}_${m}-bound.dat"
      [[ -f $f ]] && plots+=("'$f' using 1:2 with lines dt 2 lc $i title '$m bound'")
      i=$((i + 1))
    done
    echo "set title 'batch $b'"
    (IFS=,; echo "plot ${plots[*]}")
  done
  echo "unset multiplot"
} > "$tmp/plot.gp"
gnuplot "$tmp/plot.gp"
echo "wrote $out"
