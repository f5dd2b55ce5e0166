"""Which objective should a lab pretrain with? An equal-compute shootout.

One tiny model per objective, all with the same dims and the same harness (the one training
step, pretrain.train.engine.LocalEngine.train_batch; AdamW, linear warmup, then a constant learning rate), each
trained on two sources of data:

    hmm    a sticky hidden Markov model (pretrain.experiments.synthetic.HiddenMarkovSource): every
           conditional is exact, so a model's NLL is reported as a ratio to the exact NLL
    text   the built-in corpus built by the data pipeline (Python standard-library docstrings),
           or --manifest: NLL per token on the validation split

Rows (trained on): clm, mlm, plm, span, prefix_lm, mdm (objective presets), biglearn (two
streams), biglearn_1stream (model.streams=1), mixture (configs/objective/<--mixture>.yaml, by
default `generalist`, the best mixture found; see docs/benchmarks.md) and llama, transformers' LlamaForCausalLM of the same dims trained as a causal
LM (random init, no download): the causal yardstick, scored where a causal LM can score
(left_to_right, suffix). Columns: every task of pretrain.objectives.EVAL_TASKS, fixed seeded
draws, the same for every row.

Two budgets, one run per model:
    time    the same compute time per model (primary): --seconds of this process's CPU time
            with one torch thread, i.e. the wall-clock of an idle core whatever the machine load
    tokens  the same number of training tokens: what the first row (clm: every token a target,
            the costliest two-stream step) reads in --seconds; later rows are snapshotted there
The learning rate is constant after warmup, so both budgets and the learning curves are
snapshots of the same run (no schedule favours either budget).

Writes OUT/shootout.json (rows), OUT/shootout.md (the tables in Markdown), OUT/shootout.png
(heatmaps) and OUT/curves.png (learning curves).

    python bench/shootout.py --jobs 2         # full run: 10 models x 2 data sets x 30 s, ~15 min idle
    python bench/shootout.py --models clm,biglearn --seconds 20
    python bench/shootout.py --quick          # seconds; checks the script runs
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads OpenMP: one thread per model

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from biglearn_kernels import INVALID_GROUP  # noqa: E402
from data_pipeline.files import atomic_write  # noqa: E402
from pretrain.layout import IGNORE_LABEL, TaskBatch, collate  # noqa: E402
from pretrain.model import BigLearner, ModelConfig  # noqa: E402
from pretrain.objectives import EVAL_TASKS, ObjectiveSampler, eval_split  # noqa: E402
from pretrain.experiments.synthetic import HiddenMarkovSource, model_target_log_probs  # noqa: E402
from pretrain.train.engine import LocalEngine  # noqa: E402
from pretrain.train.task import LossModel  # noqa: E402

BUDGETS = ("time", "tokens")
CAUSAL_TASKS = ("left_to_right", "suffix")  # what a causal LM can score: a prefix, then the rest in order
# Each specialist's own task (the goals compare the best big-learning model with it there).
OWN_TASK = {"clm": "left_to_right", "llama": "left_to_right", "mlm": "mlm", "span": "infill", "prefix_lm": "suffix"}
GENERALISTS = ("biglearn", "biglearn_1stream", "mixture")
GOAL_SPECIALIST_GAP, GOAL_EXACT_GAP = 0.03, 0.05


@dataclass
class Contestant:
    name: str
    objective: str  # configs/objective/<objective>.yaml
    model: dict = field(default_factory=dict)  # ModelConfig overrides
    llama: bool = False
    weight_decay: float = 0.01  # AdamW's

    def unavailable(self) -> str | None:
        """Why this row cannot run on this checkout, or None."""
        if not (_config_dir() / "objective" / f"{self.objective}.yaml").is_file():
            return f"objective {self.objective!r} not yet available"
        missing = set(self.model) - {f.name for f in dataclasses.fields(ModelConfig)}
        return f"ModelConfig.{sorted(missing)[0]} not yet available" if missing else None


def contestants(mixture: str, mixture_streams: int = 2) -> list[Contestant]:
    return [Contestant("clm", "clm"), Contestant("mlm", "mlm"), Contestant("plm", "plm"),
            Contestant("span", "span"), Contestant("prefix_lm", "prefix_lm"), Contestant("mdm", "mdm"),
            Contestant("biglearn", "biglearn"), Contestant("biglearn_1stream", "biglearn", {"streams": 1}),
            Contestant("mixture", mixture, {"streams": mixture_streams} if mixture_streams != 2 else {}),
            Contestant("llama", "clm", llama=True)]


def _config_dir() -> Path:
    from pretrain.train.config import CONFIG_DIR
    return CONFIG_DIR


@functools.lru_cache(maxsize=None)
def objective_sampler(name: str) -> ObjectiveSampler:
    """The sampler of configs/objective/<name>.yaml (stateless: draws come from the caller's rng)."""
    from pretrain.train.config import load_config
    return ObjectiveSampler(load_config([f"objective={name}"]).objective)


# --------------------------------------------------------------------------- causal yardstick

class CausalYardstick(torch.nn.Module):
    """transformers' LlamaForCausalLM behind BigLearner's interface (forward -> logits per target
    row, loss -> (mean NLL, {})), for the batches a causal LM can score: S a prefix (possibly
    empty), T the rest, left to right, one token per group. Token id vocab_size is its BOS, so it
    predicts x_0 from nothing, as BigLearner does with an empty S; its logits are restricted to
    the real vocabulary, so both score the same distribution over the same tokens."""

    def __init__(self, config: ModelConfig):
        from types import SimpleNamespace

        from transformers import LlamaForCausalLM

        from pretrain.hf.convert import hf_config

        super().__init__()
        self.vocab_size = config.vocab_size
        # The same dims as pretrain.hf.convert's export of a BigLearner, plus one token for BOS.
        llama_config = hf_config(BigLearner(config), SimpleNamespace(bos_id=None, eos_id=None, pad_id=None))
        llama_config.vocab_size, llama_config.bos_token_id = config.vocab_size + 1, config.vocab_size
        llama_config.initializer_range, llama_config.use_cache = config.init_std, False
        self.llama = LlamaForCausalLM(llama_config)

    @staticmethod
    def can_score(batch: TaskBatch) -> bool:
        """Kept rows in original order (S ascending, then T ascending) and one target per group."""
        kept = torch.as_tensor(batch.groups) != INVALID_GROUP
        column = torch.arange(kept.shape[1])[None]
        in_order = bool(((torch.as_tensor(batch.positions) == column) | ~kept).all())
        mask = torch.as_tensor(batch.target_mask)
        steps = torch.arange(1, mask.shape[1] + 1)[None].expand_as(mask)
        return in_order and bool((torch.as_tensor(batch.target_groups)[mask] == steps[mask]).all())

    def forward(self, batch: TaskBatch) -> torch.Tensor:
        if not self.can_score(batch):
            raise ValueError("the causal yardstick scores only a prefix followed by the rest, left to right")
        bos = torch.full_like(batch.tokens[:, :1], self.vocab_size)
        logits = self.llama(input_ids=torch.cat([bos, batch.tokens[:, :-1]], dim=1)).logits[..., :self.vocab_size]
        index = batch.target_index[:, :, None].expand(-1, -1, self.vocab_size)
        return logits.gather(1, index)

    def loss(self, batch: TaskBatch):
        nll = F.cross_entropy(self(batch).flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE_LABEL)
        return nll, {}


def build_model(contestant: Contestant, vocab_size: int, args) -> torch.nn.Module:
    config = ModelConfig(vocab_size=vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                         ffn_hidden=args.ffn, attention_backend="torch", **contestant.model)
    return CausalYardstick(config) if contestant.llama else BigLearner(config)


# --------------------------------------------------------------------------- data

@dataclass
class Dataset:
    name: str
    vocab_size: int
    length: int              # tokens per training window
    windows: list            # evaluation windows (1-D token arrays)
    train_batches: object    # (sampler, seed) -> iterator of numpy TaskBatch
    exact: object = None     # (windows, specs) -> exact per-target log-probs, or None
    corpus: object = None    # n -> (n, length) array: a fixed training set of n windows (the ladder's)


def hmm_dataset(args) -> Dataset:
    source = HiddenMarkovSource.random(args.hmm_hidden, args.hmm_symbols, args.hmm_stay, seed=args.seed)
    windows = list(source.sample(args.eval_samples, args.length, np.random.default_rng([args.seed, 1])))

    def train_batches(sampler, seed):
        rng = np.random.default_rng([seed, 2])
        while True:
            x = source.sample(args.batch_size, args.length, rng)
            yield collate(x, [sampler(args.length, rng) for _ in range(args.batch_size)], pad_id=0)

    return Dataset("hmm", source.vocab_size, args.length, windows, train_batches,
                   exact=lambda w, specs: source.target_log_probs(np.stack(w), specs),
                   corpus=lambda n: source.sample(n, args.length, np.random.default_rng([args.seed, 4])))


def text_dataset(args) -> Dataset:
    from data_pipeline import build_demo, load_manifest
    from pretrain.data import BatchStream
    from pretrain.train.evaluate import validation_windows

    manifest = args.manifest or build_demo(Path(args.out) / "data", vocab_size=args.text_vocab,
                                           seq_len=args.length, stdlib_limit=args.stdlib_limit, progress=True)
    meta = load_manifest(manifest)
    n_batches = math.ceil(args.eval_samples / args.batch_size)
    windows = [w for batch in validation_windows(manifest, n_batches, args.batch_size) for w in batch]

    def train_batches(sampler, seed):
        yield from BatchStream(manifest, split="train", sampler=sampler, batch_size=args.batch_size, seed=seed)

    def corpus(n):  # the first n windows of the training split, in file order
        first = [w for batch in validation_windows(manifest, math.ceil(n / args.batch_size), args.batch_size,
                                                   split="train") for w in batch][:n]
        if len(first) < n:
            raise SystemExit(f"--train-windows {n}: {manifest} has only {len(first)} training windows")
        return np.stack(first)

    return Dataset("text", int(meta["vocab_size"]), int(meta["seq_len"]), windows[:args.eval_samples], train_batches,
                   corpus=corpus)


def eval_specs(data: Dataset, seed: int) -> dict:
    return {task: [eval_split(task, len(w), np.random.default_rng([seed, 3, i])) for w in data.windows]
            for i, task in enumerate(EVAL_TASKS)}


def score(model, data: Dataset, specs: dict, tasks=EVAL_TASKS, n: int | None = None) -> dict:
    """{task: NLL per target token} on the first n windows; None where the model cannot score."""
    out = {}
    for task in tasks:
        windows, task_specs = data.windows[:n], specs[task][:n]
        if isinstance(model, CausalYardstick) and task not in CAUSAL_TASKS:
            out[task] = None
            continue
        out[task] = float(-np.concatenate(model_target_log_probs(model, windows, task_specs)).mean())
    return out


# --------------------------------------------------------------------------- training

@dataclass
class Run:
    snapshots: dict = field(default_factory=dict)  # budget -> {"state", "steps", "tokens", "seconds"}
    curve: list = field(default_factory=list)      # {"seconds", "tokens", task: NLL}


def make_engine(contestant: Contestant, vocab_size: int, args) -> tuple:
    """(model, engine): a fresh model seeded by --seed, AdamW with linear warmup then a constant rate."""
    torch.manual_seed(args.seed)
    model = build_model(contestant, vocab_size, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=contestant.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    return model, LocalEngine(LossModel(model), optimizer, schedule)


def timed_step(engine, batches, contestant: Contestant, data_name: str, step: int) -> tuple[float, int, float]:
    """One training step on the next batch: (its process CPU seconds, its windows, its loss). A
    non-finite loss stops the row with the contestant, dataset and step named."""
    start = time.process_time()
    batch = next(batches)
    loss = engine.train_batch(batch.to_torch())
    spent = time.process_time() - start
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"{contestant.name} on {data_name}: loss {loss.item()} at step {step}")
    return spent, batch.batch_size, loss.item()


def train(contestant: Contestant, data: Dataset, args, token_budget: int | None, curve_specs: dict, bar) -> tuple:
    """Train one model until both budgets are spent; returns (model, Run)."""
    model, engine = make_engine(contestant, data.vocab_size, args)
    batches = data.train_batches(objective_sampler(contestant.objective), args.seed)
    run, clock, tokens, steps, next_point = Run(), 0.0, 0, 0, 0.0
    curve_tasks = [OWN_TASK[contestant.name]] if contestant.name in OWN_TASK else sorted(set(OWN_TASK.values()))
    while True:
        if clock >= next_point or (clock >= args.seconds > run.curve[-1]["seconds"]):  # and one at the end
            run.curve.append({"seconds": clock, "tokens": tokens,
                              **score(model, data, curve_specs, curve_tasks, n=args.curve_samples)})
            next_point += args.seconds / args.curve_points
        for budget, spent in (("time", clock >= args.seconds), ("tokens", token_budget and tokens >= token_budget)):
            if spent and budget not in run.snapshots:
                run.snapshots[budget] = {"state": copy.deepcopy(model.state_dict()), "steps": steps,
                                         "tokens": tokens, "seconds": clock}
        if "time" in run.snapshots and (token_budget is None or "tokens" in run.snapshots):
            break
        spent, windows, loss = timed_step(engine, batches, contestant, data.name, steps)
        clock, steps, tokens = clock + spent, steps + 1, tokens + windows * data.length
        bar.update(min(spent, max(0.0, args.seconds - (clock - spent))))
        bar.set_postfix_str(f"{data.name} {contestant.name} step {steps} loss {loss:.3f}")
    if token_budget is None:
        run.snapshots["tokens"] = run.snapshots["time"]
    return model, run


def shootout(args, data: Dataset, rows: list, curves: dict, bar) -> None:
    """Train and score every contestant on one data set; appends JSON rows."""
    specs = eval_specs(data, args.seed)
    exact = {t: float(-np.concatenate(data.exact(data.windows, specs[t])).mean()) for t in EVAL_TASKS} if data.exact else None
    token_budget = None
    for contestant in contestants(args.mixture, args.mixture_streams):
        if args.models and contestant.name not in args.models:
            continue
        reason = contestant.unavailable()
        if reason:
            rows.append({"data": data.name, "model": contestant.name, "unavailable": reason})
            bar.update(args.seconds)
            continue
        model, run = train(contestant, data, args, token_budget, specs, bar)
        token_budget = token_budget or run.snapshots["tokens"]["tokens"]
        curves[(data.name, contestant.name)] = run.curve
        for budget in BUDGETS:
            snap = run.snapshots[budget]
            model.load_state_dict(snap["state"])
            nll = score(model, data, specs)
            row = {"data": data.name, "model": contestant.name, "budget": budget,
                   **{k: snap[k] for k in ("steps", "tokens", "seconds")}, "nll": nll}
            if exact:
                row["exact_nll"] = exact
                row["ratio"] = {t: None if v is None else v / exact[t] for t, v in nll.items()}
            rows.append(row)


# --------------------------------------------------------------------------- reporting

def metric(row: dict) -> dict:
    return row["ratio"] if "ratio" in row else row["nll"]


def table(rows: list, data: str, budget: str, markdown: bool = False) -> str:
    """Rows: trained on; columns: evaluation tasks, then steps, tokens and CPU seconds spent."""
    mine = [r for r in rows if r["data"] == data and r.get("budget", budget) == budget]
    unit = "ratio to exact NLL" if data == "hmm" else "NLL per token"
    header = ["trained on", *EVAL_TASKS, "steps", "tokens", "cpu s"]
    body = []
    if data == "hmm" and any("exact_nll" in r for r in mine):
        exact = next(r["exact_nll"] for r in mine if "exact_nll" in r)
        body.append(["(exact NLL)", *(f"{exact[t]:.4f}" for t in EVAL_TASKS), "", "", ""])
    for r in mine:
        if "unavailable" in r:
            body.append([r["model"], r["unavailable"]] + [""] * (len(header) - 2))
            continue
        values = metric(r)
        body.append([r["model"], *("n/a" if values[t] is None else f"{values[t]:.4f}" for t in EVAL_TASKS),
                     str(r["steps"]), str(r["tokens"]), f"{r['seconds']:.1f}"])
    title = f"{data} | budget: {budget} | {unit} (lower is better)"
    if markdown:
        return "\n".join([f"**{title}**", "", "| " + " | ".join(header) + " |",
                          "|---" + "|---:" * (len(header) - 1) + "|"] + ["| " + " | ".join(row) + " |" for row in body])
    widths = [18] + [14] * len(EVAL_TASKS) + [8, 10, 7]
    lines = ["", title, "".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths)))]
    for row in body:
        if len(row) > 1 and row[1] and not row[2]:  # an unavailable row: its reason, unpadded
            lines.append(f"{row[0]:<18}{row[1]}")
        else:
            lines.append("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def goals(rows: list, data: str) -> list[dict]:
    """At equal time: best generalist vs each specialist on its own task, and (hmm) vs exact."""
    timed = {r["model"]: metric(r) for r in rows if r["data"] == data and r.get("budget") == "time"}
    generalists = [g for g in GENERALISTS if g in timed]
    specialists = [s for s in OWN_TASK if s in timed]
    if not generalists:
        return []

    def gaps(g) -> list[tuple[str, float, float]]:
        out = [(f"{g} within {GOAL_SPECIALIST_GAP:.0%} of {s} on {OWN_TASK[s]}",
                timed[g][OWN_TASK[s]] / timed[s][OWN_TASK[s]] - 1, GOAL_SPECIALIST_GAP) for s in specialists]
        if data == "hmm":  # timed[g] holds ratios to the exact NLL
            task = max(EVAL_TASKS, key=lambda t: timed[g][t])
            out.append((f"{g} within {GOAL_EXACT_GAP:.0%} of exact on every task (worst: {task})",
                        timed[g][task] - 1, GOAL_EXACT_GAP))
        return out

    best = min(generalists, key=lambda g: max((gap - limit for _, gap, limit in gaps(g)), default=0.0))
    out = [{"data": data, "goal": goal, "gap": gap, "limit": limit} for goal, gap, limit in gaps(best)]
    for goal in out:
        goal["met"] = goal["gap"] <= goal["limit"]
    return out


def heatmap(rows: list, datasets: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(datasets), len(BUDGETS), figsize=(7.5 * len(BUDGETS), 4.2 * len(datasets)),
                             squeeze=False)
    for i, data in enumerate(datasets):
        for j, budget in enumerate(BUDGETS):
            ax = axes[i, j]
            mine = [r for r in rows if r["data"] == data and r.get("budget") == budget]
            values = np.array([[np.nan if metric(r)[t] is None else metric(r)[t] for t in EVAL_TASKS] for r in mine])
            image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis_r", aspect="auto")
            fig.colorbar(image, ax=ax, label="ratio to exact NLL" if data == "hmm" else "NLL per token")
            for (y, x), v in np.ndenumerate(values):
                ax.text(x, y, "n/a" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=7,
                        color="grey" if np.isnan(v) else "white")
            ax.set_xticks(range(len(EVAL_TASKS)), EVAL_TASKS, rotation=25, fontsize=8)
            ax.set_yticks(range(len(mine)), [r["model"] for r in mine], fontsize=8)
            ax.set_title(f"{data}: same {'compute time' if budget == 'time' else 'training tokens'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict, datasets: list[str], exact: dict, path: Path) -> None:
    """Per specialist task (one colour): each specialist on it (solid, dash-dot for llama) and
    biglearn on it (dashed), against training compute."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    tasks = list(dict.fromkeys(OWN_TASK.values()))
    for ax, data in zip(axes[0], datasets):
        scale = exact.get(data)
        for colour, task in enumerate(tasks):
            models = [m for m, own in OWN_TASK.items() if own == task] + ["biglearn"]
            for model in models:
                points = curves.get((data, model), [])
                if not points or task not in points[0]:
                    continue
                style = "--" if model == "biglearn" else "-." if model == "llama" else "-"
                ax.plot([p["seconds"] for p in points], [p[task] / (scale[task] if scale else 1.0) for p in points],
                        style, color=f"C{colour}", marker=".", label=f"{model} on {task}")
        ax.set(xlabel="training compute (CPU seconds, one thread)",
               ylabel="NLL ratio to exact" if scale else "NLL per token", title=f"{data}: own-task learning curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="compute budget per model (CPU seconds)")
    parser.add_argument("--data", default="hmm,text", help="comma-separated subset of hmm,text")
    parser.add_argument("--models", default="", help="comma-separated subset of the rows (default: all)")
    parser.add_argument("--mixture", default="generalist", help="objective preset of the mixture row (configs/objective/)")
    parser.add_argument("--mixture-streams", type=int, default=2, choices=(1, 2), help="model.streams of the mixture row")
    parser.add_argument("--manifest", help="text data: manifest.json of a built corpus (default: the built-in one)")
    parser.add_argument("--text-vocab", type=int, default=1024, help="tokenizer size when building the built-in corpus")
    parser.add_argument("--stdlib-limit", type=int, default=None, help="built-in corpus: only this many files")
    parser.add_argument("--length", type=int, default=64, help="sequence length (HMM samples, text windows)")
    parser.add_argument("--hmm-hidden", type=int, default=6, help="HMM hidden states")
    parser.add_argument("--hmm-symbols", type=int, default=16, help="HMM vocabulary")
    parser.add_argument("--hmm-stay", type=float, default=0.97, help="HMM probability of keeping the hidden state")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then a constant rate")
    parser.add_argument("--eval-samples", type=int, default=512, help="evaluation windows per task")
    parser.add_argument("--curve-points", type=int, default=6, help="learning-curve evaluations per run")
    parser.add_argument("--curve-samples", type=int, default=64, help="windows per learning-curve evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/shootout", help="output directory")
    parser.add_argument("--jobs", type=int, default=1, help="data sets trained in parallel processes (1 thread each)")
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds) to check the script works")
    ladder = parser.add_argument_group("budget ladder (bench/ladder.py): the data-constrained regime")
    ladder.add_argument("--ladder", action="store_true",
                        help="train the ladder's rows once each to the largest of --budgets on a fixed corpus of "
                             "--train-windows windows, evaluated along the way (instead of --seconds)")
    ladder.add_argument("--budgets", type=float, nargs="+", default=[30.0, 120.0, 480.0],
                        help="the rungs: CPU seconds per model")
    ladder.add_argument("--train-windows", type=int, default=512, help="training windows in the corpus (repeated)")
    ladder.add_argument("--first-eval", type=float, default=1.0,
                        help="evaluations at first-eval * 2^(k/3) CPU s and at every rung")
    ladder.add_argument("--causal-grid", default="0.1:0.1,0.3:0.5",
                        help="the tuned causal rows: comma-separated dropout:weight_decay pairs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.length, args.batch_size, args.eval_samples = 0.3, 16, 8, 16
        args.curve_points, args.curve_samples, args.warmup, args.text_vocab = 2, 8, 2, 512
        args.stdlib_limit = args.stdlib_limit or 40
        args.budgets, args.train_windows, args.first_eval = [0.15, 0.3], 8, 0.1
    args.data = [d for d in args.data.split(",") if d]
    args.models = [m for m in args.models.split(",") if m]
    try:
        grid = [tuple(float(v) for v in pair.split(":")) for pair in args.causal_grid.split(",") if pair]
    except ValueError:
        grid = None
    if grid is not None and all(len(pair) == 2 and 0 <= pair[0] < 1 and pair[1] >= 0 for pair in grid):
        args.causal_grid = grid
    else:
        parser.error(f"--causal-grid: expected dropout:weight_decay pairs such as 0.1:0.1,0.3:0.5 "
                     f"(dropout in [0, 1)); got {args.causal_grid!r}")
    if args.ladder:
        from ladder import ladder_contestants
        names = [c.name for c in ladder_contestants(args.mixture, args.causal_grid)]
    else:
        names = [c.name for c in contestants(args.mixture, args.mixture_streams)]
    for flag, values, allowed in (("--data", args.data, ("hmm", "text")), ("--models", args.models, names)):
        for value in values:
            if value not in allowed:
                parser.error(f"{flag}: unknown {value!r}; choose from {','.join(allowed)}")
    if args.seconds <= 0:
        parser.error(f"--seconds must be > 0; got {args.seconds}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}")
    if min(args.budgets) <= 0 or args.first_eval <= 0:
        parser.error(f"--budgets and --first-eval must be > 0; got {args.budgets} and {args.first_eval}")
    if args.train_windows < 1:
        parser.error(f"--train-windows must be >= 1; got {args.train_windows}")
    if args.manifest and not Path(args.manifest).is_file():
        parser.error(f"--manifest {args.manifest}: no such file")
    return args


def run_data(args, name: str, position: int = 0) -> tuple[list, dict]:
    """Train and score every row on one data set (in a worker process under --jobs > 1)."""
    from tqdm import tqdm

    torch.set_num_threads(1)
    data = hmm_dataset(args) if name == "hmm" else text_dataset(args)
    rows, curves = [], {}
    n_rows = len(args.models) or len(contestants(args.mixture, args.mixture_streams))
    with tqdm(total=n_rows * args.seconds, unit="cpu s", desc=f"shootout {name}", position=position, mininterval=1.0,
              bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} cpu s [{elapsed}<{remaining}{postfix}]") as bar:
        shootout(args, data, rows, curves, bar)
    return rows, curves


def map_datasets(worker, args) -> list:
    """[worker(args, name, position) for each data set], in --jobs single-threaded processes."""
    positions = range(len(args.data))
    if args.jobs > 1 and len(args.data) > 1:
        # Forked before any training: one single-threaded process per data set.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(args.jobs, len(args.data)), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(worker, [args] * len(args.data), args.data, positions))
    return [worker(args, name, position) for name, position in zip(args.data, positions)]


def main(argv=None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ladder:
        from ladder import run_ladder
        return run_ladder(args)
    load_at_start = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = map_datasets(run_data, args)
    rows = [row for data_rows, _ in results for row in data_rows]
    curves = {key: points for _, data_curves in results for key, points in data_curves.items()}
    for data in args.data:
        for budget in BUDGETS:
            print(table(rows, data, budget))
    checks = [g for data in args.data for g in goals(rows, data)]
    print("\ngoals (same compute time):")
    for goal in checks:
        print(f"  {'MET   ' if goal['met'] else 'MISSED'} {goal['data']}: {goal['goal']}: gap {goal['gap']:+.1%}")
    heatmap(rows, args.data, out / "shootout.png")
    exact = {r["data"]: r["exact_nll"] for r in rows if "exact_nll" in r}
    plot_curves(curves, args.data, exact, out / "curves.png")
    record = {"args": {k: v for k, v in vars(args).items()}, "rows": rows, "goals": checks,
              "curves": [{"data": d, "model": m, "points": p} for (d, m), p in curves.items()],
              "load_average": {"start": load_at_start, "end": os.getloadavg()}}
    atomic_write(out / "shootout.json", json.dumps(record, indent=1))
    tables = "\n\n".join(table(rows, d, b, markdown=True) for d in args.data for b in BUDGETS)
    goal_lines = "\n".join(f"- {'met' if g['met'] else 'MISSED'}: {g['data']}, {g['goal']}: {g['gap']:+.1%}" for g in checks)
    atomic_write(out / "shootout.md", tables + "\n\n" + goal_lines + "\n")
    print(f"\nwrote {out}/shootout.json, shootout.md, shootout.png, curves.png")
    return rows


if __name__ == "__main__":
    main()
