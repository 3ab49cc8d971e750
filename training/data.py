"""Data: the face CSV data set, the STL-10 binary reader, the validation split and augmentation presets.

    python -c "from training.data import read_stl10; print(read_stl10('/data/stl10', 'train')[0].shape)"
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold, train_test_split

from serving.image import InputError, prepare_image
from serving.table import DataError
from training.config import STL10_CLASSES

STL10_SIDE = 96
STL10_IMAGE_BYTES = 3 * STL10_SIDE * STL10_SIDE


def load_images(paths: list[str], size: int, threads: int = 0) -> np.ndarray:
    """Decode every image once with the serving preparation: (N, size, size, 3) uint8."""
    def one(path: str) -> np.ndarray:
        try:
            return prepare_image(path, size)
        except InputError as exc:
            raise DataError(f"{path}: {exc}") from None

    with ThreadPoolExecutor(threads or min(8, (os.cpu_count() or 1) + 2)) as pool:
        return np.stack(list(pool.map(one, paths)))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/validation split, fixed by its seed."""
    index = np.arange(len(labels))
    train, val = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(val)


def validation_split(labels: np.ndarray, val_fraction: float, seed: int, folds: int = 0,
                     fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A run's (train, validation) indices: the stratified hold-out of `val_fraction`, or with `folds` > 1 the
    `fold`-th of that many stratified folds as validation (K-fold cross-validation: every face is validated
    once over the folds), both fixed by `seed`. A `val_fraction` of 0 (and no folds) trains on every face and
    validates none: a run on all of data.csv."""
    if folds <= 1 and val_fraction == 0:
        return np.arange(len(labels)), np.arange(0)
    if folds <= 1:
        return stratified_split(labels, val_fraction, seed)
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be 0-{folds - 1} with {folds} folds, not {fold}")
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), labels)
    train, val = list(splits)[fold]
    return np.sort(train), np.sort(val)


def held_out_faces(validation: dict, labels: np.ndarray) -> np.ndarray:
    """The validation faces of an exported model (its JSON's `validation` section), as rows of data.csv; a
    DataError for a model trained on every face, which has none."""
    if not validation.get("size"):
        raise DataError("the model was trained on all of data.csv, so no face of it is held out (its JSON's "
                        "validation figures are out of fold); score a model with a validation split")
    return validation_split(labels, validation["fraction"], validation["seed"], validation.get("folds", 0),
                            validation.get("fold", 0))[1]


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in 0..255 units over (N, H, W, 3) uint8 training images."""
    pixels = images.reshape(-1, 3).astype(np.float64)
    return tuple(pixels.mean(0).round(4).tolist()), tuple(pixels.std(0).round(4).tolist())


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 numpy -> (N, 3, H, W) uint8 tensor; batches are cast to float on the fly."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


class BatchAugment:
    """Train-only augmentation of a float (B, 3, H, W) batch: random flip, rotation, shift and scale."""

    def __init__(self, flip: bool = True, degrees: float = 10.0, shift: float = 0.0, scale: float = 0.0):
        self.flip, self.degrees, self.shift, self.scale = flip, degrees, shift, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        angle = (torch.rand(b) * 2 - 1) * math.radians(self.degrees)
        zoom = 1 + (torch.rand(b) * 2 - 1) * self.scale
        mirror = torch.where(torch.rand(b) < 0.5, -1.0, 1.0) if self.flip else torch.ones(b)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(b, 2, 3)  # maps output to input coordinates, in [-1, 1] units
        theta[:, 0, 0], theta[:, 0, 1] = cos * mirror, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin * mirror, cos
        theta[:, :, 2] = (torch.rand(b, 2) * 2 - 1) * 2 * self.shift
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


AUGMENT_PRESETS = {
    "faces": lambda: BatchAugment(flip=True, degrees=10.0, shift=0.06, scale=0.08),
    "stl10": lambda: BatchAugment(flip=True, degrees=10.0),  # the course report's flips and +-10 degrees
}


class Batches:
    """Mini-batches over in-memory tensors; the first tensor is uint8 images, cast to float (and augmented)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool = False,
                 augment=None, device: str | torch.device = "cpu", seed: int = 0):
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle
        self.augment, self.device = augment, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self):
        n = len(self.tensors[0])
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            images, *rest = (t[idx.to(t.device)].to(self.device, non_blocking=True) for t in self.tensors)
            images = images.float()  # (B, 3, H, W) in 0..255
            if self.augment is not None:
                images = self.augment(images)
            yield (images.contiguous(memory_format=torch.channels_last), *rest)


def read_stl10(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read the official STL-10 binaries: images (N, 96, 96, 3) uint8 RGB and labels 0-9."""
    folder = Path(root) / "stl10_binary"
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    for p in (x_path, y_path):
        if not p.is_file():
            raise DataError(f"{p}: no such file (expected the official stl10_binary layout under {root})")
    size = x_path.stat().st_size
    if size == 0 or size % STL10_IMAGE_BYTES:
        raise DataError(f"{x_path}: {size} bytes is not a whole number of {STL10_IMAGE_BYTES}-byte images")
    raw = np.fromfile(x_path, dtype=np.uint8).reshape(-1, 3, STL10_SIDE, STL10_SIDE)
    images = raw.transpose(0, 3, 2, 1)  # each channel is stored column-major: (N, C, W, H) -> (N, H, W, C)
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
    if len(labels) != len(images):
        raise DataError(f"{y_path}: {len(labels)} labels for {len(images)} images in {x_path.name}")
    bad = np.flatnonzero((labels < 1) | (labels > len(STL10_CLASSES)))
    if len(bad):
        raise DataError(f"{y_path}: labels must be 1-{len(STL10_CLASSES)}; bad at positions {list(bad[:10])}")
    return np.ascontiguousarray(images), labels - 1
