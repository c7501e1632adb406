#!/usr/bin/env bash
# Reproduces benchmarks/results/baselines/*: every weight editor through the same sequential loop as RECIPE.
#   RECIPE_DATA_DIR=/path/to/data bash benchmarks/baselines.sh [editor ...]
# then `.venv/bin/python benchmarks/baselines_table.py` writes benchmarks/results/baselines/table.md + plot.
#
# CPU budget (2 cores, one torch thread per run): the first 20 cases of the seed-0 shuffle at T=1 and
# T=10 (20 single-edit rounds; 2 rounds of 10), 100 cases at T=100 (one round), and T=1000 for the
# editors that edit in about a second. Every run resumes (--resume) from its finished rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/baselines
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() { name=$1; shift; .venv/bin/recipe eval --out "runs/$name" --resume "$@"; mkdir -p "$out/$name";
        cp "runs/$name"/{summary.json,table.txt,metrics.png,run.json} "$out/$name/"; }
editors=${*:-"ft ftm tpatcher rome memit mend"}
for e in $editors; do
  for d in zsre counterfact; do
    run "$e-$d-small" --editor "$e" --dataset "$d" --edits 1,10 --cases 20
    run "$e-$d-100"   --editor "$e" --dataset "$d" --edits 100
  done
done
for e in $editors; do
  case $e in ft|ftm) run "$e-zsre-1000" --editor "$e" --dataset zsre --edits 1000 --no-generation ;; esac
done
