#!/usr/bin/env bash
# Reproduces benchmarks/results/foundation/*: the unedited SmolLM2 and FT-L through the sequential loop.
# Needs the datasets: RECIPE_DATA_DIR=/path/to/data bash benchmarks/foundation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/foundation
mkdir -p "$out"
run() { name=$1; shift; .venv/bin/recipe eval --out "runs/$name" --resume "$@"; mkdir -p "$out/$name";
        cp "runs/$name"/{summary.json,table.txt,metrics.png,run.json} "$out/$name/"; }
run ft-zsre          --editor ft   --dataset zsre        --edits 1,10,100 --cases 100
run none-zsre        --editor none --dataset zsre        --edits 1037
run none-counterfact --editor none --dataset counterfact --edits 1000
# FT-L on CounterFact: benchmarks/baselines.sh (ft-counterfact-small: T = 1, 10 on 20 cases; ft-counterfact-100)
