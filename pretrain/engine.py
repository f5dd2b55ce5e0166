"""DeepSpeed engine from the validated config: process group, ZeRO config, optimizer, schedule.

CPU runs (no CUDA, or deepspeed.accelerator=cpu) use DeepSpeed's CPU accelerator
(DS_ACCELERATOR=cpu, set before deepspeed is imported), the gloo backend and torch's AdamW
("torch_adam": true), in fp32 or bf16.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .config import TrainConfig
from .model import BigLearner
from .objectives import TASKS


def use_cpu(config: TrainConfig) -> bool:
    if config.deepspeed.accelerator == "auto":
        return not torch.cuda.is_available()
    if config.deepspeed.accelerator == "cuda" and not torch.cuda.is_available():
        raise ValueError("deepspeed.accelerator=cuda but torch sees no CUDA device")
    return config.deepspeed.accelerator == "cpu"


def precision(config: TrainConfig, on_cpu: bool) -> str:
    """bf16 | fp16 | fp32 after resolving "auto"."""
    chosen = config.deepspeed.precision
    if chosen == "auto":
        if on_cpu:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if on_cpu and chosen == "fp16":
        raise ValueError("deepspeed.precision=fp16 is not supported on CPU; use fp32 or bf16")
    return chosen


def shm_extension_built(environ=os.environ) -> bool:
    """Whether DeepSpeed's CPU communication extension (deepspeed_shm_comm, compiled by torch's
    cpp_extension on the first CPU run, ~1-2 min) is in the torch extensions directory:
    TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/<python, device tag>/."""
    root = Path(environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return any(root.glob("deepspeed_shm_comm/*.so")) or any(root.glob("*/deepspeed_shm_comm/*.so"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(on_cpu: bool, timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join (or create, for a plain `python -m pretrain.train`) the process group, whose
    collectives fail after timeout_s instead of waiting forever for a lost rank.
    Returns (rank, world_size, local_rank). Must run before deepspeed is imported on CPU."""
    if on_cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    if on_cpu and int(os.environ.get("LOCAL_RANK", 0)) == 0 and not shm_extension_built():
        print("compiling DeepSpeed's CPU extension (shm_comm), once per machine, ~1-2 min", file=sys.stderr, flush=True)
    if "RANK" not in os.environ:  # single process without a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not on_cpu:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", timeout=datetime.timedelta(seconds=timeout_s))
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


_GROUP_ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def process_group(on_cpu: bool, timeout_s: float = 1800.0):
    """init_distributed for the length of one run: yields (rank, world_size, local_rank). When
    this call creates the group (a plain `python -m`, a notebook), the launcher variables it set
    (RANK, MASTER_PORT, ...) are removed at exit, so that a process started later from this one
    does not try to join this process's group. The group itself stays for the next run in the
    same process: DeepSpeed keeps references to it, and destroying it breaks a second run."""
    created = "RANK" not in os.environ
    try:
        yield init_distributed(on_cpu, timeout_s)
    finally:
        if created:
            for key in _GROUP_ENVIRONMENT:
                os.environ.pop(key, None)


def deepspeed_config(config: TrainConfig, world_size: int, on_cpu: bool) -> dict:
    """The DeepSpeed JSON config for this run (also written to run_dir/deepspeed_config.json); the
    learning-rate schedule is build_engine's WarmupCosine."""
    ds, t = config.deepspeed, config.trainer
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
    dtype = precision(config, on_cpu)
    result = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": config.data.batch_size * t.grad_accum * world_size,
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices only; norms, biases and the query-stream start vector keep theirs."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def task_stats(batch, nll: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-task sums {"nll_sum", "count"} [len(TASKS)] of target-row NLLs [B, Nt] (BigLearner.loss):
    the model knows tensors, the training side knows which objective drew each row."""
    mask = batch.target_mask
    task_of_row = batch.task_id[:, None].expand_as(mask)[mask]
    return {"nll_sum": torch.zeros(len(TASKS), device=nll.device).index_add_(0, task_of_row, nll.detach()[mask].float()),
            "count": torch.bincount(task_of_row, minlength=len(TASKS)).to(nll.device, torch.float32)}


class LossModel(nn.Module):
    """forward(batch) -> BigLearner.loss(batch), so the loss runs inside the engine's forward.

    ZeRO-3 gathers a module's own parameters in its forward hook; BigLearner.query_start is used
    by loss() without BigLearner.forward being called, so it is registered as an external
    parameter of this module."""

    def __init__(self, model: BigLearner):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def build_engine(config: TrainConfig, module: nn.Module, world_size: int, on_cpu: bool):
    """deepspeed.initialize around a loss module holding the BigLearner as `module.model` (e.g.
    LossModel(model)); returns (engine, ds_config)."""
    import deepspeed

    ds_config = deepspeed_config(config, world_size, on_cpu)
    t = config.trainer
    # Our schedule rather than DeepSpeed's WarmupCosineLR: that one runs step 1 at lr 0 and cannot
    # be resized when a time budget turns out to allow fewer steps than max_steps.
    schedule = WarmupCosine(t.max_steps, t.warmup_steps, t.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, t.weight_decay), config=ds_config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule))
    if config.deepspeed.zero_stage == 3:
        deepspeed.zero.register_external_parameter(engine.module, module.model.query_start)
    return engine, ds_config


def dynamic_loss_scale(engine) -> tuple[float | None, float | None]:
    """(current scale, floor) of DeepSpeed's fp16 dynamic loss scaler; (None, None) without one
    (bf16, fp32, or a static scale)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if not getattr(scaler, "dynamic", False):
        return None, None
    return float(scaler.cur_scale), float(scaler.min_scale)


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
    for in-process experiments without a process group (pretrain.synthetic.fit, bench/digits.py):
    forward, backward, step (clip, optimiser, schedule), learning rate, gradient norm."""

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
