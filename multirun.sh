#!/usr/bin/env bash
# Paper tables from sweeps (DESIGN.md): run a preset of conf/experiment/ as a Hydra
# multirun, then `vaa-report` over its jobs.
#   bash multirun.sh                          the synthetic paper table (experiment=paper_synthetic)
#   bash multirun.sh <experiment> [overrides] a named preset, e.g. sweep_harmful_ratio, paper_llama2
#   bash multirun.sh paper_synthetic seed=0,1,2 hydra/launcher=local   (more seeds, parallel jobs)
# Jobs write under outputs/multirun/<date>/<time>-<pid>_<experiment>/<job>/ (relative to the current
# directory); the report (report.md/.csv/.tex/.png) lands in that sweep directory. A failed job
# never stops the sweep: the report shows its cells as missing and this script exits non-zero.
set -euo pipefail

preset="${1:-paper_synthetic}"
[[ $# -gt 0 ]] && shift
conf_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/conf/experiment"
if [[ ! -f "${conf_dir}/${preset}.yaml" ]]; then
  echo "multirun.sh: no preset '${preset}' in conf/experiment/; one of:" >&2
  ls "${conf_dir}" | sed 's/\.yaml$//; s/^/  /' >&2
  exit 2
fi
command -v vaa >/dev/null || { echo "multirun.sh: no 'vaa' command; pip install -e . first" >&2; exit 2; }

export TOKENIZERS_PARALLELISM=false
sweep_dir="outputs/multirun/$(date +%Y-%m-%d)/$(date +%H-%M-%S)-$$_${preset}"  # + pid: two started in one second never share a folder
echo "multirun.sh: experiment=${preset} $* -> ${sweep_dir}"
echo "multirun.sh: stage cache ${VAA_CACHE_DIR:-~/.cache/vaa} unless paths.cache_dir=DIR is given (an empty DIR: a cold run)"
start=${SECONDS}
status=0
vaa -m "experiment=${preset}" "hydra.sweep.dir=${sweep_dir}" "$@" || status=$?
sweep_s=$((SECONDS - start))

report_args=()  # a sweep logged to W&B gets its paper table there too
for arg in "$@"; do
  case "${arg}" in
    logger=wandb) report_args+=(--wandb) ;;
    logger.project=*) report_args+=(--wandb-project "${arg#logger.project=}") ;;
  esac
done
vaa-report "${sweep_dir}" ${report_args[@]+"${report_args[@]}"} || echo "multirun.sh: no report (no job ran)" >&2
echo "multirun.sh: sweep ${sweep_s}s (report included: $((SECONDS - start))s), exit status ${status}; ${sweep_dir}/report.md"
exit "${status}"
