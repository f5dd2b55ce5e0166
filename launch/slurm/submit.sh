#!/usr/bin/env bash
# submit.sh: submit launch/slurm/train.sbatch with the allocation given as variables.
#
# Usage (from the repository root; arguments are trainer overrides):
#   NODES=4 GPUS_PER_NODE=8 TIME=24:00:00 ACCOUNT=my_acct PARTITION=gpu \
#       launch/slurm/submit.sh experiment=smoke
#   DRY_RUN=1 NODES=2 launch/slurm/submit.sh experiment=smoke   # print the sbatch command
#
# Variables: NODES [1], GPUS_PER_NODE [8], TIME [24:00:00], ACCOUNT, PARTITION, QOS,
# JOB_NAME [biglearn], SBATCH_EXTRA (more sbatch flags, space separated). Everything else in
# the environment (LAUNCH_MODE, RUN_DIR, PREFLIGHT_ARGS, NCCL_* ...) reaches train.sbatch,
# because sbatch exports the submitting environment by default.
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
read -ra extra <<< "${SBATCH_EXTRA:-}"
cmd=(sbatch
     --job-name="${JOB_NAME:-biglearn}"
     --nodes="${NODES:-1}"
     --gpus-per-node="$GPUS_PER_NODE"
     --time="${TIME:-24:00:00}"
     ${ACCOUNT:+--account="$ACCOUNT"}
     ${PARTITION:+--partition="$PARTITION"}
     ${QOS:+--qos="$QOS"}
     ${extra[@]+"${extra[@]}"}
     "$(dirname "$0")/train.sbatch" "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '+ '; printf '%q ' "${cmd[@]}"; echo
else
    "${cmd[@]}"
fi
