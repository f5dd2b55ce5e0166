"""The Trainer and its one config (pretrain/train/trainer.py): where a run ends (steps, epochs),
the checks of TrainerConfig, the train state saved by name, and the step of an in-process loop
against the plain torch step it stands for."""
import math
import random

import numpy as np
import pytest
import torch

from data_pipeline.errors import UserError
from pretrain.experiments.synthetic import MarkovSource, SourceStream
from pretrain.model import BigLearner, ModelConfig
from pretrain.objectives import ObjectiveSampler
from pretrain.train.engine import LocalEngine, optimizer_step
from pretrain.train.task import LossModel, PretrainTask
from pretrain.train.trainer import RNGState, Trainer, TrainerConfig


class Batches:
    """A stream of `length` batches per epoch (only len() matters to total_steps)."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length


@pytest.mark.parametrize("trial", range(20))
def test_total_steps_is_the_smaller_of_the_step_and_epoch_limits(trial):
    rng = np.random.default_rng()
    per_epoch, accum = int(rng.integers(1, 50)), int(rng.integers(1, 4))
    epochs = float(rng.choice([0.0, 0.5, 1.0, 2.0, float(rng.uniform(0.1, 5))]))
    max_steps = int(rng.integers(0 if epochs else 1, 200))
    config = TrainerConfig(max_steps=max_steps, epochs=epochs, grad_accum=accum)
    # brute force: count optimizer steps of `accum` batches until either limit is reached
    steps, batches = 0, 0
    while (not max_steps or steps < max_steps) and (not epochs or batches < epochs * per_epoch):
        steps, batches = steps + 1, batches + accum
    assert config.total_steps(Batches(per_epoch)) == max(steps, 1)


def test_epochs_need_a_stream_with_an_epoch_length():
    with pytest.raises(UserError, match="trainer.epochs needs data with a known epoch length"):
        TrainerConfig(max_steps=0, epochs=1).total_steps(iter([]))
    assert TrainerConfig(max_steps=7).total_steps(iter([])) == 7  # no epoch limit: length not needed


@pytest.mark.parametrize("fields, key", [
    (dict(max_steps=0), "trainer.max_steps"),
    (dict(epochs=-1.0), "trainer.epochs"),
    (dict(grad_accum=0), "trainer.grad_accum"),
    (dict(lr=float("nan")), "trainer.lr must be a finite number"),
    (dict(lr=0.0), "trainer.lr"),
    (dict(beta2=1.0), "trainer.beta2"),
    (dict(loggers=["tensorboard"]), "trainer.loggers"),
    (dict(loggers=["jsonl", "comet"]), "trainer.loggers"),
    (dict(warmup_steps=-1), "trainer.warmup_steps"),
])
def test_bad_knobs_are_refused_when_the_config_is_made(fields, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        TrainerConfig(**fields)


def test_rng_state_restores_every_generator():
    state = RNGState()
    saved = state.state_dict()
    first = (random.random(), np.random.rand(), torch.rand(3))
    state.load_state_dict(saved)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_trainer_step_is_the_plain_torch_step_on_the_same_batches():
    """Trainer.train_step over a LocalEngine equals forward, backward, clip, AdamW by hand."""
    seed = int(np.random.default_rng().integers(1 << 30))
    source = MarkovSource.random(n_states=6, seed=seed % 1000)
    config = ModelConfig(vocab_size=6, d_model=16, n_layers=2, n_heads=2, attention_backend="torch")
    torch.manual_seed(seed)
    reference = BigLearner(config)
    model = BigLearner(config)
    model.load_state_dict(reference.state_dict())
    sampler = ObjectiveSampler("biglearn")
    task = PretrainTask(config, 12, None, True, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    trainer = Trainer(LocalEngine(task.module(model), optimizer, grad_clip=0.5),
                      SourceStream(source, sampler, length=12, batch_size=4, seed=seed), task,
                      TrainerConfig(max_steps=3))
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    batches = iter(SourceStream(source, sampler, length=12, batch_size=4, seed=seed))
    for _ in range(3):
        trainer.train_step()
        loss, _ = LossModel(reference)(next(batches).to_torch())
        loss.backward()
        optimizer_step(reference.parameters(), reference_optimizer, grad_clip=0.5)
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)
    assert trainer.progress.step == 3 and math.isfinite(trainer.log_window()["loss"])
