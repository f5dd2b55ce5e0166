"""The shootout's budget ladder: which objective wins when the data run out?

Run it as `python bench/shootout.py --ladder ...` (this file holds that mode; run directly, it
takes the same flags). Every row trains ONCE, for the largest of --budgets CPU seconds, on a
fixed corpus of --train-windows windows (HMM samples drawn once, or the first windows of the
text training split) read again and again in a fresh random order per epoch, the same order for
every row. The data-constrained regime of "Diffusion Beats Autoregressive in Data-Constrained
Settings": a causal LM reaches its best held-out NLL after some epochs, then overfits.

Evaluations (held-out windows, the shootout's fixed draws) at --first-eval * 2^(k/3) CPU s,
k = 0, 1, ..., and at every rung: the schedule does not depend on the largest budget, so a
longer ladder only adds points. A rung reports the NLL at that CPU time and the best so far
(the minimum over the evaluations up to it: early stopping on the same windows, which favours
the causal rows that overfit), with the epochs read (tokens read / corpus tokens).

Rows: clm, llama (the Llama yardstick), clm with dropout and weight decay for each pair of
--causal-grid (the tuned causal baseline is the best of these and clm, picked on the same
held-out windows), mlm, span, mdm, biglearn in both stream modes, the --mixture preset in both
stream modes, and near_causal (configs/objective/near_causal.yaml: 63/64 clm, 1/64 big learning,
after the dual-objective LMs of "GPT or BERT: why not both?") in single-stream mode.

Writes OUT/ladder.json, OUT/ladder.md and OUT/ladder.png (gap to the best causal row on
left-to-right NLL and to mlm on MLM, against compute).

    python bench/shootout.py --ladder --budgets 10 30 90 --train-windows 512 --jobs 2
    python bench/shootout.py --ladder --quick       # seconds; the default suite runs it
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from data_pipeline.files import atomic_write
from pretrain.layout import collate
import shootout as base

TASKS = ("left_to_right", "mlm", "infill")  # the goals' tasks, scored at every evaluation
SINGLE_STREAM_GENERALISTS = ("biglearn_1stream", "mixture_1stream", "near_causal_1stream")
GOAL_ONE_EPOCH, GOAL_REPEATED, GOAL_MLM, MANY_EPOCHS = 0.015, -0.03, 0.03, 16


def ladder_contestants(mixture: str, causal_grid) -> list[base.Contestant]:
    C = base.Contestant
    tuned = [C(causal_name(dropout, decay), "clm", {"dropout": dropout}, weight_decay=decay)
             for dropout, decay in causal_grid]
    return [C("clm", "clm"), C("llama", "clm", llama=True), *tuned, C("mlm", "mlm"), C("span", "span"),
            C("mdm", "mdm"), C("biglearn", "biglearn"), C("biglearn_1stream", "biglearn", {"streams": 1}),
            C("mixture", mixture), C("mixture_1stream", mixture, {"streams": 1}),
            C("near_causal_1stream", "near_causal", {"streams": 1})]


def causal_name(dropout: float, decay: float) -> str:
    return f"clm_drop{dropout:g}_wd{decay:g}"


def is_causal(name: str) -> bool:
    return name in ("clm", "llama") or name.startswith("clm_drop")


def evaluation_times(budgets, first: float) -> list[float]:
    """first * 2^(k/3) below the largest rung, and every rung: the same points for any total."""
    times, k = set(budgets), 0
    while first * 2 ** (k / 3) < max(budgets):
        times.add(first * 2 ** (k / 3))
        k += 1
    return sorted(times)


def epoch_batches(corpus: np.ndarray, sampler, batch_size: int, seed: int):
    """Batches of corpus windows, a fresh permutation per epoch (a batch may straddle two); the
    window order depends only on the seed, the source/target draws on their own generator."""
    order_rng, split_rng = np.random.default_rng([seed, 5]), np.random.default_rng([seed, 6])
    order = np.empty(0, dtype=np.int64)
    while True:
        while len(order) < batch_size:
            order = np.concatenate([order, order_rng.permutation(len(corpus))])
        x, order = corpus[order[:batch_size]], order[batch_size:]
        yield collate(x, [sampler(x.shape[1], split_rng) for _ in x], pad_id=0)


def train_row(contestant, data, corpus: np.ndarray, specs: dict, args, bar) -> list[dict]:
    """Train one row to the largest rung; returns its evaluations in schedule order."""
    model, engine = base.make_engine(contestant, data.vocab_size, args)
    batches = epoch_batches(corpus, base.objective_sampler(contestant.objective), args.batch_size, args.seed)
    evaluations, clock, steps, tokens = [], 0.0, 0, 0
    for due in evaluation_times(args.budgets, args.first_eval):
        while clock < due:
            spent, windows, _ = base.timed_step(engine, batches, contestant, data.name, steps)
            clock, steps, tokens = clock + spent, steps + 1, tokens + windows * corpus.shape[1]
            bar.update(min(spent, bar.total - bar.n))  # the last step overshoots the rung: keep n <= total
            bar.set_postfix_str(f"{data.name} {contestant.name} step {steps} epoch {tokens / corpus.size:.1f}")
        evaluations.append({"due": due, "seconds": clock, "steps": steps, "tokens": tokens,
                            "epochs": tokens / corpus.size, "nll": base.score(model, data, specs, TASKS)})
    return evaluations


def rungs(evaluations: list[dict], budgets) -> list[dict]:
    """Per rung: the evaluation at that CPU time, and per task the best so far and its epochs."""
    out = []
    for budget in sorted(budgets):
        upto = [e for e in evaluations if e["due"] <= budget]
        at, best, best_epochs = upto[-1], {}, {}
        for task, value in at["nll"].items():
            if value is not None:
                winner = min(upto, key=lambda e: e["nll"][task])
                best[task], best_epochs[task] = winner["nll"][task], winner["epochs"]
        out.append({"budget": budget, **{k: at[k] for k in ("seconds", "steps", "tokens", "epochs", "nll")},
                    "best": best, "best_epochs": best_epochs})
    return out


def run_data(args, name: str, position: int = 0) -> list[dict]:
    """Every ladder row on one data set: [{"data", "model", "evaluations", "rungs"}], or an
    "unavailable" reason."""
    from tqdm import tqdm

    torch.set_num_threads(1)
    data = base.hmm_dataset(args) if name == "hmm" else base.text_dataset(args)
    corpus = data.corpus(args.train_windows)
    specs = base.eval_specs(data, args.seed)
    exact = {t: float(-np.concatenate(data.exact(data.windows, specs[t])).mean()) for t in TASKS} if data.exact else None
    rows = [c for c in ladder_contestants(args.mixture, args.causal_grid) if not args.models or c.name in args.models]
    out = []
    with tqdm(total=len(rows) * max(args.budgets), unit="cpu s", desc=f"ladder {name}", position=position,
              mininterval=1.0, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} cpu s [{elapsed}<{remaining}{postfix}]") as bar:
        for contestant in rows:
            reason = contestant.unavailable()
            if reason:
                out.append({"data": name, "model": contestant.name, "unavailable": reason})
                continue
            evaluations = train_row(contestant, data, corpus, specs, args, bar)
            out.append({"data": name, "model": contestant.name, "corpus_tokens": int(corpus.size),
                        "exact_nll": exact, "evaluations": evaluations, "rungs": rungs(evaluations, args.budgets)})
    return out


# --------------------------------------------------------------------------- reporting

def trained(rows: list, data: str) -> dict:
    return {r["model"]: r for r in rows if r["data"] == data and "unavailable" not in r}


def best_so_far(row: dict, task: str) -> list:
    """Per evaluation: the minimum NLL on task up to it (None where the row cannot score task)."""
    values = [e["nll"][task] for e in row["evaluations"]]
    return [None if v is None else min(values[:k + 1]) for k, v in enumerate(values)]


def goals(rows: list, data: str) -> list[dict]:
    """Each single-stream generalist against the issue's goals at the largest rung."""
    mine = trained(rows, data)
    causal = [n for n in mine if is_causal(n)]
    if not causal:
        return []
    top = -1
    best_causal = min(causal, key=lambda n: mine[n]["rungs"][top]["best"]["left_to_right"])
    # About one epoch: the evaluation at which clm (or the first causal row) had read closest to one.
    anchor = mine["clm" if "clm" in mine else causal[0]]
    one = min(range(len(anchor["evaluations"])), key=lambda k: abs(np.log(anchor["evaluations"][k]["epochs"])))
    causal_at_one = min(best_so_far(mine[n], "left_to_right")[one] for n in causal)
    out = []
    for g in (g for g in SINGLE_STREAM_GENERALISTS if g in mine):
        rung = mine[g]["rungs"][top]
        at_one = anchor["evaluations"][one]
        one_epoch = (f"left_to_right within {GOAL_ONE_EPOCH:.1%} of the best causal row at ~1 epoch "
                     f"({at_one['epochs']:.2f} epochs of {anchor['model']}, {at_one['due']:.1f} CPU s)")
        repeated = (f"left_to_right better than every causal row by >= {-GOAL_REPEATED:.0%} after "
                    f"{rung['epochs']:.0f} epochs (best causal: {best_causal}, "
                    f"{mine[best_causal]['rungs'][top]['epochs']:.0f} epochs)")
        checks = [(one_epoch,
                   best_so_far(mine[g], "left_to_right")[one] / causal_at_one - 1, GOAL_ONE_EPOCH),
                  (repeated,
                   rung["best"]["left_to_right"] / mine[best_causal]["rungs"][top]["best"]["left_to_right"] - 1,
                   GOAL_REPEATED)]
        if "mlm" in mine:
            checks.append((f"mlm within {GOAL_MLM:.0%} of the mlm row",
                           rung["best"]["mlm"] / mine["mlm"]["rungs"][top]["best"]["mlm"] - 1, GOAL_MLM))
        if "span" in mine:
            checks.append(("infill better than the span row",
                           rung["best"]["infill"] / mine["span"]["rungs"][top]["best"]["infill"] - 1, 0.0))
        out += [{"data": data, "model": g, "goal": goal, "gap": gap, "limit": limit,
                 "met": gap <= limit if limit else gap < 0} for goal, gap, limit in checks]
    return out


