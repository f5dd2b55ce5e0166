"""Evaluation matrix: NLL per token and perplexity of seven conditional tasks on validation data.

Every task is a fixed (S, T) draw per window, seeded by (eval.seed, batch, task), so numbers
are comparable across steps, runs and world sizes:

    joint          S empty, every token predicted, in a random order   (log p(x), one order)
    left_to_right  S empty, every token predicted left to right        (a causal LM's NLL)
    mlm            15% of the tokens predicted jointly from the rest   (BERT's task)
    infill         S = prefix + suffix, T = the middle, left to right  (infilling)
    biglearn       a random big-learning draw, random order            (the training task)
    prefix         S = the second half, T = the first half, left to right (what came before)
    suffix         S = the first half, T = the second half, left to right (a prefix LM's task)

Standalone: `biglearn eval ckpt=RUN_DIR_OR_CHECKPOINT_OR_EXPORT [key=value ...]`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import UserError, add_debug_flag, cli_main, require
from data_pipeline.files import atomic_write

from ..checkpoint.card import format_matrix
from ..layout import TaskBatch, collate
from ..objectives import EVAL_TASKS, ObjectiveSampler, eval_split
from ..data import DataConfig
from .composition import compose, to_schema
from .plots import plot_run

_SEED_TAG = 7919  # keeps these draws apart from the training sampler's streams


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    batches: int = 8  # validation batches per task (the same windows every time)
    batch_size: int = 0  # 0 = data.batch_size
    seed: int = 1234  # fixes the (S, T) draws, so evaluations are comparable across steps and runs
    mlm_ratio: float = 0.15
    infill_ratio: float = 0.25  # length of the infilled middle, as a fraction of the window
    plot: bool = True

    def __post_init__(self):
        for task in self.tasks:
            require(task in EVAL_TASKS, "eval.tasks", f"entries must be among {EVAL_TASKS}", task)
        require(self.batches >= 1, "eval.batches", "must be >= 1", self.batches)
        require(self.batch_size >= 0, "eval.batch_size", "must be >= 0 (0 = data.batch_size)", self.batch_size)
        require(0 < self.mlm_ratio <= 1, "eval.mlm_ratio", "must be in (0, 1]", self.mlm_ratio)
        require(0 < self.infill_ratio < 1, "eval.infill_ratio", "must be in (0, 1)", self.infill_ratio)


def validation_windows(manifest, n_batches: int, batch_size: int, split: str = "val") -> list[list[np.ndarray]]:
    """The first n_batches x batch_size windows of the validation split (or `split`), in file order.
    Read through BatchStream with the causal-LM layout, whose labels are the window itself."""
    from ..data import BatchStream

    stream = BatchStream(manifest, split=split, sampler=ObjectiveSampler("clm"), batch_size=batch_size,
                         rank=0, world_size=1, num_workers=0, shuffle=False)
    windows = []
    for batch in stream:
        windows.append([batch.labels[b, :batch.n_target[b]].copy() for b in range(batch.batch_size)])
        if len(windows) == n_batches:
            break
    if not windows:
        raise ValueError(f"{manifest}: the validation split has fewer than {batch_size} windows")
    return windows


def eval_batches(windows: list[list[np.ndarray]], config: EvalConfig, pad_id: int) -> dict[str, list[TaskBatch]]:
    """{task: [TaskBatch]} with draws seeded by (config.seed, batch index, task index)."""
    out = {}
    for task_index, task in enumerate(config.tasks):
        batches = []
        for batch_index, batch_windows in enumerate(windows):
            rng = np.random.default_rng([config.seed, _SEED_TAG, batch_index, EVAL_TASKS.index(task)])
            specs = [eval_split(task, len(w), rng, mlm_ratio=config.mlm_ratio, infill_ratio=config.infill_ratio)
                     for w in batch_windows]
            batches.append(collate(batch_windows, specs, pad_id))
        out[task] = batches
    return out


@torch.no_grad()
def evaluate(loss_fn, batches: dict[str, list[TaskBatch]], device, rank: int = 0, world_size: int = 1) -> dict:
    """{task: {"nll": per token, "ppl": exp(nll), "tokens": predicted tokens}}.

    loss_fn(TaskBatch) -> (loss, per-target NLL [B, Nt]): a DeepSpeed engine or BigLearner.loss.
    Rank r scores batches r, r + world, ...; every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively), the extra ones weighted 0, then sums are all-reduced."""
    totals = torch.zeros(len(batches), 2, dtype=torch.float64, device=device)
    for t, task_batches in enumerate(batches.values()):
        rounds = math.ceil(len(task_batches) / world_size)
        for i in range(rounds):
            index = i * world_size + rank
            real = index < len(task_batches)
            batch = task_batches[index if real else 0].to_torch(device)
            _, nll = loss_fn(batch)
            if real:
                totals[t, 0] += nll.sum().double()
                totals[t, 1] += batch.target_mask.sum().double()
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    result = {}
    for (task, _), (nll_sum, count) in zip(batches.items(), totals.tolist()):
        nll = nll_sum / max(count, 1.0)
        result[task] = {"nll": nll, "ppl": math.exp(min(nll, 700.0)), "tokens": int(count)}
    return result


# --------------------------------------------------------------------------- command line

@dataclass
class EvaluateArgs:
    ckpt: str = "???"  # run dir, checkpoints/ dir, step_* tag or exported model dir
    manifest: str | None = None  # default: the manifest the run trained on
    batches: int | None = None
    batch_size: int | None = None
    seed: int | None = None
    tasks: list[str] | None = None
    device: str = "auto"
    out: str | None = None  # JSON file for the matrix (default: print only)
    plot: str | None = None  # PNG path: loss curves of the run (when ckpt is a run) + the matrix
    trust_checkpoint: bool = False  # read a DeepSpeed checkpoint's pickles (weights-only) when no export exists


def parse_args(argv, prog: str = "biglearn eval") -> EvaluateArgs:
    """EvaluateArgs from key=value overrides, composed onto configs/evaluate.yaml like the
    training config (pretrain.train.composition): a mistyped key or value fails naming it."""
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("Standalone")[0] + "\nArguments are key=value pairs:\n" + "\n".join(
            f"  {name:<11} {doc}" for name, doc in (
                ("ckpt", "run dir, checkpoints/ dir, step_* checkpoint or exported model dir (required)"),
                ("manifest", "manifest.json whose val split is used (default: the run's)"),
                ("batches", "validation batches per task (default: the run's eval.batches)"),
                ("batch_size", "windows per batch (default: the run's)"),
                ("seed", "seed of the (S, T) draws (default: the run's eval.seed)"),
                ("tasks", f"subset of {list(EVAL_TASKS)}, e.g. tasks=[joint,mlm]"),
                ("device", "cpu, cuda or auto"),
                ("out", "write the matrix as JSON here"),
                ("plot", "write a PNG (loss curves of the run, if any, and the matrix)"))),
        epilog="example: biglearn eval ckpt=runs/demo batches=4 plot=runs/demo/eval.png")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    from omegaconf import OmegaConf

    tree = compose(args.overrides, cls=EvaluateArgs, config_name="evaluate")
    if OmegaConf.is_missing(tree, "ckpt"):
        raise UserError("ckpt=... is required: a run dir, checkpoints/ dir, step_* checkpoint or exported model dir")
    args = to_schema(tree, EvaluateArgs)
    for task in args.tasks or []:  # before a model is loaded
        require(task in EVAL_TASKS, "tasks", f"entries must be among {', '.join(EVAL_TASKS)}", task)
    return args


def _run_manifest(ckpt, meta: dict) -> str | None:
    """The manifest a run trained on: as recorded, else as its newest checkpoint records it (an
    export keeps only the manifest's name: exports hold no absolute paths)."""
    from ..checkpoint.sharded import META, find_checkpoint

    recorded = meta.get("manifest")
    if recorded and Path(recorded).is_file():
        return recorded
    tag = find_checkpoint(ckpt)
    return json.loads((tag / META).read_text()).get("manifest") if tag is not None else recorded


def _main(argv: list[str], prog: str) -> int:
    from data_pipeline import load_manifest

    from ..checkpoint.loading import load_for_inference

    args = parse_args(argv, prog)
    if args.device not in ("auto", "cpu") and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise UserError(f"device={args.device}: not a device torch sees here (cpu, auto, or cuda on a GPU machine)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model, meta = load_for_inference(args.ckpt, device, trust_checkpoint=args.trust_checkpoint)
    run = meta.get("config", {})  # the run's TrainConfig as saved (an import from Hugging Face has none)
    manifest = args.manifest or _run_manifest(args.ckpt, meta)
    if not manifest:
        raise ValueError(f"{args.ckpt} does not record its manifest: pass manifest=PATH")
    config = to_schema(run.get("eval", {}), EvalConfig)
    config = replace(config, **{k: v for k, v in (("batches", args.batches), ("seed", args.seed),
                                                  ("tasks", args.tasks)) if v is not None})
    batch_size = args.batch_size or config.batch_size or run.get("data", {}).get("batch_size", DataConfig.batch_size)
    windows = validation_windows(manifest, config.batches, batch_size)
    pad_id = int(load_manifest(manifest)["pad_id"])
    matrix = evaluate(model.loss, eval_batches(windows, config, pad_id), device)
    print(format_matrix(matrix))
    broken = [task for task, row in matrix.items() if not math.isfinite(row["nll"])]
    if args.out:
        atomic_write(Path(args.out), json.dumps(matrix, indent=2))
    if args.plot:
        run_dir = Path(meta.get("run_dir", args.ckpt))
        print(f"plot: {plot_run(run_dir if run_dir.is_dir() else args.ckpt, matrix, out=Path(args.plot))}")
    if broken:  # a number that is not one: the model's outputs are unusable, whatever the table says
        print(f"{prog}: error: the NLL of {', '.join(broken)} is not finite (NaN or inf): the model's outputs are "
              "not usable", file=sys.stderr)
        return 1
    return 0


def main(argv=None, prog: str = "biglearn eval") -> int:
    # Every ValueError of this path names the checkpoint, manifest or key it rejects.
    return cli_main(lambda args: _main(args, prog), prog, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
