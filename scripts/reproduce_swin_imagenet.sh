#!/usr/bin/env bash
# The paper's Swin-T / ImageNet table (300 epochs): full data, PFB 30/40/50 %, InfoBatch; then the report.
#   DATA=/data/imagenet ./scripts/reproduce_swin_imagenet.sh [--set key=value ...]   (LAUNCH as in the ResNet-50 script)
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/swin_tiny_imagenet}
export LAUNCH=${LAUNCH:-"torchrun --standalone --nproc_per_node=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))') -m pfb_train"}
exec scripts/run_grid.sh "$OUT/report" swin_tiny_imagenet swin_tiny_pfb30 swin_tiny_pfb40 swin_tiny_pfb50 \
  swin_tiny_infobatch -- "$@"
