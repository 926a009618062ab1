#!/usr/bin/env bash
# The paper's ResNet-18 / CIFAR tables: CIFAR-10 and CIFAR-100, full data, PFB and random at 30/50/70 %,
# InfoBatch; one report per dataset.   DATA=/data/cifar ./scripts/reproduce_resnet18_cifar.sh [--set key=value ...]
# One GPU per run (LAUNCH defaults to pfb-train).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/resnet18_cifar}
for ds in cifar10 cifar100; do
  scripts/run_grid.sh "$OUT/report_$ds" "resnet18_$ds" \
    "resnet18_${ds}_pfb30" "resnet18_${ds}_pfb50" "resnet18_${ds}_pfb70" \
    "resnet18_${ds}_random30" "resnet18_${ds}_random50" "resnet18_${ds}_random70" "resnet18_${ds}_infobatch" -- "$@"
done
