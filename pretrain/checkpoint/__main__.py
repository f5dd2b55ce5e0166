"""`biglearn export` (also `python -m pretrain.checkpoint`): an export from a training checkpoint."""
from __future__ import annotations

import argparse
import sys

from data_pipeline.errors import add_debug_flag, cli_main

from .loading import export_checkpoint


def _main(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export consolidated fp32 weights (model.safetensors + model_config.json) from the newest "
                    "complete checkpoint at PATH (a run dir, checkpoints/ dir or step_* dir; any ZeRO stage).",
        epilog="example: biglearn export runs/demo/checkpoints runs/demo/export_step1000 --trust-checkpoint")
    parser.add_argument("path", help="run dir, checkpoints/ dir or step_* checkpoint")
    parser.add_argument("out_dir", help="directory to write the exported model into")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="read DeepSpeed's .pt pickles (weights-only, with a small allow-list); needed, since "
                             "a checkpoint may come from anywhere")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    print(export_checkpoint(args.path, args.out_dir, trust_checkpoint=args.trust_checkpoint))
    return 0


def main(argv=None, prog: str = "python -m pretrain.checkpoint") -> int:
    return cli_main(lambda args: _main(args, prog), prog, argv)


if __name__ == "__main__":
    sys.exit(main())
