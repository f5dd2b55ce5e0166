"""The digits experiment: one big-learned model classifies, generates and completes 8x8 digits."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import digits  # noqa: E402


def test_samples_put_the_label_in_its_own_slot_and_vocab_range():
    train, train_y, test, test_y = digits.load_split(seed=int(np.random.default_rng().integers(100)))
    assert train.shape[1] == test.shape[1] == 65 and len(test) == int(np.ceil(0.3 * (len(train) + len(test))))
    np.testing.assert_array_equal(train[:, 0], digits.LABEL_BASE + train_y)
    assert train[:, 1:].max() <= 16 and train[:, 1:].min() >= 0


def test_shift_moves_every_pixel_by_at_most_one_and_keeps_the_label():
    rng = np.random.default_rng()
    samples = np.concatenate([[[20]], rng.integers(0, 17, (1, 64))], axis=1)
    shifted = digits.shift_images(np.repeat(samples, 50, axis=0), rng)
    assert (shifted[:, 0] == 20).all()
    image = samples[0, 1:].reshape(8, 8)
    for row in shifted[:, 1:].reshape(-1, 8, 8):
        candidates = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                moved = np.zeros_like(image)
                moved[max(0, dy):8 + min(0, dy), max(0, dx):8 + min(0, dx)] = \
                    image[max(0, -dy):8 - max(0, dy), max(0, -dx):8 - max(0, dx)]
                candidates.append(np.array_equal(moved, row))
        assert any(candidates)


@pytest.mark.slow
def test_digits_run_reaches_94_percent(tmp_path):
    done = subprocess.run([sys.executable, "bench/digits.py", "--seed", "0", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(re.findall(r"^accuracy: ([0-9.]+)$", done.stdout, re.M)[-1])
    assert accuracy >= 0.94, done.stdout
    for name in ("digits_joint.png", "digits_conditional.png", "digits_completion.png", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_figures_are_large_enough_to_read(tmp_path):
    """Each 8x8 digit is drawn at least 64 pixels wide (8 screen pixels per intensity cell)."""
    import matplotlib.image

    rng = np.random.default_rng()
    n_cols, n_rows = 10, 3
    images = rng.integers(0, 17, size=(n_cols * n_rows, 64))
    path = tmp_path / "grid.png"
    digits.save_grid(images, n_cols, path, "title", row_labels=[f"y={r}" for r in range(n_rows)])
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= n_cols * 64 and height >= n_rows * 64
