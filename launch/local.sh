#!/usr/bin/env bash
# local.sh: run training on this machine through the DeepSpeed launcher, the same way a cluster
# job does (same module, same config, same env variables), for tests and debugging.
#
# Usage (from anywhere; arguments after the options are trainer overrides; relative paths in
# them are relative to the repository root, as in a cluster job):
#   launch/local.sh gpu [-n N] [key=value ...]   N GPUs (default 1) of this machine
#   launch/local.sh cpu [-n N] [key=value ...]   N CPU processes (default 2): DS_ACCELERATOR=cpu, gloo
#   launch/local.sh cpu -n 2 --preflight [preflight flags]   run launch.preflight instead
#   DRY_RUN=1 launch/local.sh cpu -n 2           print the command, run nothing
#
# SIGTERM, SIGUSR1 and SIGINT (kill, timeout, a supervisor, Ctrl-C) are forwarded to the training
# ranks only: each saves a checkpoint and exits 0, the launchers then exit by themselves and this
# script exits with their status. The launchers run in a session of their own, so a Ctrl-C at
# the terminal reaches them only through this script (DeepSpeed's launcher would kill the ranks).
#
# Trainer defaults, each skipped when you pass the key yourself:
#   experiment=smoke  run_dir=<repo>/runs/local-<mode>-<UTC time>  deepspeed=cpu (cpu mode)
# Variables: PYTHON [.venv/bin/python, else python3], DEEPSPEED [deepspeed next to PYTHON],
# MASTER_PORT [a free port], OMP_NUM_THREADS [cpu: cores / N, at least 1].
# In gpu mode with CUDA_VISIBLE_DEVICES set, the first N of those devices are used.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "local.sh: error: $*" >&2; echo "(launch/local.sh --help for usage)" >&2; exit 2; }

[[ $# -ge 1 ]] || { usage; exit 2; }
case "$1" in
    -h|--help) usage; exit 0 ;;
    gpu|cpu) MODE=$1; shift ;;
    *) die "first argument must be 'gpu' or 'cpu', got '$1'" ;;
esac
if [[ "$MODE" == cpu ]]; then NPROC=2; else NPROC=1; fi
MODULE=pretrain.train
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n) [[ $# -ge 2 ]] || die "-n needs a number"; NPROC=$2; shift 2 ;;
        --preflight) MODULE=launch.preflight; shift ;;
        -h|--help) usage; exit 0 ;;
        *) break ;;
    esac
done
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$NPROC'"

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_DIR"  # as train.sbatch does: relative paths (run_dir, data) mean the same in both
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_DIR/.venv/bin/python" ]]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${DEEPSPEED:-}" ]]; then
    DEEPSPEED=$(dirname "$(command -v "$PYTHON")")/deepspeed
    [[ -x "$DEEPSPEED" ]] || DEEPSPEED=deepspeed
fi
# A free port, so that several local runs (or test workers) do not collide on 29500.
MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}

CMD=("$DEEPSPEED" --master_port "$MASTER_PORT" --no_local_rank)
if [[ "$MODE" == cpu ]]; then
    # DeepSpeed's CPU accelerator counts LOCAL_SIZE "devices"; the trainer picks gloo on it.
    export DS_ACCELERATOR=cpu LOCAL_SIZE=$NPROC
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
    CMD+=(--num_gpus "$NPROC")
elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    (( ${#visible[@]} >= NPROC )) || die "-n $NPROC but CUDA_VISIBLE_DEVICES lists ${#visible[@]} device(s)"
    CMD+=(--include "localhost:$(IFS=,; echo "${visible[*]:0:NPROC}")")
else
    CMD+=(--num_gpus "$NPROC")
fi

ARGS=("$@")
if [[ "$MODULE" == pretrain.train ]]; then
    [[ " ${ARGS[*]:-} " == *" experiment="* ]] || ARGS=("experiment=smoke" "${ARGS[@]}")
    [[ " ${ARGS[*]} " == *" run_dir="* ]] || ARGS+=("run_dir=$REPO_DIR/runs/local-$MODE-$(date -u +%Y%m%d-%H%M%S)")
    # configs/deepspeed/cpu.yaml: fp32, torch AdamW, and CPU even where torch could see a GPU.
    [[ "$MODE" == gpu || " ${ARGS[*]} " == *" deepspeed="* ]] || ARGS+=("deepspeed=cpu")
fi
CMD+=(--module "$MODULE" ${ARGS[@]+"${ARGS[@]}"})

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    [[ "$MODE" == cpu ]] && echo "+ export DS_ACCELERATOR=cpu LOCAL_SIZE=$NPROC OMP_NUM_THREADS=$OMP_NUM_THREADS"
    printf '+ '; printf '%q ' "${CMD[@]}"; echo
    exit 0
fi

# The ranks are the grandchildren of the deepspeed runner (runner -> deepspeed.launcher.launch ->
# ranks); their own children (data loader workers) ignore these signals by design.
rank_pids() {
    local launcher
    for launcher in $(pgrep -P "$RUNNER_PID" || true); do pgrep -P "$launcher" || true; done
}
forward() {
    local ranks tries=0
    echo "local.sh: SIG$1: asking the training ranks to checkpoint and exit" >&2
    ranks=$(rank_pids)
    while [[ -z "$ranks" ]] && kill -0 "$RUNNER_PID" 2> /dev/null && (( tries++ < 120 )); do
        sleep 0.5  # not started yet: the signal must not be lost
        ranks=$(rank_pids)
    done
    [[ -n "$ranks" ]] && kill -s "$1" $ranks 2> /dev/null
    return 0
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT' INT
setsid "${CMD[@]}" &
RUNNER_PID=$!
while true; do
    status=0
    wait "$RUNNER_PID" || status=$?
    # wait returns > 128 when a trapped signal interrupts it; keep waiting for the launcher.
    kill -0 "$RUNNER_PID" 2> /dev/null || break
done
exit "$status"
