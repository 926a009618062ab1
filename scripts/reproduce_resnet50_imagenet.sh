#!/usr/bin/env bash
# The paper's ResNet-50 / ImageNet table: full data, PFB 30/40/50 %, random 40 %, InfoBatch; then the report.
#   DATA=/data/imagenet ./scripts/reproduce_resnet50_imagenet.sh [--set key=value ...]
# LAUNCH picks the launcher (default: torchrun on all local GPUs), e.g. across nodes with SLURM:
#   LAUNCH="srun torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=\$HOST:29500 -m pfb_train"
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/resnet50_imagenet}
export LAUNCH=${LAUNCH:-"torchrun --standalone --nproc_per_node=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))') -m pfb_train"}
exec scripts/run_grid.sh "$OUT/report" resnet50_imagenet resnet50_pfb30 resnet50_pfb40 resnet50_pfb50 \
  resnet50_random40 resnet50_infobatch -- "$@"
