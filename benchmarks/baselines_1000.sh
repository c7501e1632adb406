#!/usr/bin/env bash
# Reproduces benchmarks/results/baselines/*-1000 and benchmarks/results/general/general-*-1000: every weight
# editor at T=1000 (1,000 sequential edits of the seed-0 shuffle, all cases scored, free generation
# included) through the same loop as RECIPE, then general ability from the state each run saved.
#   RECIPE_DATA_DIR=/path/to/data bash benchmarks/baselines_1000.sh [run-name ...]
# e.g. `bash benchmarks/baselines_1000.sh rome-zsre-1000 general-rome-zsre-1000`.
#
# CPU cost here (2 cores, one torch thread per run, 2-3 runs at once): MEND and FT-L ~1-2 s per edit,
# FT-M ~4.5 s, T-Patcher ~8-13 s, GRACE ~9-18 s, ROME ~10-20 s, MEMIT ~15-20 s, so 3-6 hours per slow
# run. Every run resumes (--resume) from its last checkpoint (--checkpoint-every; with --save-states
# the editor's state is kept too), so the script can be stopped and started again at any time.
# Afterwards: `.venv/bin/python benchmarks/editors_table.py` refreshes benchmarks/results/editors/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
base=benchmarks/results/baselines
general=benchmarks/results/general
WANT="$*"
selected() { [ -z "$WANT" ] || [[ " $WANT " == *" $1 "* ]]; }  # no names given: every run
# A round still unfinished when a session ends is parked in benchmarks/parked/<run>/ (committed) with
# `.venv/bin/python benchmarks/park.py park <run>`; the next session's run starts from it, and the
# parked copy goes once the run's results are written.
run() { name=$1; shift; selected "$name" || return 0
        .venv/bin/python benchmarks/park.py unpark "$name"
        .venv/bin/recipe eval --out "runs/$name" --resume "$@"; mkdir -p "$base/$name"
        cp "runs/$name"/{summary.json,table.txt,metrics.png,run.json} "$base/$name/"
        rm -rf "benchmarks/parked/$name"; }
grun() { name=$1; shift; selected "$name" || return 0
         .venv/bin/python benchmarks/park.py unpark "${name#general-}"  # the eval run's kept state, if parked
         .venv/bin/recipe general --out "runs/$name" --n 30 --seed 0 "$@"; mkdir -p "$general/$name"
         cp "runs/$name"/{general.json,general.txt,general.png,run.json} "$general/$name/"; }

run mend-zsre-1000            --editor mend     --dataset zsre        --edits 1000
run mend-counterfact-1000     --editor mend     --dataset counterfact --edits 1000
run ft-zsre-1000              --editor ft       --dataset zsre        --edits 1000 --checkpoint-every 100 --save-states
run ftm-zsre-1000             --editor ftm      --dataset zsre        --edits 1000 --checkpoint-every 50
run ft-counterfact-1000       --editor ft       --dataset counterfact --edits 1000 --checkpoint-every 100 --save-states
run ftm-counterfact-1000      --editor ftm      --dataset counterfact --edits 1000 --checkpoint-every 50 --save-states
run grace-zsre-1000           --editor grace    --dataset zsre        --edits 1000 --checkpoint-every 20 --save-states
run grace-counterfact-1000    --editor grace    --dataset counterfact --edits 1000 --checkpoint-every 25 --save-states
run tpatcher-zsre-1000        --editor tpatcher --dataset zsre        --edits 1000 --checkpoint-every 25 --save-states
run tpatcher-counterfact-1000 --editor tpatcher --dataset counterfact --edits 1000 --checkpoint-every 25 --save-states
run rome-zsre-1000            --editor rome     --dataset zsre        --edits 1000 --checkpoint-every 10 --save-states
run rome-counterfact-1000     --editor rome     --dataset counterfact --edits 1000 --checkpoint-every 10 --save-states
run memit-zsre-1000           --editor memit    --dataset zsre        --edits 1000 --checkpoint-every 10 --save-states
run memit-counterfact-1000    --editor memit    --dataset counterfact --edits 1000 --checkpoint-every 10 --save-states

# FT-M's run above kept no state: this one applies the same 1,000 edits again and keeps it (scoring only
# 20 cases, no generation; its results are not copied anywhere).
state() { name=$1; shift; selected "$name" || return 0; .venv/bin/python benchmarks/park.py unpark "$name"
          .venv/bin/recipe eval --out "runs/$name" --resume "$@"; }
state ftm-zsre-1000-state --editor ftm --dataset zsre --edits 1000 --checkpoint-every 50 --save-states \
  --no-generation --score-cases 20

# General ability after the 1,000 zsRE edits, from the state an eval run saved (MEND and RECIPE are in
# benchmarks/general.sh).
grun general-ft-zsre-1000       --editor ft       --dataset zsre --edits 1000 --editor-state runs/ft-zsre-1000/state-T1000
grun general-grace-zsre-1000    --editor grace    --dataset zsre --edits 1000 --editor-state runs/grace-zsre-1000/state-T1000
grun general-tpatcher-zsre-1000 --editor tpatcher --dataset zsre --edits 1000 --editor-state runs/tpatcher-zsre-1000/state-T1000
grun general-rome-zsre-1000     --editor rome     --dataset zsre --edits 1000 --editor-state runs/rome-zsre-1000/state-T1000
grun general-memit-zsre-1000    --editor memit    --dataset zsre --edits 1000 --editor-state runs/memit-zsre-1000/state-T1000
grun general-ftm-zsre-1000      --editor ftm      --dataset zsre --edits 1000 --editor-state runs/ftm-zsre-1000-state/state-T1000

# ROME and MEMIT after their 1,000 CounterFact edits.
grun general-rome-counterfact-1000 --editor rome --dataset counterfact --edits 1000 \
  --editor-state runs/rome-counterfact-1000/state-T1000
grun general-memit-counterfact-1000 --editor memit --dataset counterfact --edits 1000 \
  --editor-state runs/memit-counterfact-1000/state-T1000

# FT-L and FT-M after their 1,000 CounterFact edits.
grun general-ft-counterfact-1000  --editor ft  --dataset counterfact --edits 1000 \
  --editor-state runs/ft-counterfact-1000/state-T1000
grun general-ftm-counterfact-1000 --editor ftm --dataset counterfact --edits 1000 \
  --editor-state runs/ftm-counterfact-1000/state-T1000
