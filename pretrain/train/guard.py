"""Divergence guard: counts bad steps in a row and stops the run before it destroys anything.

A step is bad when its loss is non-finite on any rank (the micro-batch is skipped everywhere),
or when the optimizer step was not applied or its global gradient norm is non-finite
(DeepSpeed's "OVERFLOW! Skipping step" included). Under fp16 dynamic loss scaling, overflow
skips before the first applied step while the scale can still shrink are the scaler's
warm-up, not divergence. `max_bad_steps` bad steps in a row raise TrainingError naming the
step. `healthy` is False while a streak lasts, so nothing is exported from it.

The last good checkpoint is the newest one whose weights then gave a good step: a checkpoint
saved right after the step that blew the weights up (finite, but every later loss NaN) is not
one, and resuming from it would fail at any learning rate. `protected` names it, and rotation
keeps it, so the advice "resume from it" always has something to resume.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. it diverged); the last good checkpoint (`last_good`, None
    when none was saved) is intact."""

    def __init__(self, message: str, last_good: str | None = None):
        super().__init__(message)
        self.last_good = last_good


class BadStepGuard:
    def __init__(self, max_bad_steps: int, last_good_checkpoint: str | None = None):
        self.max_bad_steps = max_bad_steps
        self.bad_in_row = 0
        self.first_bad_step: int | None = None
        self.last_good_checkpoint = last_good_checkpoint
        self.candidate: str | None = None  # saved while healthy; good once a good step follows it
        self.applied_any = False  # an optimizer step was applied since this process started

    @property
    def healthy(self) -> bool:
        return self.bad_in_row == 0

    @property
    def protected(self) -> str | None:
        return self.last_good_checkpoint

    def bad(self, step: int, reason: str) -> None:
        """Count a bad step; raise TrainingError at max_bad_steps in a row."""
        self.candidate = None  # the checkpoint before this step gave a bad one: not good
        self.bad_in_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        log.warning("bad step %d: %s (%d in a row)", step, reason, self.bad_in_row)
        if self.bad_in_row >= self.max_bad_steps:
            raise TrainingError(
                f"diverged: {self.bad_in_row} bad steps in a row (trainer.max_bad_steps={self.max_bad_steps}), from "
                f"step {self.first_bad_step} to step {step}, the last one: {reason}. Stopping without saving or "
                f"exporting; the last good checkpoint is {self.last_good_checkpoint or '(none saved)'}",
                self.last_good_checkpoint)

    def optimizer_step(self, step: int, applied: bool, grad_norm, loss_scale: float | None = None,
                       min_loss_scale: float | None = None) -> None:
        """After the optimizer step of `step`. loss_scale/min_loss_scale: the fp16 dynamic loss
        scale after the step and its floor (None without dynamic loss scaling)."""
        norm = None if grad_norm is None else float(grad_norm)
        if not applied:
            if loss_scale is not None and not self.applied_any and loss_scale > (min_loss_scale or 0):
                log.info("step %d skipped by the fp16 loss scaler's warm-up (scale now %g)", step, loss_scale)
                return
            self.bad(step, f"optimizer step skipped (gradient norm {norm})")
        elif norm is not None and not math.isfinite(norm):
            self.applied_any = True
            self.bad(step, f"gradient norm {norm}")
        else:
            self.applied_any = True
            self.bad_in_row, self.first_bad_step = 0, None
            if self.candidate is not None:  # its weights gave this good step
                self.last_good_checkpoint, self.candidate = self.candidate, None

    def saved(self, tag_dir) -> None:
        """A checkpoint was saved (or resumed from): a candidate for the last good one when no streak lasts."""
        if self.healthy:
            self.candidate = str(tag_dir)

    def state_dict(self) -> dict:
        return {"bad_in_row": self.bad_in_row, "first_bad_step": self.first_bad_step,
                "last_good_checkpoint": self.last_good_checkpoint}

    def load_state_dict(self, state: dict) -> None:
        self.bad_in_row = state["bad_in_row"]
        self.first_bad_step = state["first_bad_step"]
        self.last_good_checkpoint = state["last_good_checkpoint"]


def dynamic_loss_scale(engine) -> tuple[float | None, float | None]:
    """(current scale, floor) of DeepSpeed's fp16 dynamic loss scaler; (None, None) without one
    (bf16, fp32, or a static scale)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if not getattr(scaler, "dynamic", False):
        return None, None
    return float(scaler.cur_scale), float(scaler.min_scale)
