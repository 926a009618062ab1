#!/usr/bin/env bash
# One node, all its GPUs: ./scripts/torchrun_single_node.sh resnet50_pfb40 [--set key=value ...]
# data.batch_size is per process: the global batch is nproc x batch_size.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}
shift
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --standalone --nproc_per_node="$NPROC" -m pfb_train --config "$CONFIG" "$@"
