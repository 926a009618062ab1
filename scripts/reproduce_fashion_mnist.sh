#!/usr/bin/env bash
# The small-scale study on real, unsaturated images (docs/RESULTS.md, Fashion-MNIST section):
# ResNet-18 on a fixed 8,000 / 4,000 subset of Fashion-MNIST, 10 epochs (configs/fashion_mnist.yaml),
# 3 seeds, at blocked ratios 0.3 and 0.5: full data, random blocking, InfoBatch, and PFB with the
# paper's literal random term, the authors' code's literal form, and the rank term at three levels.
# Then the same methods at 0.5 on a long-tailed subset (data.imbalance=0.1: the last class keeps a
# tenth of the first's samples), with head and tail accuracy. Finished runs are skipped.
#
#   apt-get install dataset-fashion-mnist     # Debian's package: the four idx files (or DATA=folder)
#   scripts/reproduce_fashion_mnist.sh        # 69 runs: 3.5 h of run time at one thread each; 2 h here with
#                                             # two at a time (SEEDS="0 1" and SEEDS=2, each under taskset -c N)
#
# Times are wall-clock: run it on an otherwise idle machine (or pinned, e.g. `taskset -c 0` + THREADS=1).
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/fashion_mnist}
SEEDS=${SEEDS:-"0 1 2"}
REPORT=${REPORT:-docs/results/fashion_mnist}
# InfoBatch's ratio is a share of its below-mean-loss candidates: these give the realised fraction of
# the PFB runs (0.24 and 0.40: the ratio over 8 of 10 epochs), measured on this data.
# Measured: at 0.5 it skipped 0.357 of each pruning epoch (0.714 of the data were candidates).
IB30=${IB30:-0.42} IB50=${IB50:-0.70}
# The study's tables were measured with recompute mode's exact ranking pass (full size, batch statistics),
# and one ranking over the batch (stratify none; the default is now label, scripts/reproduce_fashion_mnist_stratify.sh).
common=(--config fashion_mnist --set blocking.pfb.score_scale=1.0 --set blocking.pfb.score_norm=batch
        --set blocking.pfb.stratify=none)

source scripts/fashion_mnist_runs.sh  # train, report_folder; DATA, THREADS and TRAIN from the environment

pfb_variants() {  # folder, ratio, seed, extra overrides...: every PFB form at one ratio
  local dir=$1 r=$2 seed=$3; shift 3
  train "$dir" "pfb_paper_r$r" "$seed" --set blocking.method=pfb --set "blocking.pfb.ratio=0.$r" "$@" \
    --set blocking.pfb.noise_form=density_floor --set blocking.pfb.noise=0.01 --set blocking.pfb.estimator=kde \
    --set blocking.pfb.centre_weights=counts
  train "$dir" "pfb_code_r$r" "$seed" --set blocking.method=pfb --set "blocking.pfb.ratio=0.$r" "$@" \
    --set blocking.pfb.noise_form=max_abs --set blocking.pfb.noise=0.1 --set blocking.pfb.estimator=mean_log_kernel \
    --set blocking.pfb.centre_weights=uniform
  for level in 0.05 0.2 0.5; do
    train "$dir" "pfb_rank${level#0.}_r$r" "$seed" --set blocking.method=pfb --set "blocking.pfb.ratio=0.$r" "$@" \
      --set blocking.pfb.noise_form=rank --set "blocking.pfb.noise=$level"
  done
}

for seed in $SEEDS; do
  train balanced full "$seed"
  for r in 3 5; do
    train balanced "random_r$r" "$seed" --set blocking.method=random --set "blocking.random.ratio=0.$r"
    ib=IB${r}0
    train balanced "infobatch_r$r" "$seed" --set blocking.method=infobatch --set "blocking.infobatch.prune_ratio=${!ib}"
    pfb_variants balanced "$r" "$seed"
  done
  tail=(--set data.imbalance=0.1)
  train long_tail full "$seed" "${tail[@]}"
  train long_tail random_r5 "$seed" --set blocking.method=random --set blocking.random.ratio=0.5 "${tail[@]}"
  train long_tail infobatch_r5 "$seed" --set blocking.method=infobatch --set "blocking.infobatch.prune_ratio=$IB50" "${tail[@]}"
  pfb_variants long_tail 5 "$seed" "${tail[@]}"
done

for dir in balanced long_tail; do
  report_folder "$dir" || continue
done
