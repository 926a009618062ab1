#!/usr/bin/env bash
# Full data vs random vs PFB vs InfoBatch at 30/50/70 %, 3 seeds each, on the digits images, then the
# report (docs/RESULTS.md quotes its output). Finished runs are skipped, so the script can be re-run.
# Times are wall-clock: run it on an otherwise idle machine.  ~15 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/digits}
TRAIN=${TRAIN:-pfb-train}
SEEDS=${SEEDS:-"0 1 2"}
train() {  # name, then overrides
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] && return 0
  rm -rf "${OUT:?}/$name"
  $TRAIN --config digits --set "name=$name" --set "runtime.output=$OUT" "$@"
}
for seed in $SEEDS; do
  train "full_s$seed" --set runtime.seed="$seed"
  for ratio in 0.3 0.5 0.7; do
    train "random${ratio#0.}_s$seed" --set runtime.seed="$seed" --set blocking.method=random --set blocking.random.ratio="$ratio"
    train "pfb${ratio#0.}_s$seed" --set runtime.seed="$seed" --set blocking.method=pfb --set blocking.pfb.ratio="$ratio"
    train "infobatch${ratio#0.}_s$seed" --set runtime.seed="$seed" --set blocking.method=infobatch \
      --set blocking.infobatch.prune_ratio="$ratio"
  done
done
baselines=()
for seed in $SEEDS; do baselines+=(--baseline "$OUT/full_s$seed"); done
pfb-train report "$OUT"/*_s* "${baselines[@]}" --out "${REPORT:-docs/results/digits}"
