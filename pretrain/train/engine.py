"""The engine a Trainer steps: DeepSpeed's (process group, ZeRO config, optimizer, schedule) from
DeepSpeedConfig and TrainerConfig, or LocalEngine's plain torch step for in-process loops.

CPU runs (no CUDA, or deepspeed.accelerator=cpu) use DeepSpeed's CPU accelerator
(DS_ACCELERATOR=cpu, set before deepspeed is imported), the gloo backend and torch's AdamW
("torch_adam": true), in fp32 or bf16; its compiled communication extension only with several
processes (train/extensions.py).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.nn as nn

from data_pipeline.errors import UserError, require

from .extensions import build_shm_extension, single_process_accelerator
from .trainer import TrainerConfig

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ACCELERATORS = ("auto", "cuda", "cpu")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_param: bool = False  # ZeRO-Infinity style parameter offload (stage 3 only)
    precision: str = "auto"  # auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    accelerator: str = "auto"  # auto = cuda when available, else cpu (gloo)
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    initial_scale_power: int = 16  # fp16 dynamic loss scale starts at 2**this
    dist_timeout_s: float = 1800.0  # a collective waiting this long for a lost rank fails the run instead of hanging
    # CPU, several processes: how long to wait for another process's build of DeepSpeed's CPU extension
    extension_wait_s: float = 600.0

    def __post_init__(self):
        require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3", self.zero_stage)
        require(self.precision in PRECISIONS, "deepspeed.precision", f"must be one of {PRECISIONS}", self.precision)
        require(self.accelerator in ACCELERATORS, "deepspeed.accelerator", f"must be one of {ACCELERATORS}",
                self.accelerator)
        require(not self.offload_param or self.zero_stage == 3, "deepspeed.offload_param",
                "needs deepspeed.zero_stage=3", self.offload_param)
        require(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer",
                "needs deepspeed.zero_stage >= 1", self.offload_optimizer)
        require(self.dist_timeout_s > 0, "deepspeed.dist_timeout_s", "must be > 0 (seconds)", self.dist_timeout_s)
        require(self.extension_wait_s > 0, "deepspeed.extension_wait_s", "must be > 0 (seconds)", self.extension_wait_s)


def use_cpu(ds: DeepSpeedConfig) -> bool:
    if ds.accelerator == "auto":
        return not torch.cuda.is_available()
    if ds.accelerator == "cuda" and not torch.cuda.is_available():
        raise UserError("deepspeed.accelerator=cuda but torch sees no CUDA device")
    return ds.accelerator == "cpu"


def precision(ds: DeepSpeedConfig, on_cpu: bool) -> str:
    """bf16 | fp16 | fp32 after resolving "auto"."""
    if ds.precision == "auto":
        if on_cpu:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if on_cpu and ds.precision == "fp16":
        raise UserError("deepspeed.precision=fp16 is not supported on CPU; use fp32 or bf16")
    return ds.precision


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(on_cpu: bool, timeout_s: float = 1800.0, extension_wait_s: float = 600.0) -> tuple[int, int, int]:
    """Join (or create, for a plain `python -m pretrain.train`) the process group, whose
    collectives fail after timeout_s instead of waiting forever for a lost rank. On CPU, one
    process never builds DeepSpeed's communication extension; several build it once per
    environment, announced, waiting at most extension_wait_s for another build (train/extensions.py).
    Returns (rank, world_size, local_rank). Must run before deepspeed is imported on CPU."""
    if on_cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "RANK" not in os.environ:  # single process without a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu and int(os.environ.get("WORLD_SIZE", 1)) == 1:
        single_process_accelerator()
    elif on_cpu:
        build_shm_extension(extension_wait_s, announce=local_rank == 0)
    if not on_cpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", timeout=datetime.timedelta(seconds=timeout_s))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


_GROUP_ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def process_group(on_cpu: bool, timeout_s: float = 1800.0, extension_wait_s: float = 600.0):
    """init_distributed for the length of one run: yields (rank, world_size, local_rank). When
    this call creates the group (a plain `python -m`, a notebook), the launcher variables it set
    (RANK, MASTER_PORT, ...) are removed at exit, so that a process started later from this one
    does not try to join this process's group. The group itself stays for the next run in the
    same process: DeepSpeed keeps references to it, and destroying it breaks a second run."""
    created = "RANK" not in os.environ
    try:
        yield init_distributed(on_cpu, timeout_s, extension_wait_s)
    finally:
        if created:
            for key in _GROUP_ENVIRONMENT:
                os.environ.pop(key, None)


def leave_process_group() -> None:
    """Destroy this process's group, for a command's `__main__` that exits next (torchrun's and
    torchtitan's practice): left to the interpreter's shutdown, gloo's threads were once torn down
    mid-run and aborted a rank after a finished two-rank run ("terminate called without an active
    exception", exit -6; 1 in ~50 runs). Not in `train()` itself: in a process that runs again,
    DeepSpeed keeps references to the group and a second run needs it (process_group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def deepspeed_config(ds: DeepSpeedConfig, t: TrainerConfig, micro_batch: int, world_size: int, on_cpu: bool) -> dict:
    """The DeepSpeed JSON config for this run (also written to run_dir/deepspeed_config.json); the
    learning-rate schedule is build_engine's WarmupCosine."""
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(reduce_bucket_size=ds.reduce_bucket_size, contiguous_gradients=True, overlap_comm=not on_cpu)
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not on_cpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not on_cpu}
    dtype = precision(ds, on_cpu)
    result = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro_batch * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": ds.initial_scale_power,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay},
        },
        "steps_per_print": 10 ** 9,  # the trainer logs; DeepSpeed's own step prints stay off
        "wall_clock_breakdown": False,
    }
    if on_cpu or not ds.offload_optimizer:
        # torch AdamW: no compiled DeepSpeed op needed. GPU offload keeps DeepSpeed's CPU Adam.
        result["optimizer"]["params"]["torch_adam"] = True
        result["optimizer"]["params"]["adam_w_mode"] = True
    return result


