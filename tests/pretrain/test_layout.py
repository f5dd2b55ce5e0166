"""Sorted layout built by collate against a per-sample loop."""
import numpy as np
import pytest

from biglearn_kernels import INVALID_GROUP
from pretrain.layout import IGNORE_LABEL, collate
from pretrain.objectives import TASKS, ObjectiveConfig, ObjectiveSampler


def test_collate_matches_per_sample_construction():
    rng = np.random.default_rng()
    sampler = ObjectiveSampler(ObjectiveConfig(name="mixture", mixture={t: 1.0 for t in TASKS}))
    windows = [rng.integers(0, 1000, int(n)) for n in rng.integers(2, 40, 16)]
    specs = [sampler(len(w), rng) for w in windows]
    segments = [rng.integers(0, 3, len(w)) for w in windows]
    batch = collate(windows, specs, pad_id=7, segments=segments)
    width = max(s.n_source + s.n_target for s in specs)
    assert batch.tokens.shape == (16, width)  # trimmed to the longest S ∪ T
    assert batch.labels.shape == (16, max(s.n_target for s in specs))
    for b, (window, spec) in enumerate(zip(windows, specs)):
        kept = spec.n_source + spec.n_target
        order = spec.order[:kept]
        assert batch.tokens[b, :kept].tolist() == window[order].tolist()
        assert batch.positions[b, :kept].tolist() == order.tolist()
        assert batch.segments[b, :kept].tolist() == segments[b][order].tolist()
        assert np.all(batch.tokens[b, kept:] == 7) and np.all(batch.groups[b, kept:] == INVALID_GROUP)
        assert np.all(batch.groups[b, :spec.n_source] == 0)
        assert batch.groups[b, spec.n_source:kept].tolist() == spec.target_groups.tolist()
        nt = spec.n_target
        assert batch.target_groups[b, :nt].tolist() == spec.target_groups.tolist()
        assert np.all(batch.target_groups[b, nt:] == INVALID_GROUP)
        assert batch.target_mask[b].sum() == nt and batch.target_mask[b, :nt].all()
        assert batch.labels[b, :nt].tolist() == window[order[spec.n_source:]].tolist()
        assert np.all(batch.labels[b, nt:] == IGNORE_LABEL)
        assert batch.tokens[b, batch.target_index[b, :nt]].tolist() == batch.labels[b, :nt].tolist()
        assert batch.task_id[b] == spec.task_id


def test_to_torch_keeps_every_field():
    rng = np.random.default_rng()
    specs = [ObjectiveSampler("plm")(12, rng) for _ in range(3)]
    batch = collate(rng.integers(0, 50, (3, 12)), specs, pad_id=0)
    tensors = batch.to_torch()
    for name in ("tokens", "positions", "groups", "target_index", "target_groups", "labels", "target_mask"):
        assert np.array_equal(getattr(tensors, name).numpy(), getattr(batch, name))
    assert tensors.segments is None


def test_mismatched_inputs_are_rejected():
    rng = np.random.default_rng()
    spec = ObjectiveSampler("clm")(10, rng)
    with pytest.raises(ValueError, match="one spec per window"):
        collate(rng.integers(0, 5, (2, 10)), [spec], pad_id=0)
    with pytest.raises(ValueError, match="spec.order"):
        collate(rng.integers(0, 5, (1, 12)), [spec], pad_id=0)
    spec.target_groups = spec.target_groups[::-1].copy()
    with pytest.raises(ValueError, match="non-decreasing"):
        collate(rng.integers(0, 5, (1, 10)), [spec], pad_id=0)


def test_layout_constants_match_the_kernels_and_collate_imports_no_torch():
    """kernels/ keeps its own INVALID_GROUP (it imports nothing from the project): the two must agree.
    The layout module runs in data workers, so importing it (and the objectives) must not pull torch."""
    import subprocess
    import sys

    import pretrain.layout
    assert pretrain.layout.INVALID_GROUP == INVALID_GROUP
    code = ("import sys, pretrain.layout, pretrain.objectives; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('kernels')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_make_split_orders_source_then_targets_then_the_rest():
    from pretrain.layout import make_split
    rng = np.random.default_rng()
    length = int(rng.integers(3, 30))
    perm = rng.permutation(length)
    n_source = int(rng.integers(0, length - 1))
    n_target = int(rng.integers(1, length - n_source + 1))
    source, targets = perm[:n_source], perm[n_source:n_source + n_target]
    spec = make_split(length, source, targets, task_id=3)
    dropped = sorted(set(range(length)) - set(source.tolist()) - set(targets.tolist()))
    assert spec.order.tolist() == sorted(source.tolist()) + targets.tolist() + dropped
    assert (spec.n_source, spec.n_target, spec.task_id) == (n_source, n_target, 3)
    assert spec.target_groups.tolist() == list(range(1, n_target + 1))
