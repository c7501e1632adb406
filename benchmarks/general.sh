#!/usr/bin/env bash
# Reproduces benchmarks/results/general/*: general ability (MMLU, CSQA, ANLI r1-r3, SQuAD 2.0, WikiText)
# of SmolLM2 unedited (each run's T=0 row) and after T=100 (and T=1000 where CPU time allows) sequential zsRE edits.
# CPU-sized: N items per set (ANLI: per round), same seed for the items and the edit order.
# Cost on one busy CPU thread (n=20 smoke run): about 1.1 s/item MMLU, 0.25 CSQA, 0.7 ANLI, 2.1 SQuAD,
# 1.6 WikiText, so one measurement at N=100 is ~10-12 min and each run does three (T=0, 100, 1000).
# With a GPU: N=all. RECIPE_DATA_DIR=/path/to/data [N=100] bash benchmarks/general.sh
set -euo pipefail
cd "$(dirname "$0")/.."
n=${N:-100}
out=benchmarks/results/general
mkdir -p "$out"
run() { name=$1; shift; .venv/bin/recipe general --out "runs/$name" --n "$n" --seed 0 "$@"; mkdir -p "$out/$name";
        cp "runs/$name"/{general.json,general.txt,general.png,run.json} "$out/$name/"; }
run general-recipe-zsre --editor recipe --dataset zsre --edits 100,1000
run general-ft-zsre     --editor ft     --dataset zsre --edits 100,1000
run general-mend-zsre   --editor mend   --dataset zsre --edits 100,1000
# Slow weight editors, T=100 only (T=1000: 4-11 hours each on this CPU). Where benchmarks/baselines.sh
# kept the state after their first 100 zsRE edits (runs/<e>-zsre-100/state-T100), it is loaded instead
# of applying the 100 edits again.
for e in rome memit tpatcher grace; do
  state=runs/$e-zsre-100/state-T100
  if [ -d "$state" ]; then run "general-$e-zsre" --editor "$e" --dataset zsre --edits 100 --editor-state "$state"
  else run "general-$e-zsre" --editor "$e" --dataset zsre --edits 100; fi
done
