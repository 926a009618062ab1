#!/usr/bin/env bash
# The stratified-selection study (docs/RESULTS.md, "Stratified selection"): the protocol of
# scripts/reproduce_fashion_mnist.sh (ResNet-18, a fixed 8,000 / 4,000 subset of Fashion-MNIST, 10
# epochs, blocking in epochs 1-8, the paper's exact ranking pass), 3 seeds, for
#   full data; random blocking at 0.3 and 0.5 (0.24 and 0.40 of all sample-passes);
#   pfb_strat:     blocking.pfb.stratify=label at the default noise (rank 0.5), at 0.3 and 0.5;
#   pfb_stratlow:  stratify=label at rank 0.05 (the density decides about 0.98 of the blocked rows), 0.5;
#   pfb_classlow:  stratify=label with class-conditional density (blocking.pfb.density=class), rank 0.05, 0.5;
# then full, random and the three PFB settings at 0.5 on the long-tailed subset (data.imbalance=0.1).
# Finished runs are skipped; `pfb-train report` and the paired differences follow.
#
#   apt-get install dataset-fashion-mnist
#   scripts/reproduce_fashion_mnist_stratify.sh     # 36 runs; two at a time: SEEDS="0 1" and SEEDS=2,
#                                                   # each under taskset -c N with THREADS=1
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fashion_mnist_stratify}
SEEDS=${SEEDS:-"0 1 2"}
REPORT=${REPORT:-docs/results/fashion_mnist_stratify}
common=(--config fashion_mnist --set blocking.pfb.score_scale=1.0 --set blocking.pfb.score_norm=batch)

source scripts/fashion_mnist_runs.sh  # train, report_folder; DATA, THREADS and TRAIN from the environment

pfb=(--set blocking.method=pfb --set blocking.pfb.stratify=label)
low=(--set blocking.pfb.noise=0.05)
for seed in $SEEDS; do
  train balanced full "$seed"
  for r in 3 5; do
    train balanced "random_r$r" "$seed" --set blocking.method=random --set "blocking.random.ratio=0.$r"
    train balanced "pfb_strat_r$r" "$seed" "${pfb[@]}" --set "blocking.pfb.ratio=0.$r"
  done
  train balanced pfb_stratlow_r5 "$seed" "${pfb[@]}" --set blocking.pfb.ratio=0.5 "${low[@]}"
  train balanced pfb_classlow_r5 "$seed" "${pfb[@]}" --set blocking.pfb.ratio=0.5 "${low[@]}" --set blocking.pfb.density=class
  tail=(--set data.imbalance=0.1)
  train long_tail full "$seed" "${tail[@]}"
  train long_tail random_r5 "$seed" --set blocking.method=random --set blocking.random.ratio=0.5 "${tail[@]}"
  train long_tail pfb_strat_r5 "$seed" "${pfb[@]}" --set blocking.pfb.ratio=0.5 "${tail[@]}"
  train long_tail pfb_stratlow_r5 "$seed" "${pfb[@]}" --set blocking.pfb.ratio=0.5 "${low[@]}" "${tail[@]}"
  train long_tail pfb_classlow_r5 "$seed" "${pfb[@]}" --set blocking.pfb.ratio=0.5 "${low[@]}" \
    --set blocking.pfb.density=class "${tail[@]}"
done

for dir in balanced long_tail; do
  report_folder "$dir" || continue
  for r in 3 5; do
    [ -f "$OUT/$dir/random_r${r}_s0/summary.json" ] || continue
    python scripts/paired_difference.py "$OUT/$dir" --reference "random_r$r" --match "_r$r\$"
  done > "$REPORT/paired_vs_random_$dir.jsonl"
done