def table(rows: list, data: str, rung_index: int) -> str:
    """Markdown: one line per row at one rung, NLL now / best so far (HMM: ratio to exact)."""
    mine = trained(rows, data)
    if not mine:
        return ""
    first = next(iter(mine.values()))
    exact = first["exact_nll"] or {}
    budget = first["rungs"][rung_index]["budget"]
    unit = "ratio to exact NLL" if exact else "NLL per token"
    lines = [f"**{data} | {budget:g} CPU s per model | {unit}, at this time / best so far (lower is better)**", "",
             "| trained on | epochs | " + " | ".join(f"{t} | {t} best" for t in TASKS)
             + " | best left_to_right at epoch | steps |", "|---" + "|---:" * (3 + 2 * len(TASKS)) + "|"]
    for name, row in mine.items():
        rung = row["rungs"][rung_index]
        cells = []
        for task in TASKS:
            scale = exact.get(task, 1.0)
            now, best = rung["nll"][task], rung["best"].get(task)
            cells += ["n/a", "n/a"] if now is None else [f"{now / scale:.4f}", f"{best / scale:.4f}"]
        lines.append(f"| {name} | {rung['epochs']:.1f} | " + " | ".join(cells)
                     + f" | {rung['best_epochs']['left_to_right']:.1f} | {rung['steps']} |")
    return "\n".join(lines)