class WarmupCosine:
    """Learning-rate factor of optimizer step k = 1, 2, ...: linear warm-up k / warmup (> 0 from
    step 1), then cosine decay from 1 to min_ratio at step `total`, min_ratio after it. The factor
    of LambdaLR, which calls it with the number of steps taken (k - 1); LambdaLR's state_dict
    keeps `total` and `warmup`, so a resumed run continues the schedule it was fitted to."""

    def __init__(self, total: int, warmup: int, min_ratio: float):
        self.total, self.warmup, self.min_ratio = total, warmup, min_ratio

    def factor(self, step: int) -> float:
        if step <= self.warmup:
            return step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def __call__(self, steps_taken: int) -> float:
        return self.factor(steps_taken + 1)

    def fit(self, total: int, max_steps: int, steps_taken: int) -> None:
        """Size the schedule to `total` steps (<= max_steps) instead of max_steps, from the step after
        next (LambdaLR has set the next one's rate already): the warm-up shrinks by the same ratio,
        but not below the steps already taken (a warm-up is never restarted)."""
        total = min(total, max_steps)
        self.warmup = min(self.warmup, max(steps_taken, round(self.warmup * total / max_steps)))
        self.total = total


def engine_schedule(engine) -> WarmupCosine:
    """The WarmupCosine that build_engine gave the engine's LambdaLR."""
    return engine.lr_scheduler.lr_lambdas[0]


# Optimiser and schedule keys a resumed run takes from its own config, not from the checkpoint
# (docs/training.md, "Resume"): the checkpoint's optimizer state and LambdaLR restore the old
# values, so `apply_hyperparameters` sets the changed ones again after the load.
RESUMABLE_CHANGES = ("lr", "min_lr_ratio", "warmup_steps", "max_steps", "epochs", "weight_decay", "beta1", "beta2",
                     "eps")


