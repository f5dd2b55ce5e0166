"""The Trainer: the one training loop of the project (pretraining and fine-tuning run on it).

A Trainer owns a DeepSpeed engine, a data stream, a metrics log, a checkpoint directory and the
train state, and saves and restores each stateful part by name (the Stateful pattern of
torchtitan): `progress` (global counters, in the checkpoint's meta.json), and per rank `data`
(the stream's cursor) and `rng` (python/numpy/torch generators). What is trained is a `Task`:
the module the engine wraps, the additive statistics of a micro-batch and the log record they
make, so the loop itself knows nothing of objectives. The divergence guard (train.guard) is
part of the train state: its streak survives a resume, and rotation keeps its last good checkpoint.

One optimiser step = trainer.grad_accum micro-batches per rank. Every rank agrees on three
things through one small all-reduce per micro-batch: whether the loss was finite everywhere
(a non-finite loss skips the micro-batch on all ranks and counts as a bad step for the guard, as
does a skipped or non-finite optimizer step; trainer.max_bad_steps in a row stop the run),
whether to stop (SIGTERM/SIGUSR1 or the time budget, on any rank), and a digest of the sample
keys consumed (so resumed runs can be checked to read the same data).

The data stream needs only: iteration (batches), `state_dict()` / `load_state_dict()`,
`last_keys` (ids of the samples of the batch handed out last), `stats` (a dict with "epoch"),
and with trainer.epochs > 0 `len()` (batches per epoch per rank).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from data_pipeline.errors import UserError, require
from data_pipeline.progress import heartbeat

from ..checkpoint import sharded as ckpt
from ..checkpoint.rundir import refresh_lock
from .console import console_around_bar
from .guard import BadStepGuard, dynamic_loss_scale
from .metrics import LOGGERS, MetricsLog

log = logging.getLogger(__name__)
# SIGINT (Ctrl-C) as SIGTERM: a checkpoint, not a KeyboardInterrupt that loses the steps since the last save.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
SAMPLE_KEYS = "sample_keys"  # run_dir/sample_keys/rank_NNNNN.jsonl with trainer.log_sample_keys
# A time-limited run's schedule is sized to its budget when this many steps have run, from the pace
# of all but the first: step 1 carries one-off costs (allocator warm-up, the data loader's first
# shard, DeepSpeed's first-step set-up) that made the estimate from steps 1-5 run ~15% low
# (265 steps estimated, 310 run in the demo). The pace leaves out mid-run evaluations and saves,
# so it runs high when they take long: the demo (one of each) estimated 541 and ran 485 on an
# idle machine, ending at 1.24x instead of 1x its minimum learning rate.
FIT_AFTER_STEPS = 10


def seed_everything(seed: int, deterministic: bool) -> None:
    """Same initial weights on every rank (ZeRO-3 partitions each rank's copy)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


class StopRequest:
    """The stop signals (STOP_SIGNALS), recorded instead of acted on: the training loop reads
    `signum` at its next micro-batch and every rank stops together with a checkpoint. Signals
    after the first are only noted, so a supervisor that repeats SIGTERM, or a second Ctrl-C,
    cannot kill a checkpoint or an export being written."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame) -> None:
        if self.signum:
            log.warning("%s received while stopping: finishing the checkpoint first", signal.Signals(signum).name)
        else:
            self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        """This object as the handler of STOP_SIGNALS (nested uses keep it), the previous ones after."""
        previous = {sig: signal.signal(sig, self) for sig in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """Global counters, identical on every rank; saved in the checkpoint's meta.json."""
    step: int = 0
    tokens_seen: int = 0
    predicted_seen: int = 0
    skipped_micro_batches: int = 0
    data_digest: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class RNGState:
    """Python, numpy and torch generators of this rank, as tensors, tuples and numbers
    (weights-only loadable)."""

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(),
                 "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class Task(Protocol):
    """What is trained. `module(model)` is what the engine wraps: forward(batch) -> (loss, output);
    `sums(batch, device_batch, output)` the additive statistics of a micro-batch (host batch, its
    device copy, the engine's output; tensors; "tokens" and
    "predicted" are counted into the progress); `record(totals)` the log fields of summed ones."""

    def module(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def sums(self, batch, device_batch, output) -> dict[str, torch.Tensor]: ...

    def record(self, totals: dict[str, list[float]]) -> dict: ...


@dataclass
class TrainerConfig:
    """The loop's knobs, declared once: pretraining reads them from `trainer` in configs/, fine-tuning
    from its own `trainer` section (other defaults, same keys). Checked when made."""
    max_steps: int = 1000  # optimizer steps; 0 = no limit but `epochs`
    epochs: float = 0.0  # > 0: stop after this many passes over the training data (the smaller limit wins)
    max_minutes: float = 0.0  # > 0: stop (with a checkpoint) after this much wall time
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100  # linear warm-up; 0: the full rate from step 1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    seed: int = 0
    deterministic: bool = False  # torch deterministic algorithms (exact-resume tests)
    log_every: int = 10
    eval_every: int = 500  # 0: evaluate only at the end (and, in a fresh run, at step 0)
    save_every: int = 1000  # 0: save only at the end and on signals
    keep_last: int = 3  # complete checkpoints kept
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    export_at_end: bool = True  # consolidated fp32 weights in run_dir/export
    # metrics.jsonl (always: plots and resume checks read it) plus any of tensorboard, wandb, mlflow
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look the GPU up (no MFU on CPU)
    # each rank writes the sample keys of every micro-batch to run_dir/sample_keys/rank_NNNNN.jsonl
    log_sample_keys: bool = False

    def __post_init__(self):
        for key in ("grad_accum", "log_every", "keep_last", "max_bad_steps"):
            require(getattr(self, key) >= 1, f"trainer.{key}", "must be >= 1", getattr(self, key))
        for key in ("max_steps", "warmup_steps", "eval_every", "save_every", "max_minutes", "grad_clip",
                    "weight_decay", "peak_tflops", "epochs"):
            require(getattr(self, key) >= 0, f"trainer.{key}", "must be >= 0", getattr(self, key))
        require(self.max_steps > 0 or self.epochs > 0, "trainer.max_steps", "must be >= 1 unless trainer.epochs > 0",
                self.max_steps)
        for name in self.loggers:
            require(name in LOGGERS, "trainer.loggers", f"entries must be among {list(LOGGERS)}", name)
        require("jsonl" in self.loggers, "trainer.loggers",
                "must include jsonl (plots and resume checks read metrics.jsonl)", self.loggers)
        require(math.isfinite(self.lr) and self.lr > 0, "trainer.lr", "must be a positive number", self.lr)
        require(0 <= self.min_lr_ratio <= 1, "trainer.min_lr_ratio", "must be in [0, 1]", self.min_lr_ratio)
        for key in ("beta1", "beta2"):
            require(0 <= getattr(self, key) < 1, f"trainer.{key}", "must be in [0, 1)", getattr(self, key))

    def total_steps(self, stream) -> int:
        """The step the run ends at: max_steps, or with epochs > 0 the end of that many passes over
        `stream` (len(stream) batches per epoch per rank; the smaller limit when both are set)."""
        if self.epochs <= 0:
            return self.max_steps
        if not hasattr(stream, "__len__"):
            raise UserError("trainer.epochs needs data with a known epoch length (one dataset, not a data.sources mix)")
        by_epochs = max(1, math.ceil(self.epochs * len(stream) / self.grad_accum))
        return min(self.max_steps, by_epochs) if self.max_steps else by_epochs


def _all_reduce(tensor: torch.Tensor) -> None:
    """Sum over ranks, in place, on the tensor's device (NCCL reduces GPU tensors only); a no-op
    without a process group (one process, e.g. a LocalEngine)."""
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)


def step_horizon(max_steps: int, max_minutes: float, step: int, elapsed_s: float, timed_steps: int,
                 timed_s: float) -> int:
    """The step the run will end at: max_steps, or, with a time budget, `step` plus the steps the
    measured pace (timed_steps in timed_s seconds) fits into the budget's remaining seconds
    (60 * max_minutes - elapsed_s), whichever comes first."""
    if max_minutes <= 0 or timed_steps <= 0 or timed_s <= 0:
        return max_steps
    remaining_s = max(0.0, 60 * max_minutes - elapsed_s)
    return min(max_steps, step + int(remaining_s * timed_steps / timed_s))


class Trainer:
    """Collective: every rank builds one and calls the same methods in the same order."""

    def __init__(self, engine, stream, task: Task, config: TrainerConfig, run_dir: Path | None = None, *,
                 meta: dict | None = None, metrics: MetricsLog | None = None, evaluator=None, rank: int = 0,
                 extra_record=None, first_save_bytes: int = 0, schedule=None, stop: StopRequest | None = None):
        self.engine, self.stream, self.task, self.config = engine, stream, task, config
        self.run_dir, self.meta, self.metrics, self.evaluator = Path(run_dir or "."), meta or {}, metrics, evaluator
        self.rank, self.extra_record, self.first_save_bytes = rank, extra_record, first_save_bytes
        self.schedule = schedule  # an engine.WarmupCosine, fitted to the time budget (fit_schedule)
        self.max_steps = config.total_steps(stream)
        self.checkpoint_dir = self.run_dir / ckpt.CHECKPOINTS
        self.progress = Progress()
        self.guard = BadStepGuard(config.max_bad_steps)
        self.rank_states: dict[str, Stateful] = {"data": stream, "rng": RNGState()}
        self.keys_log = self.run_dir / SAMPLE_KEYS / f"rank_{rank:05d}.jsonl" if config.log_sample_keys else None
        self.last_saved: Path | None = None
        self.stop_reason: str | None = None
        self.stop = stop or StopRequest()  # the caller's, when it handles signals beyond the loop (pretrain.train.run)
        self._batches = None
        self._last_batch = None  # forwarded again by a rank whose data failed, so that collectives still pair up
        self._data_error: UserError | None = None
        self._logged_step = 0
        self._window: dict[str, torch.Tensor] = {}
        self._window_start = self._started = time.perf_counter()
        self._timed_from: tuple[int, float] | None = None  # (step, time) the pace is measured from

    # ------------------------------------------------------------------ state

    def save(self) -> Path:
        """Checkpoint: the engine, `progress` in meta.json, each rank's states by name."""
        meta = {**self.meta, "progress": self.progress.state_dict(), "data_stats": self.stream.stats,
                "guard": self.guard.state_dict()}
        rank_state = {name: part.state_dict() for name, part in self.rank_states.items()}
        self.last_saved = ckpt.save_checkpoint(self.engine, self.checkpoint_dir, self.progress.step, meta, rank_state,
                                               self.config.keep_last, estimate_bytes=self.first_save_bytes,
                                               protect=self.guard.protected)
        self.guard.saved(self.last_saved)
        refresh_lock(self.run_dir)
        log.info("saved %s", self.last_saved)
        return self.last_saved

    def load(self, tag_dir: Path) -> dict:
        """Restore every part from a checkpoint; returns its meta.json."""
        meta, rank_state = ckpt.load_checkpoint(self.engine, tag_dir, self.checkpoint_dir / ckpt.UNIVERSAL)
        self.progress.load_state_dict(meta["progress"])
        if "guard" in meta:
            self.guard.load_state_dict(meta["guard"])
            last_good = self.guard.last_good_checkpoint
            if last_good and not ckpt.is_complete(Path(last_good)):  # rotated away since (or another machine's path)
                self.guard.last_good_checkpoint = None
        self.guard.saved(tag_dir)
        for name, part in self.rank_states.items():
            try:
                part.load_state_dict(rank_state[name])
            except ValueError as err:
                raise UserError(f"cannot resume {tag_dir} ({name}): {err}. Start over with resume=never "
                                "or use another run_dir") from None
        self.last_saved = Path(tag_dir)
        self._logged_step = self.progress.step
        if self.keys_log is not None and self.keys_log.is_file():  # keys past the checkpoint were not trained on
            kept = [line for line in self.keys_log.read_text().splitlines(keepends=True)
                    if json.loads(line)["step"] <= self.progress.step]
            self.keys_log.write_text("".join(kept))
        log.info("resumed from %s (step %d)", tag_dir, self.progress.step)
        return meta

    # ------------------------------------------------------------------ steps

    def _accumulate(self, sums: dict[str, torch.Tensor]) -> None:
        for key, value in sums.items():
            value = value.detach().to(self.engine.device, torch.float64).reshape(-1)
            self._window[key] = self._window[key] + value if key in self._window else value

    def train_step(self) -> None:
        """One optimiser step (grad_accum micro-batches that all ranks found finite); a stop
        request (signal, time budget) is recorded in stop_reason and acted on by `run`."""
        s, engine = self.config, self.engine
        if self._batches is None:
            self._batches = iter(self.stream)
        micro = 0
        while micro < s.grad_accum:
            try:
                batch = next(self._batches)
                self._last_batch = batch
            except UserError as err:  # the data ran out of readable samples (pretrain.data.reader)
                if self._last_batch is None:
                    raise
                self._data_error, batch = err, self._last_batch
            keys_crc = zlib.crc32("\n".join(map(str, self.stream.last_keys)).encode())
            device_batch = batch.to_torch(engine.device)
            loss, output = engine(device_batch)
            over_time = s.max_minutes > 0 and self.rank == 0 and time.perf_counter() - self._started > 60 * s.max_minutes
            flags = torch.tensor([0.0, float(self.stop.signum != 0), float(over_time), float(keys_crc),
                                  float(self._data_error is not None)], dtype=torch.float64, device=engine.device)
            flags[0] = (~torch.isfinite(loss.detach())).double()
            _all_reduce(flags)
            n_nonfinite, signalled, timed_out, crc_sum, data_failed = flags.tolist()
            if data_failed:  # nobody backpropagates; the step is not taken and the run stops with a checkpoint
                self.stop_reason = "data"
                if self._data_error is None:
                    self._data_error = UserError(f"the training data of {int(data_failed)} other rank(s) ran out of "
                                                 "readable samples (their log names the shards)")
                return
            self.progress.data_digest = (self.progress.data_digest + int(crc_sum)) % (1 << 61)
            if signalled or timed_out:
                self.stop_reason = "signal" if signalled else "time budget"
            if n_nonfinite:  # no rank backpropagates this micro-batch
                self.progress.skipped_micro_batches += 1
                self.guard.bad(self.progress.step + 1,
                               f"non-finite loss on {int(n_nonfinite)} rank(s), micro-batch skipped")
                continue
            engine.backward(loss)
            engine.step()
            micro += 1
            if self.keys_log is not None:
                self.keys_log.parent.mkdir(parents=True, exist_ok=True)
                with self.keys_log.open("a") as f:
                    f.write(json.dumps({"step": self.progress.step + 1, "keys": list(map(str, self.stream.last_keys))})
                            + "\n")
            self._accumulate(self.task.sums(batch, device_batch, output))
        self.guard.optimizer_step(self.progress.step + 1, engine.was_step_applied(), engine.get_global_grad_norm(),
                                  *dynamic_loss_scale(engine))
        self.progress.step += 1

    def log_window(self) -> dict:
        """All-reduce the statistics since the last record, count them into the progress, write
        the record (rank 0) and start a new window."""
        names = sorted(self._window)
        flat = torch.cat([self._window[n] for n in names]) if names else torch.zeros(0, dtype=torch.float64)
        flat = flat.to(self.engine.device)
        _all_reduce(flat)
        totals, offset = {}, 0
        for name in names:
            size = self._window[name].numel()
            totals[name] = flat[offset:offset + size].cpu().tolist()
            offset += size
        self.progress.tokens_seen += int(sum(totals.get("tokens", [0])))
        self.progress.predicted_seen += int(sum(totals.get("predicted", [0])))
        elapsed = time.perf_counter() - self._window_start
        grad_norm = self.engine.get_global_grad_norm()
        record = {"kind": "train", "step": self.progress.step, **self.task.record(totals),
                  "lr": self.engine.get_lr()[0], "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "tokens_per_s": sum(totals.get("tokens", [0])) / elapsed,
                  "predicted_per_s": sum(totals.get("predicted", [0])) / elapsed,
                  "tokens_seen": self.progress.tokens_seen,
                  "skipped_micro_batches": self.progress.skipped_micro_batches,
                  "data_digest": self.progress.data_digest, "epoch": self.stream.stats["epoch"]}
        if self.extra_record is not None:
            record.update(self.extra_record(totals, elapsed))
        if self.metrics is not None:
            self.metrics.write(record)
        refresh_lock(self.run_dir)
        self._logged_step = self.progress.step
        self._window = {}
        self._window_start = time.perf_counter()
        return record

    def evaluate(self) -> dict:
        """The evaluator's results on the current weights (written to the metrics log)."""
        self.engine.eval()
        try:
            with heartbeat(f"evaluating step {self.progress.step}", enabled=self.rank == 0):
                result = self.evaluator(self.engine)
        finally:
            self.engine.train()
        if self.metrics is not None:
            self.metrics.write({"kind": "eval", "step": self.progress.step, **result})
        return result

    def horizon(self) -> int:
        """step_horizon at the pace measured since the end of this attempt's first step."""
        now, step = time.perf_counter(), self.progress.step
        timed_step, timed_at = self._timed_from or (step, now)
        return step_horizon(self.max_steps, self.config.max_minutes, step, now - self._started,
                            step - timed_step, now - timed_at)

    def fit_schedule(self) -> None:
        """Size the schedule to the steps the time budget allows at the pace measured after the
        first step (rank 0's estimate, shared so every rank steps the same schedule)."""
        s, step = self.config, self.progress.step
        estimate = torch.tensor([float(self.horizon() if self.rank == 0 else 0)], dtype=torch.float64,
                                device=self.engine.device)
        _all_reduce(estimate)
        total = int(estimate.item())
        if total >= self.max_steps:
            return
        timed_step, timed_at = self._timed_from
        self.schedule.fit(total, self.max_steps, step)
        log.info("time budget %g min: about %d steps at %.2f s/step (measured over steps %d-%d; step %d's one-off "
                 "costs left out); warm-up (%d steps) and cosine decay sized to %d steps instead of %d",
                 s.max_minutes, total, (time.perf_counter() - timed_at) / max(step - timed_step, 1), timed_step + 1,
                 step, timed_step, self.schedule.warmup, self.schedule.total, self.max_steps)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Train to self.max_steps (or a stop request), with periodic logs, evaluations and
        checkpoints; always ends with a checkpoint of the last step, and closes the metrics log.
        A fresh run first evaluates its step-0 weights (the baseline a run's plot shows).
        Returns a summary."""
        s = self.config
        console = contextlib.ExitStack()
        console.enter_context(self.stop.installed())
        bar, start_step = None, self.progress.step
        if self.rank == 0 and s.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._started = self._window_start = time.perf_counter()
        self.engine.train()
        if bar is not None:
            console.enter_context(console_around_bar())
        try:
            if self.evaluator is not None and start_step == 0:
                log.info("evaluating the weights at step 0 (the run's baseline)")
                self.evaluate()
                self._started = self._window_start = time.perf_counter()  # the time budget is for training
            while self.progress.step < self.max_steps and self.stop_reason is None:
                self.train_step()
                if self.stop_reason == "data":  # the step was not taken: log the steps before it, then save
                    if self._window and self._logged_step < self.progress.step:
                        self.log_window()
                    break
                step = self.progress.step
                if step == start_step + 1:
                    self._timed_from = (step, time.perf_counter())
                if bar is not None:  # the horizon the time budget allows at the pace so far
                    bar.total = self.horizon()
                    bar.update(1)
                # A fresh run limited by minutes: after a few measured steps, fit the schedule to the budget.
                if self.schedule is not None and s.max_minutes > 0 and start_step == 0 and step == FIT_AFTER_STEPS:
                    self.fit_schedule()
                saving = s.save_every and step % s.save_every == 0
                # Save steps are log steps too, so a checkpoint's token counters include every step before it.
                if step % s.log_every == 0 or step == self.max_steps or self.stop_reason or saving:
                    record = self.log_window()
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                running = step < self.max_steps and self.stop_reason is None
                if self.evaluator is not None and s.eval_every and step % s.eval_every == 0 and running:
                    self.evaluate()
                if saving and running:
                    self.save()
            if bar is not None:
                bar.close()  # before the final messages (closing again in `finally` is harmless)
            if self.stop_reason is not None:
                log.warning("stopping at step %d (%s): saving a checkpoint", self.progress.step, self.stop_reason)
            # (a run resumed from another run's checkpoint ends with one of its own, too)
            here = self.checkpoint_dir / ckpt.tag_name(self.progress.step)
            if self.last_saved is None or self.last_saved.resolve() != here.resolve():
                self.save()
            if self.stop_reason == "data":
                raise UserError(f"stopped at step {self.progress.step}: {self._data_error}; the checkpoint "
                                f"{self.last_saved} holds every step before; fix or rebuild the data and resume")
            summary = {"run_dir": str(self.run_dir), "step": self.progress.step, "checkpoint": str(self.last_saved),
                       "tokens_seen": self.progress.tokens_seen, "stopped": self.stop_reason,
                       "healthy": self.guard.healthy,
                       "minutes": (time.perf_counter() - self._started) / 60}
            if self.stop_reason != "signal" and self.evaluator is not None:
                summary["eval"] = self.evaluate()
            return summary
        finally:
            if bar is not None:
                bar.close()
            if self.metrics is not None:
                self.metrics.close()
            console.close()
