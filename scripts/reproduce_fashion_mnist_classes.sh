#!/usr/bin/env bash
# The class-protection study (docs/RESULTS.md, "Class protection over time"): the protocol of
# scripts/reproduce_fashion_mnist_stratify.sh (ResNet-18, a fixed 8,000 / 4,000 subset of Fashion-MNIST,
# 10 epochs, batch ratio 0.5 in epochs 1-8, so 0.40 of all sample-passes blocked; the exact ranking pass),
# 3 seeds paired by seed, on three training sets:
#   balanced:    800 images per class;
#   long_tail:   800 down to 80 per class (data.imbalance=0.1; classes 5-9 are the tail);
#   dense_rare:  the five classes densest at stage 1 (0, 3, 4, 6, 7: the lowest kept fractions under
#                batch-wide ranking in the earlier study) keep 80 images, the other five 800;
# each with full data, random blocking and PFB under every blocking.pfb.stratify (percentile, label, none);
# on the two long-tailed sets also share_random, the control of scripts/class_share_control.py (percentile's
# class-share term alone, random within the class).
# Then the few-rows-per-class regime of ImageNet's 1000 classes at 256 rows: batch 16 (1.6 rows of a class
# per batch), 16 centres, LR scaled to the batch, 3 epochs with blocking in epochs 1-2, seed 0; random
# blocking and every stratify choice on the balanced and dense_rare sets, for the selection diagnostics
# (selection_signal, class_kept_fraction), not for top-1.
# Finished runs are skipped; `pfb-train report` and the paired differences against random follow.
#
#   apt-get install dataset-fashion-mnist
#   PARALLEL=2 THREADS=1 scripts/reproduce_fashion_mnist_classes.sh   # 45 + 8 runs; one per core
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fashion_mnist_classes}
SEEDS=${SEEDS:-"0 1 2"}
REPORT=${REPORT:-docs/results/fashion_mnist_classes}
PARALLEL=${PARALLEL:-1}  # runs at a time, each pinned to its own core (taskset) when more than one
common=(--config fashion_mnist --set blocking.pfb.score_scale=1.0 --set blocking.pfb.score_norm=batch)

source scripts/fashion_mnist_runs.sh  # train, report_folder; DATA, THREADS and TRAIN from the environment

declare -A SET=([balanced]="" [long_tail]="--set data.imbalance=0.1"
                [dense_rare]="--set data.imbalance=0.1 --set data.rare_classes=[0,3,4,6,7]")
SETS=(balanced long_tail dense_rare)

FEW="--set data.batch_size=16 --set optim.lr=0.0125 --set schedule.epochs=3 --set blocking.pfb.centres=16
     --set blocking.pfb.end_epoch=3 --set blocking.random.end_epoch=3"

CONTROL="--set blocking.method=class_share_random --set blocking.class_share_random.stratify=percentile
         --set blocking.class_share_random.ratio=0.5 --set blocking.class_share_random.start_epoch=1
         --set blocking.class_share_random.end_epoch=9 --set blocking.class_share_random.score_scale=1.0
         --set blocking.class_share_random.score_norm=batch"

runs() {  # one line per run: set, run name, seed, overrides (the comparisons with random first)
  for seed in $SEEDS; do
    for set in "${SETS[@]}"; do
      echo "$set random_r5 $seed --set blocking.method=random --set blocking.random.ratio=0.5 ${SET[$set]}"
      for s in percentile label none; do
        echo "$set pfb_${s}_r5 $seed --set blocking.method=pfb --set blocking.pfb.stratify=$s --set blocking.pfb.ratio=0.5 ${SET[$set]}"
      done
      echo "$set full $seed ${SET[$set]}"
      [ "$set" = balanced ] || echo "$set share_random_r5 $seed" $CONTROL "${SET[$set]}"
    done
  done
  for set in balanced dense_rare; do
    echo "few_rows_$set random_r5 0 --set blocking.method=random --set blocking.random.ratio=0.5 ${SET[$set]}" $FEW
    for s in percentile label none; do
      echo "few_rows_$set pfb_${s}_r5 0 --set blocking.method=pfb --set blocking.pfb.stratify=$s --set blocking.pfb.ratio=0.5" \
        "${SET[$set]}" $FEW
    done
  done
}

claims=$(mktemp -d)  # a worker claims a run by making its folder here; the other workers skip it
worker() {
  local set name seed rest
  set -f  # the overrides are split into words, never globbed ([0,3,4,6,7] is a pattern)
  while read -r set name seed rest; do
    mkdir "$claims/${set}_${name}_$seed" 2>/dev/null || continue
    local launch=$TRAIN
    [[ $name == share_random* ]] && launch="$CORE python scripts/class_share_control.py"  # the control's method
    # shellcheck disable=SC2086  # the overrides are words
    TRAIN=$launch train "$set" "$name" "$seed" $rest < /dev/null  # the run must not read the list
  done < <(runs)
}
if ((PARALLEL > 1)); then
  for ((core = 0; core < PARALLEL; core++)); do (CORE="taskset -c $core"; TRAIN="$CORE $TRAIN"; worker) & done
  wait
else
  (CORE="" worker)  # a subshell: the worker's `set -f` must not reach the globs below
fi
rm -rf "$claims"

mkdir -p "$REPORT"
for set in "${SETS[@]}"; do  # scripts/class_kept.py reads the per-class kept fractions of every folder
  report_folder "$set" || continue
  python scripts/paired_difference.py "$OUT/$set" --reference random_r5 --match '_r5$' > "$REPORT/paired_vs_random_$set.jsonl"
done
