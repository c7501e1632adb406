#!/usr/bin/env bash
# Reproduces benchmarks/results/recipe/*: the shipped RECIPE checkpoint through the sequential loop,
# the seen / never-seen and unique / shared-subject splits, retrieval + the fixed-sentinel ablation,
# and the prefix ablation.   RECIPE_DATA_DIR=/path/to/data bash benchmarks/recipe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/recipe
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() { name=$1; dataset=$2; shift 2
        .venv/bin/recipe eval --editor recipe --dataset "$dataset" --out "runs/$name" "$@"
        .venv/bin/python benchmarks/seen_split.py "runs/$name" --dataset "$dataset" | tee "runs/$name/seen_split.txt"
        mkdir -p "$out/$name"
        cp "runs/$name"/{summary.json,table.txt,metrics.png,run.json,seen_split.json,seen_split.txt} "$out/$name/"; }
run recipe-zsre-lifelong        zsre        --edits 1037 --resume
run recipe-zsre                 zsre        --edits 1,10,100 --cases 100 --resume
run recipe-counterfact-v2       counterfact --edits 1000 --cases 1000 --score-cases 300 --no-generation
# CounterFact against the number of edits, and T = 1,000 with free generation (exact match beside teacher forcing)
run recipe-counterfact          counterfact --edits 1,10,100 --cases 100 --resume
run recipe-counterfact-gen      counterfact --edits 1000 --cases 1000 --score-cases 300
# all 10,000 CounterFact edits (4 statements occur twice in the split: replace, not refuse)
run recipe-counterfact-10k      counterfact --edits 10000 --cases 10000 --score-cases 300 --set duplicates=replace
# RippleEdits recent test: all 1,266 edits applied, the queries of a seeded sample of 250 cases scored
# (the whole set is 20,438 queries: ~1 h on one CPU thread)
run recipe-ripple-lifelong      ripple-recent-test --edits 1266 --score-cases 250 --no-generation
# the EditVerifier (python -m train.verifier --config configs/train/verifier.yaml --max-steps 400) as an ablation
run verifier-counterfact-10k    counterfact --edits 10000 --cases 10000 --score-cases 300 --no-generation --set duplicates=replace --set verifier=checkpoints/recipe-verifier
run verifier-ripple             ripple-recent-test --edits 1266 --score-cases 250 --no-generation --set verifier=checkpoints/recipe-verifier
run verifier-ripple-m2          ripple-recent-test --edits 1266 --score-cases 250 --no-generation --set verifier=checkpoints/recipe-verifier --set sentinel_margin=-2 --set verifier_threshold=0.7
run verifier-zsre               zsre        --edits 1037 --no-generation --set verifier=checkpoints/recipe-verifier
M2="--set verifier=checkpoints/recipe-verifier --set sentinel_margin=-2 --set verifier_threshold=0.7"
run verifier-zsre-m2            zsre        --edits 1037 --no-generation $M2
run verifier-counterfact-10k-m2 counterfact --edits 10000 --cases 10000 --score-cases 300 --no-generation --set duplicates=replace $M2
# the subject gate (subject_gate: true): an entry is used only when its edit's subject occurs in the query
run gate-counterfact-10k        counterfact --edits 10000 --cases 10000 --score-cases 300 --no-generation --set duplicates=replace --set subject_gate=true
run gate-zsre                   zsre        --edits 1037 --no-generation --set subject_gate=true
run gate-ripple                 ripple-recent-test --edits 1266 --score-cases 250 --no-generation --set subject_gate=true
# the verifier plus the subject gate, with a bypass for matches the verifier is sure of (p > 0.9)
VG="--set verifier=checkpoints/recipe-verifier --set subject_gate=true --set subject_gate_bypass=0.9"
run verifier-gate-ripple        ripple-recent-test --edits 1266 --score-cases 250 --no-generation $VG
run verifier-gate-zsre          zsre        --edits 1037 --no-generation $VG
run verifier-gate-counterfact-10k counterfact --edits 10000 --cases 10000 --score-cases 300 --no-generation --set duplicates=replace $VG
# RippleEdits with free generation (exact match beside teacher forcing)
run recipe-ripple-gen           ripple-recent-test --edits 1266 --score-cases 250
.venv/bin/python benchmarks/retrieval_check.py --dataset zsre --calibrate zsre-train --raw
.venv/bin/python benchmarks/retrieval_check.py --dataset ripple-recent-test --calibrate ripple-recent-train
.venv/bin/python benchmarks/retrieval_check.py --dataset ripple-recent-test --verifier checkpoints/recipe-verifier --margins 0
.venv/bin/python benchmarks/prefix_ablation.py --checkpoint checkpoints/recipe-smollm2 --dataset zsre --n 100
