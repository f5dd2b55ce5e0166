"""`biglearn`: one command line for the whole project (also `python -m pretrain`).

    biglearn <command> [arguments]        biglearn <command> --help

Config-driven commands (train, finetune) take Hydra overrides (`key=value`, `group=option`,
schemas in pretrain/train/config.py and pretrain/finetune/config.py); eval takes `key=value`
arguments; every other command takes flags. Each command is also `python -m <module>` (right column).
"""
from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv, prog), arguments put first, what it does, its `python -m` form)
COMMANDS = {
    "data": ("data_pipeline.__main__", (), "train a tokenizer, build shards or a demo dataset, inspect a dataset",
             "data_pipeline"),
    "train": ("pretrain.train.run", (), "pretrain (DeepSpeed ZeRO, exact resume); Hydra overrides", "pretrain.train"),
    "finetune": ("pretrain.finetune.run", (), "fine-tune for classification (FT or big-learn); Hydra overrides",
                 "pretrain.finetune"),
    "eval": ("pretrain.train.evaluate", (), "evaluation matrix of a run, checkpoint or export; key=value",
             "pretrain.train.evaluate"),
    "score": ("pretrain.infer.cli", ("score",), "exact log p(x_T | x_S) for a prediction order", "pretrain.infer score"),
    "complete": ("pretrain.infer.cli", ("complete",), "fill gaps / continue text in any order",
                 "pretrain.infer complete"),
    "classify": ("pretrain.infer.cli", ("classify",), "p(y | x) from a fine-tuned model's label slot",
                 "pretrain.infer classify"),
    "export": ("pretrain.checkpoint.__main__", (), "consolidated fp32 safetensors from a checkpoint",
               "pretrain.checkpoint"),
    "convert": ("pretrain.hf.convert", (), "convert to and from Hugging Face checkpoints", "pretrain.hf"),
    "preflight": ("launch.preflight", (), "check GPUs, all-reduce, disk, shards and tokenizer before a job",
                  "launch.preflight"),
    "hostfile": ("launch.hostfile", (), "expand SLURM node lists, write DeepSpeed hostfiles", "launch.hostfile"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {doc}  [python -m {module_form}]"
             for name, (_, _, doc, module_form) in COMMANDS.items()]
    return (__doc__.split("\n\n")[0] + "\n\nusage: biglearn <command> [arguments]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n" + __doc__.split("\n\n", 2)[2].strip())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"biglearn: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, first, _, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    # Sub-command modules name the command the user typed in their usage lines.
    prog = "biglearn" if first else f"biglearn {command}"
    return module.main([*first, *rest], prog=prog) or 0