def changed_hyperparameters(saved: dict, t: TrainerConfig) -> dict[str, tuple]:
    """{key: (checkpoint's value, this run's)} of the RESUMABLE_CHANGES keys that differ."""
    return {k: (saved[k], getattr(t, k)) for k in RESUMABLE_CHANGES if k in saved and saved[k] != getattr(t, k)}


def apply_hyperparameters(engine, t: TrainerConfig, total_steps: int, changed: dict) -> None:
    """After engine.load_checkpoint: the changed keys take this run's values. The schedule keeps
    its place (steps taken) and continues with the new peak rate, warm-up, floor or length;
    AdamW's betas, eps and weight decay (matrices only) are set in every parameter group."""
    scheduler, schedule = engine.lr_scheduler, engine_schedule(engine)
    if "warmup_steps" in changed:
        schedule.warmup = t.warmup_steps
    if "min_lr_ratio" in changed:
        schedule.min_ratio = t.min_lr_ratio
    if "max_steps" in changed or "epochs" in changed:
        schedule.total = total_steps
    if "lr" in changed:
        scheduler.base_lrs = [t.lr for _ in scheduler.base_lrs]
    groups = scheduler.optimizer.param_groups  # the optimizer the schedule steps (DeepSpeed's basic one)
    for index, group in enumerate(groups):
        group["betas"], group["eps"] = (t.beta1, t.beta2), t.eps
        if index == 0:  # param_groups() puts the decayed matrices first
            group["weight_decay"] = t.weight_decay
    rates = [base * schedule(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, rate in zip(groups, rates):  # the next step's rate, as LambdaLR would have set it
        group["lr"] = rate
    scheduler._last_lr = rates


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices only; norms, biases and the query-stream start vector keep theirs."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(ds: DeepSpeedConfig, t: TrainerConfig, micro_batch: int, total_steps: int, module: nn.Module,
                 world_size: int, on_cpu: bool):
    """deepspeed.initialize around a loss module holding the BigLearner as `module.model` (e.g.
    train.task.LossModel(model)), its schedule sized to `total_steps`; returns (engine, ds_config)."""
    import deepspeed

    ds_config = deepspeed_config(ds, t, micro_batch, world_size, on_cpu)
    # Our schedule rather than DeepSpeed's WarmupCosineLR: that one runs step 1 at lr 0 and cannot
    # be resized when a time budget turns out to allow fewer steps than max_steps.
    schedule = WarmupCosine(total_steps, t.warmup_steps, t.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, t.weight_decay), config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    if ds.zero_stage == 3:
        deepspeed.zero.register_external_parameter(engine.module, module.model.query_start)
    return engine, ds_config


def optimizer_step(parameters, optimizer, schedule=None, grad_clip: float = 1.0):
    """The optimiser step without DeepSpeed: clip the gradient norm (0 = no clipping), step the
    optimiser and the schedule, clear the gradients. Returns the gradient norm (None unclipped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip) if grad_clip else None
    optimizer.step()
    if schedule is not None:
        schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class LocalEngine:
    """The part of a DeepSpeed engine the Trainer uses, over a plain torch optimiser and schedule,
    for in-process experiments without a process group (the synthetic sources' `fit`, the VAE,
    bench/digits.py, bench/shootout.py): forward, backward, step (clip, optimiser, schedule),
    learning rate, gradient norm."""

    def __init__(self, module: nn.Module, optimizer, schedule=None, grad_clip: float = 1.0):
        self.module, self.optimizer, self.schedule, self.grad_clip = module, optimizer, schedule, grad_clip
        self.device = next(module.parameters()).device
        self._grad_norm = None

    def __call__(self, batch):
        return self.module(batch)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self._grad_norm = optimizer_step(self.module.parameters(), self.optimizer, self.schedule, self.grad_clip)

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return self._grad_norm

    def was_step_applied(self) -> bool:
        return True

    def train_batch(self, batch) -> torch.Tensor:
        """One training step on one batch, as the Trainer takes it (forward, backward, step), for
        loops that drive their own evaluations and budgets. Returns the loss, detached."""
        self.module.train()
        loss, _ = self(batch)
        self.backward(loss)
        self.step()
        return loss.detach()
