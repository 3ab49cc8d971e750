"""Synthetic data made on the spot: a small face folder, a tiny trained ensemble and its ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

ROWS_PER_CLASS = 12
FACE_IMAGE = Path(__file__).parent / "data" / "face.jpg"  # a public-domain face (tests/data/README.md)


def face_pixels(side: int) -> np.ndarray:
    """The test face, resized to side x side: (side, side, 3) uint8."""
    return np.asarray(Image.open(FACE_IMAGE).convert("RGB").resize((side, side), Image.BILINEAR))


def random_faces(n: int, seed: int, side: int = 32):
    """n random side x side images with random gender, race, label and age: training.quantize.Faces."""
    from training.quantize import Faces

    rng = np.random.default_rng(seed)
    return Faces(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8), rng.integers(0, 2, n),
                 rng.integers(0, 5, n), rng.integers(0, 5, n), rng.uniform(10, 60, n))


def make_face_folder(root: Path, rows_per_class: int = ROWS_PER_CLASS, side: int = 64, seed: int = 0) -> Path:
    """data.csv + testdata.csv + JPEGs of one real face whose brightness and tint depend on the label, so the
    labels are learnable and the face detector still finds a face in every image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    face = face_pixels(side).astype(np.float64)
    records = []
    for label in range(5):
        for k in range(rows_per_class):
            tint = np.array([40 + 45 * label, 200 - 35 * label, 90 + 20 * (k % 3)], dtype=np.float64)
            pixels = np.clip(0.6 * face + 0.4 * tint + rng.normal(0, 8, (side, side, 3)), 0, 255).astype(np.uint8)
            name = f"images/face_{label}_{k}.jpg"
            Image.fromarray(pixels).save(root / name, quality=90)
            records.append({"Image": name, "Label": label, "Age": 15 + 10 * label, "Gender": k % 2,
                            "Race": k % 5})
    table = pd.DataFrame(records)
    table.to_csv(root / "data.csv", index=False)
    table[["Image", "Gender", "Race"]].head(23).to_csv(root / "testdata.csv", index=False)
    return root


@pytest.fixture(scope="session")
def face_dir(tmp_path_factory) -> Path:
    return make_face_folder(tmp_path_factory.mktemp("faces"))


@pytest.fixture(scope="session")
def tiny_run(face_dir, tmp_path_factory) -> Path:
    """Three members (course VGG, exact-age VGG, ResNet) trained for two epochs at 32 px on synthetic faces."""
    import torch

    from training.config import AGE_PRESETS, AgeTrainConfig
    from training.train import train_age_ensemble

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("run")
    cfg = AgeTrainConfig(**AGE_PRESETS["tiny"], preset="tiny", data_dir=face_dir, out_dir=out,
                         members=("nodrop", "vgg-age", "res-group"), val_fraction=0.25)
    train_age_ensemble(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported as age_ensemble.onnx + .json; returns the folder."""
    from training.export import export_age_ensemble

    out = tmp_path_factory.mktemp("exported")
    export_age_ensemble(tiny_run, out)
    return out
