# Shared by scripts/reproduce_fashion_mnist*.sh (sourced): one run, and the report of a folder of runs.
# Expects OUT, REPORT and the array `common` (the overrides every run gets) to be set; adds the
# environment's DATA (a folder of the idx files) and THREADS to `common`, and runs TRAIN (pfb-train).

TRAIN=${TRAIN:-pfb-train}
[ -n "${DATA:-}" ] && common+=(--set "data.root=$DATA")
[ -n "${THREADS:-}" ] && common+=(--set "runtime.threads=$THREADS")

train() {  # folder, run name, seed, overrides...: skipped when finished
  local dir=$1 name=$2 seed=$3; shift 3
  [ -f "$OUT/$dir/${name}_s$seed/summary.json" ] && return 0
  rm -rf "${OUT:?}/$dir/${name}_s$seed"
  $TRAIN "${common[@]}" --set "name=${name}_s$seed" --set "runtime.output=$OUT/$dir" --set "runtime.seed=$seed" "$@"
}

report_folder() {  # folder: pfb-train report against its full_s* runs; returns 1 while runs are unfinished
  local dir=$1 runs finished baselines=() run
  runs=("$OUT/$dir"/*_s*)
  finished=("$OUT/$dir"/*_s*/summary.json)
  if [ ${#runs[@]} -eq 0 ] || [ ${#runs[@]} -ne ${#finished[@]} ]; then  # another invocation may still train
    echo "$dir: $(( ${#runs[@]} - ${#finished[@]} )) of ${#runs[@]} run(s) unfinished; run this script again when they are done"
    return 1
  fi
  for run in "$OUT/$dir"/full_s*; do baselines+=(--baseline "$run"); done
  $TRAIN report "${runs[@]}" "${baselines[@]}" --out "$REPORT/$dir"
}
