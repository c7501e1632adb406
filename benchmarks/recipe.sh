#!/usr/bin/env bash
# Reproduces benchmarks/results/recipe/*: the shipped RECIPE checkpoint through the sequential loop,
# then the seen / never-seen target split. RECIPE_DATA_DIR=/path/to/data bash benchmarks/recipe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/recipe
mkdir -p "$out"
run() { name=$1; dataset=$2; shift 2
        .venv/bin/recipe eval --editor recipe --dataset "$dataset" --out "runs/$name" --resume "$@"
        .venv/bin/python benchmarks/seen_split.py "runs/$name" --dataset "$dataset" | tee "runs/$name/seen_split.txt"
        mkdir -p "$out/$name"
        cp "runs/$name"/{summary.json,table.txt,metrics.png,run.json,seen_split.json,seen_split.txt} "$out/$name/"; }
run recipe-zsre-lifelong        zsre        --edits 1037
run recipe-zsre                 zsre        --edits 1,10,100 --cases 100
run recipe-counterfact-lifelong counterfact --edits 1000 --cases 1000
run recipe-ripple-lifelong      ripple-recent-test --edits 1266 --no-generation  # session 1: did not finish in time
