"""Images as sequences of continuous patch tokens, and the data sets of the BigLearn-VAE.

An image [H, W, C] is cut into non-overlapping p x p patches read row by row; each patch is one
token of dimension p * p * C (pixels row by row, channels last). scikit-learn's 8x8 digits with
p = 2 give 16 tokens of dimension 4. Any array of images works the same way (`load_npz`), so
MNIST-like data drops in where a user has it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipeline.errors import UserError

NPZ_KEYS = ("train_images", "test_images")  # required; train_labels / test_labels optional


def check_images(images, patch_size: int, name: str = "images") -> np.ndarray:
    """float32 [N, H, W, C] from an array or a list of images ([H, W] or [H, W, C] each).
    UserError naming `name` (and the sample) for mismatched sizes, a patch size that does not
    divide the image, or NaN / infinite pixels."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise UserError(f"patch_size must be a positive integer; got {patch_size!r}")
    items = list(images) if isinstance(images, (list, tuple)) else None
    if items is not None:
        if not items:
            raise UserError(f"{name} is empty; expected at least one image")
        first = np.shape(items[0])
        for i, image in enumerate(items):
            if np.shape(image) != first:
                raise UserError(f"{name}[{i}] has shape {np.shape(image)}, expected {first} like {name}[0]")
        images = np.stack([np.asarray(image) for image in items])
    array = np.asarray(images)
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise UserError(f"{name} must be numeric pixels; got dtype {array.dtype}")
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or len(array) == 0:
        raise UserError(f"{name} must have shape [N, H, W] or [N, H, W, C] with N >= 1; got {array.shape}")
    height, width = array.shape[1:3]
    if height % patch_size or width % patch_size:
        raise UserError(f"patch_size={patch_size} does not divide the {height}x{width} images of {name}")
    bad = ~np.isfinite(array.reshape(len(array), -1)).all(1)
    if bad.any():
        raise UserError(f"{name}[{int(np.flatnonzero(bad)[0])}] has NaN or infinite pixels "
                         f"({int(bad.sum())} image(s) affected); expected finite values")
    return array.astype(np.float32)


def patchify(images, patch_size: int, name: str = "images") -> np.ndarray:
    """[N, L, p*p*C] patch tokens, L = (H/p) * (W/p) in row-major patch order."""
    array = check_images(images, patch_size, name)
    n, height, width, channels = array.shape
    p = patch_size
    grid = array.reshape(n, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(grid.reshape(n, (height // p) * (width // p), p * p * channels))


def unpatchify(patches: np.ndarray, image_shape: tuple[int, int, int], patch_size: int) -> np.ndarray:
    """Inverse of `patchify`: [N, L, p*p*C] -> [N, H, W, C]."""
    height, width, channels = image_shape
    p = patch_size
    n = len(patches)
    grid = np.asarray(patches).reshape(n, height // p, width // p, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, height, width, channels)


def load_digits_split(seed: int = 0, test_fraction: float = 0.3):
    """scikit-learn's 8x8 digits (no download) scaled to [0, 1], split stratified with a fixed
    seed: (train_images [N, 8, 8], train_labels, test_images, test_labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(images, digits.target, test_size=test_fraction,
                                                        random_state=seed, stratify=digits.target)
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


def load_npz(path: str | Path):
    """A user's images from an .npz with arrays train_images and test_images ([N, H, W(, C)],
    any scale the user chooses) and optionally train_labels / test_labels (for the linear probe)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.path: no such file {path}")
    with np.load(path, allow_pickle=False) as archive:
        for key in NPZ_KEYS:
            if key not in archive.files:
                raise UserError(f"data.path {path}: missing array {key!r}; found {sorted(archive.files)}")
        labels = [archive[key].astype(np.int64) if key in archive.files else None
                  for key in ("train_labels", "test_labels")]
        return archive["train_images"], labels[0], archive["test_images"], labels[1]
