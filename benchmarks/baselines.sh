#!/usr/bin/env bash
# Reproduces benchmarks/results/baselines/*: every weight editor through the same sequential loop as RECIPE.
#   RECIPE_DATA_DIR=/path/to/data bash benchmarks/baselines.sh [editor ...]
# then `.venv/bin/python benchmarks/editors_table.py` writes benchmarks/results/editors/{table.md,editors.png}
# (every run under benchmarks/results/, these included).
#
# CPU budget (2 cores, one torch thread per run): the first 20 cases of the seed-0 shuffle at T=1 and
# T=10 (20 single-edit rounds; 2 rounds of 10) and 100 cases at T=100 (one round). T=1000 for every
# editor (3-6 hours each for the slow ones here) is benchmarks/baselines_1000.sh.
# Every run resumes (--resume) from its finished rounds, and T=100 runs of the slow editors save their
# state every 10 edits (--checkpoint-every), so an interrupted script picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/baselines
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() { name=$1; shift; .venv/bin/recipe eval --out "runs/$name" --resume "$@"; mkdir -p "$out/$name";
        cp "runs/$name"/{summary.json,table.txt,metrics.png,run.json} "$out/$name/"; }
editors=${*:-"rome memit ftm tpatcher ft mend grace"}
for e in $editors; do  # first pass: T=1 and T=10 everywhere
  for d in zsre counterfact; do
    [ "$e-$d" = ft-zsre ] && continue  # in benchmarks/results/foundation/ft-zsre (100 cases)
    run "$e-$d-small" --editor "$e" --dataset "$d" --edits 1,10 --cases 20
  done
done
for e in $editors; do  # second pass: T=100
  case $e in
    rome|memit|tpatcher|grace)
        run "$e-zsre-100" --editor "$e" --dataset zsre --edits 100 --checkpoint-every 10 --save-states
        run "$e-counterfact-100" --editor "$e" --dataset counterfact --edits 100 --checkpoint-every 10 ;;
    ft) run "$e-counterfact-100" --editor "$e" --dataset counterfact --edits 100 ;;
    *)  run "$e-zsre-100" --editor "$e" --dataset zsre --edits 100
        run "$e-counterfact-100" --editor "$e" --dataset counterfact --edits 100 ;;
  esac
done
