#!/bin/bash
# Plots index_bench rows: recall@k vs µs/query (log scale), one panel per data
# family, one line per method (its sweep of beam / nprobe / ef / L), the exact
# scan as a vertical line and the 0.95 target as a horizontal one. Needs
# python3 and gnuplot (Debian: gnuplot-nox).
#
#   bench/plot_index.sh OUT.svg|OUT.png ROWS.json [MORE_ROWS.json ...]
# Rows of the OOD-gap table (method "hnswlib-gap*") are left out.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 OUT.svg ROWS.json [MORE_ROWS.json ...]" >&2
  exit 2
fi
out=$1
shift
command -v gnuplot >/dev/null || { echo "$0: gnuplot not found (apt-get install gnuplot-nox)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One data file per (family, method): "us_per_query recall", by µs.
python3 - "$tmp" "$@" <<'PY'
import json, os, re, sys
tmp, files = sys.argv[1], sys.argv[2:]
series, flat = {}, {}
for f in files:
    for r in json.load(open(f)):
        fam, m = r["family"], r["method"]
        if "gap" in m or m.startswith("attention") or r.get("us_per_query", 0) <= 0:
            continue  # OOD-gap and decode-attention rows are other tables
        if m == "flat":
            flat[fam] = r["us_per_query"]
            continue
        if m.startswith("auto"):
            m = m.replace("-", "_")
        series.setdefault((fam, m), []).append((r["us_per_query"], r["recall"]))
fams = sorted({f for f, _ in series} | set(flat))
with open(os.path.join(tmp, "families"), "w") as out:
    out.write(" ".join(fams) + "\n")
for fam in fams:
    with open(os.path.join(tmp, f"{fam}.methods"), "w") as out:
        out.write(" ".join(sorted(m for f, m in series if f == fam)) + "\n")
    with open(os.path.join(tmp, f"{fam}.flat"), "w") as out:
        out.write(f"{flat.get(fam, 0)}\n")
for (fam, m), pts in series.items():
    with open(os.path.join(tmp, f"{fam}__{m}.dat"), "w") as out:
        for us, rec in sorted(pts):
            out.write(f"{us} {rec}\n")
PY
# One colour per method in every panel.
color() {
  case $1 in
    graph) echo '#1f77b4' ;; auto) echo '#17becf' ;; auto_graph) echo '#9edae5' ;;
    auto_ivf) echo '#bcbd22' ;; ivf) echo '#000000' ;; hnswlib) echo '#d62728' ;;
    faiss_hnsw) echo '#ff7f0e' ;; roargraph) echo '#9467bd' ;; *) echo '#7f7f7f' ;;
  esac
}
read -r -a families < "$tmp/families"
n=${#families[@]}
cols=$(( n < 3 ? n : 3 ))
rows=$(( (n + cols - 1) / cols ))
{
  if [[ $out == *.png ]]; then
    echo "set terminal pngcairo noenhanced size $((440 * cols)),$((360 * rows)) font 'Helvetica,10'"
  else
    echo "set terminal svg noenhanced size $((440 * cols)),$((360 * rows)) dynamic font 'Helvetica,11'"
  fi
  echo "set output '$out'"
  echo "set multiplot layout $rows,$cols title 'index_bench: recall@100 vs µs/query, one search thread, per data family'"
  echo "set logscale x; set xlabel 'µs/query'; set ylabel 'recall@100'; set grid"
  echo "set yrange [0:1.02]; set key bottom right font ',9'"
  for fam in "${families[@]}"; do
    read -r -a methods < "$tmp/$fam.methods"
    read -r flat_us < "$tmp/$fam.flat"
    plots=()
    for m in "${methods[@]}"; do
      plots+=("'$tmp/${fam}__${m}.dat' using 1:2 with linespoints lw 2 pt 7 ps 0.5 lc rgb '$(color "$m")' title '$m'")
    done
    plots+=("0.95 with lines dt 2 lc rgb 'gray' title 'target 0.95'")
    echo "unset arrow"
    if [[ $flat_us != 0 ]]; then
      echo "set arrow from $flat_us, graph 0 to $flat_us, graph 1 nohead dt 3 lc rgb 'black'"
      echo "set label 1 'exact scan' at $flat_us, graph 0.05 right offset -0.5,0 font ',9'"
    fi
    echo "set title '$fam'"
    (IFS=,; echo "plot ${plots[*]}")
    echo "unset label 1"
  done
  echo "unset multiplot"
} > "$tmp/plot.gp"
gnuplot "$tmp/plot.gp"
echo "wrote $out"
