"""Launch tooling: SLURM/DeepSpeed scripts, hostfile generation, preflight checks."""
