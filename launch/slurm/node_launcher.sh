#!/usr/bin/env bash
# node_launcher.sh: start this node's DeepSpeed launcher inside an srun step (no ssh).
#
# Usage (one task per node, as train.sbatch does with LAUNCH_MODE=srun):
#   srun --ntasks-per-node=1 bash launch/slurm/node_launcher.sh \
#        deepspeed --hostfile HOSTFILE --master_addr ADDR --master_port PORT --no_ssh \
#        --no_local_rank --module pretrain.train key=value ...
#
# Adds --node_rank=$SLURM_NODEID, which differs per node and so cannot be written into the
# srun command line. SLURM numbers the nodes in node-list order, the order of the hostfile,
# so node rank 0 is the MASTER_ADDR host.
set -euo pipefail

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
node_rank=${SLURM_NODEID:?node_launcher.sh must run under srun (SLURM_NODEID is not set)}

# The batch script signals the training ranks directly; the launchers must not die of USR1
# (ignored dispositions survive exec, and the trainer installs its own handler).
trap '' USR1
launcher=$1
shift
exec "$launcher" --node_rank="$node_rank" "$@"
