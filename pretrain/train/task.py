"""Pretraining as a Trainer task: BigLearner.loss inside the engine, per-task NLL statistics,
token / prediction / FLOP counters, and MFU + memory in the log record."""
from __future__ import annotations

import resource

import numpy as np
import torch
import torch.nn as nn

from ..layout import QUERY_PREDICTOR
from ..model import BigLearner, ModelConfig
from ..objectives import TASKS

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for MFU; trainer.peak_tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
               "V100": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


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


def step_flops(model: ModelConfig, batch) -> float:
    """Training FLOPs of one micro-batch (forward + backward = 3 x forward) of the rows the model
    computes in its mode (docs/model.md): content rows that someone reads (S and every target
    group but the last, plus START with streams=1) run every layer but the last, where only
    their K/V are needed; query rows (every target with two streams, the targets batch.predictor
    gives a query row with one) run every layer but the last; in the last layer each target's
    predictor row runs and feeds the vocabulary projection. Attention counts the keys each row sees."""
    d, hd, h, hkv, f = model.d_model, model.head_dim, model.n_heads, model.n_kv_heads, model.ffn_hidden
    q_proj, kv_proj, out_proj, mlp = d * h * hd, 2 * d * hkv * hd, h * hd * d, 3 * d * f
    single = model.streams == 1
    n_content = n_query = visible = visible_last = 0.0
    for b, n_target in enumerate(batch.n_target.tolist()):
        target_groups = batch.target_groups[b][:n_target]
        keys = batch.groups[b][:batch.n_source[b] + n_target]
        keys = np.concatenate([[0] * single, keys[keys < target_groups.max()]])  # sorted: a prefix
        queries = target_groups[batch.predictor[b][:n_target] == QUERY_PREDICTOR] if single else target_groups
        n_content += len(keys)
        n_query += len(queries)
        visible += np.searchsorted(keys, keys, side="right").sum() + np.searchsorted(keys, queries, side="left").sum()
        visible_last += np.searchsorted(keys, target_groups, side="left").sum()
    layers, n_targets = model.n_layers, float(batch.n_target.sum())
    matmul = 2 * (n_content * ((layers - 1) * (q_proj + kv_proj + out_proj + mlp) + kv_proj)
                  + n_query * (layers - 1) * (q_proj + out_proj + mlp)
                  + n_targets * (q_proj + out_proj + mlp + d * model.vocab_size))
    attention = 4 * h * hd * (visible * (layers - 1) + visible_last)
    return 3.0 * (matmul + attention)


def peak_flops(peak_tflops: float, on_cpu: bool) -> float | None:
    """Peak FLOP/s per device for MFU: trainer.peak_tflops, else the GPU's from PEAK_TFLOPS."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if on_cpu:
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def memory_gb(on_cpu: bool) -> float:
    if on_cpu:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux
    return torch.cuda.max_memory_allocated() / 2 ** 30


class PretrainTask:
    """Pretraining on the trainer: BigLearner.loss inside the engine, per-task NLL statistics,
    token / prediction / FLOP counters, and MFU + memory in the log record."""

    def __init__(self, model_config: ModelConfig, seq_len: int, peak: float | None, on_cpu: bool, world_size: int):
        self.model_config, self.seq_len, self.peak, self.on_cpu, self.world_size = (
            model_config, seq_len, peak, on_cpu, world_size)

    def module(self, model: BigLearner) -> torch.nn.Module:
        return LossModel(model)

    def sums(self, batch, device_batch, output) -> dict[str, torch.Tensor]:
        stats = task_stats(device_batch, output)
        counters = [batch.tokens.shape[0] * self.seq_len, float(batch.n_target.sum()), step_flops(self.model_config, batch)]
        return {**stats, **dict(zip(("tokens", "predicted", "flops"), torch.tensor(counters, dtype=torch.float64)))}

    def record(self, totals: dict[str, list[float]]) -> dict:
        nll, count = totals["nll_sum"], totals["count"]
        return {"loss": sum(nll) / max(sum(count), 1.0),
                "task_loss": {task: n / c for task, n, c in zip(TASKS, nll, count) if c > 0}}

    def extra_record(self, totals: dict[str, list[float]], elapsed: float) -> dict:
        extra = {"memory_gb": memory_gb(self.on_cpu)}
        if self.peak:
            extra["mfu"] = totals["flops"][0] / elapsed / (self.peak * self.world_size)
        return extra
