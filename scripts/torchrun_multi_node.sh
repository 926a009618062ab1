#!/usr/bin/env bash
# Run the same command on every node, e.g. two nodes of 8 GPUs:
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 ./scripts/torchrun_multi_node.sh resnet50_pfb40
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 ./scripts/torchrun_multi_node.sh resnet50_pfb40
# The run directory (runtime.output) must be on a filesystem rank 0 can write; only rank 0 writes.
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun \
  --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="${NPROC_PER_NODE:-8}" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id="${RDZV_ID:-pfb}" \
  -m pfb_train --config "$CONFIG" "$@"
