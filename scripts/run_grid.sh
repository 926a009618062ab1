#!/usr/bin/env bash
# Train each config (skipping finished runs), then report them against the first config's run.
#   scripts/run_grid.sh REPORT_DIR BASELINE_CONFIG CONFIG... [-- extra pfb-train arguments]
# Environment: OUT (runs folder), DATA (data.root), LAUNCH (launcher command; default pfb-train).
set -euo pipefail
report_dir=$1; shift
configs=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do configs+=("$1"); shift; done
[ $# -gt 0 ] && shift  # the remaining arguments go to every run
: "${OUT:?set OUT}"
LAUNCH=${LAUNCH:-pfb-train}
data_args=(); [ -n "${DATA:-}" ] && data_args=(--set "data.root=$DATA")
run_dirs=()
for config in "${configs[@]}"; do
  name=$(python -c "from pfb_train.config import load_config; print(load_config('$config').name)")
  run_dirs+=("$OUT/$name")
  [ -f "$OUT/$name/summary.json" ] && continue  # finished already
  $LAUNCH --config "$config" "${data_args[@]}" --set runtime.output="$OUT" "$@"
done
pfb-train report "${run_dirs[@]}" --baseline "${run_dirs[0]}" --out "$report_dir"
