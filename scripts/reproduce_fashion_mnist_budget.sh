#!/usr/bin/env bash
# The equal-compute study (docs/RESULTS.md, "Equal compute"): ResNet-18 on the fixed 8,000 / 4,000 subset of
# Fashion-MNIST at 28 px (configs/fashion_mnist.yaml: a 10-epoch cosine schedule, 1 warm-up epoch, blocking
# in epochs 1-9 of it), each run given a compute budget (schedule.budget, full-data epochs counted by the
# cost model from the realised rows) over which that schedule is stretched. 3 seeds, paired by seed:
#   balanced:   full data, PFB, random blocking and InfoBatch, each with their default options, at budgets 6
#               and 10 (the blocked methods train more epochs than full data within the same compute);
#   long_tail:  the same four at budget 6, 800 down to 80 images per class (data.imbalance=0.1).
# Finished runs are skipped; then `pfb-train report` per folder (against its full-data runs) and over all
# balanced runs against full data at budget 10 (top-1 against compute, compute to reach its top-1).
#
#   apt-get install dataset-fashion-mnist
#   PARALLEL=2 THREADS=1 scripts/reproduce_fashion_mnist_budget.sh   # 36 runs; one per core
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fashion_mnist_budget}
SEEDS=${SEEDS:-"0 1 2"}
REPORT=${REPORT:-docs/results/fashion_mnist_budget}
PARALLEL=${PARALLEL:-1}  # runs at a time, each pinned to its own core (taskset) when more than one
common=(--config fashion_mnist)

source scripts/fashion_mnist_runs.sh  # train, report_folder; DATA, THREADS and TRAIN from the environment

METHODS=(full pfb random infobatch)
declare -A METHOD=([full]=none [pfb]=pfb [random]=random [infobatch]=infobatch)
FOLDERS=(balanced_b6 balanced_b10 long_tail_b6)

runs() {  # one line per run: folder, run name, seed, overrides
  for seed in $SEEDS; do
    for budget in 6 10; do
      for m in "${METHODS[@]}"; do
        echo "balanced_b$budget $m $seed --set blocking.method=${METHOD[$m]} --set schedule.budget=$budget"
      done
    done
    for m in "${METHODS[@]}"; do
      echo "long_tail_b6 $m $seed --set blocking.method=${METHOD[$m]} --set schedule.budget=6 --set data.imbalance=0.1"
    done
  done
}

claims=$(mktemp -d)  # a worker claims a run by making its folder here; the other workers skip it
worker() {
  local folder name seed rest
  set -f  # the overrides are split into words, never globbed
  while read -r folder name seed rest; do
    mkdir "$claims/${folder}_${name}_$seed" 2>/dev/null || continue
    # shellcheck disable=SC2086  # the overrides are words
    train "$folder" "$name" "$seed" $rest < /dev/null  # the run must not read the list
  done < <(runs)
}
if ((PARALLEL > 1)); then
  for ((core = 0; core < PARALLEL; core++)); do (TRAIN="taskset -c $core $TRAIN"; worker) & done
  wait
else
  (worker)  # a subshell: the worker's `set -f` must not reach the globs below
fi
rm -rf "$claims"

mkdir -p "$REPORT"
for folder in "${FOLDERS[@]}"; do
  report_folder "$folder" || continue
  python scripts/paired_difference.py "$OUT/$folder" --reference full > "$REPORT/paired_vs_full_$folder.jsonl"
  python scripts/paired_difference.py "$OUT/$folder" --reference random --match 'pfb|infobatch' \
    > "$REPORT/paired_vs_random_$folder.jsonl"
done
# Every balanced run on one plot and in one table, against full data at budget 10.
baselines=()
for run in "$OUT"/balanced_b10/full_s*; do baselines+=(--baseline "$run"); done
$TRAIN report "$OUT"/balanced_b6/*_s* "$OUT"/balanced_b10/*_s* "${baselines[@]}" --out "$REPORT/balanced"