def summary(rows: list, data: str) -> str:
    """Markdown: per row, the best-so-far left-to-right NLL at every rung with the epochs read
    there, then the best-so-far MLM and infilling NLL at the largest rung (HMM: ratio to exact)."""
    mine = trained(rows, data)
    if not mine:
        return ""
    first = next(iter(mine.values()))
    exact = first["exact_nll"] or {}
    budgets = [r["budget"] for r in first["rungs"]]
    lines = [f"**{data} | best so far, {'ratio to exact NLL' if exact else 'NLL per token'} "
             f"(epochs read at the rung)**", "",
             "| trained on | " + " | ".join(f"left_to_right @ {b:g} s" for b in budgets)
             + f" | mlm @ {budgets[-1]:g} s | infill @ {budgets[-1]:g} s |", "|---" + "|---:" * (len(budgets) + 2) + "|"]
    for name, row in mine.items():
        cells = [f"{r['best']['left_to_right'] / exact.get('left_to_right', 1.0):.4f} ({r['epochs']:.0f})"
                 for r in row["rungs"]]
        top = row["rungs"][-1]["best"]
        cells += [f"{top[t] / exact.get(t, 1.0):.4f}" if t in top else "n/a" for t in ("mlm", "infill")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list, datasets: list[str], path: Path) -> None:
    """Per data set: each row's best-so-far gap to the best causal row's on left-to-right, and
    to mlm's on MLM, at every evaluation of the shared schedule."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.6 * len(datasets)), squeeze=False)
    for ax_row, data in zip(axes, datasets):
        mine = trained(rows, data)
        if not mine:
            continue
        causal = [n for n in mine if is_causal(n)]
        references = {"left_to_right": [min(v) for v in zip(*(best_so_far(mine[n], "left_to_right") for n in causal))],
                      "mlm": best_so_far(mine["mlm"], "mlm") if "mlm" in mine else None}
        for ax, (task, reference) in zip(ax_row, references.items()):
            if reference is None:
                continue
            for i, (name, row) in enumerate(mine.items()):
                values = best_so_far(row, task)
                if values[0] is None:
                    continue
                times = [e["due"] for e in row["evaluations"]]
                gaps = [100 * (v / r - 1) for v, r in zip(values, reference)]
                style = ":" if is_causal(name) else "-" if "1stream" in name else "--"
                ax.plot(times, gaps, style, color=f"C{i % 10}", label=name, linewidth=1.2)
            for rung in next(iter(mine.values()))["rungs"]:
                ax.axvline(rung["budget"], color="grey", alpha=0.3)
            clm = mine.get("clm")
            epochs = f" (clm: {clm['rungs'][-1]['epochs']:.0f} epochs at {clm['rungs'][-1]['budget']:g} s)" if clm else ""
            ax.set(xscale="log", xlabel="training compute (CPU s, one thread)" + epochs,
                   ylabel=f"gap on {task} (%)", title=f"{data}: best-so-far {task} NLL vs "
                   + ("the best causal row" if task == "left_to_right" else "mlm"))
            ax.set_ylim(-15, 25)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.grid(alpha=0.3)
        ax_row[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run_ladder(args) -> list[dict]:
    load_at_start = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [row for data_rows in base.map_datasets(run_data, args) for row in data_rows]
    checks = [g for data in args.data for g in goals(rows, data)]
    record = {"args": vars(args), "rows": rows, "goals": checks,
              "load_average": {"start": load_at_start, "end": os.getloadavg()}}
    atomic_write(out / "ladder.json", json.dumps(record, indent=1))  # first: the tables are derived from it
    tables = [summary(rows, data) for data in args.data]
    tables += [table(rows, data, i) for data in args.data for i in range(len(args.budgets))]
    goal_lines = "\n".join(f"- {'met' if g['met'] else 'MISSED'}: {g['data']}, {g['model']}: {g['goal']}: "
                           f"{g['gap']:+.1%}" for g in checks)
    print("\n\n".join(tables) + "\n\ngoals at the largest rung (best so far):\n" + goal_lines)
    atomic_write(out / "ladder.md", "\n\n".join(tables) + "\n\n" + goal_lines + "\n")
    plot(rows, args.data, out / "ladder.png")
    print(f"\nwrote {out}/ladder.json, ladder.md, ladder.png")
    return rows


if __name__ == "__main__":
    base.main(["--ladder", *sys.argv[1:]])
