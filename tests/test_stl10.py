"""STL-10 on synthetic files written in the official binary layout (no real copy exists on these machines)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training.config import STL10_PRESETS, Stl10TrainConfig
from training.data import DataError, read_stl10
from training.export import export_stl10
from training.train import train_stl10


def write_stl10(root, split: str, images_hwc: np.ndarray, labels_1_to_10: np.ndarray):
    """Write images (N, 96, 96, 3) the way the official files store them: (N, 3, 96, 96), column-major per channel."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    images_hwc.transpose(0, 3, 2, 1).astype(np.uint8).tofile(folder / f"{split}_X.bin")  # (N, C, W, H) in C order
    labels_1_to_10.astype(np.uint8).tofile(folder / f"{split}_y.bin")


def learnable_stl10(n_per_class: int = 12, seed: int = 0):
    """Class k is a horizontal gradient plus a tint that depends on k."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(1, 11), n_per_class)
    ramp = np.linspace(0, 60, 96)[None, :, None]
    images = np.stack([np.clip(ramp + 18 * (k - 1) + rng.normal(0, 8, (96, 96, 3)), 0, 255) for k in labels])
    return images.astype(np.uint8), labels


def test_reader_round_trips_the_column_major_layout(tmp_path):
    images = np.zeros((3, 96, 96, 3), dtype=np.uint8)
    images[0, 5, 70, 0] = 255  # row 5, column 70, red: a transposed read would put it at row 70, column 5
    images[1, :, :10, 1] = 200  # left band, green
    images[2] = np.arange(96, dtype=np.uint8)[:, None, None]  # brightness grows downwards
    write_stl10(tmp_path, "train", images, np.array([1, 5, 10]))
    read, labels = read_stl10(tmp_path, "train")
    assert np.array_equal(read, images)
    assert labels.tolist() == [0, 4, 9]
    assert read[0, 5, 70, 0] == 255 and read[0, 70, 5, 0] == 0


def test_reader_matches_a_hand_written_official_byte(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[96 * 96 + 7 * 96 + 3] = 99  # channel 1 (green), column 7, row 3 in the file's column-major order
    raw.tofile(folder / "test_X.bin")
    np.array([2], dtype=np.uint8).tofile(folder / "test_y.bin")
    read, labels = read_stl10(tmp_path, "test")
    assert read[0, 3, 7, 1] == 99 and read.sum() == 99 and labels.tolist() == [1]


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "train_X.bin").write_bytes(b"\x00" * 1000), "not a whole number"),
    (lambda f: np.array([1, 11], dtype=np.uint8).tofile(f / "train_y.bin"), "labels must be 1-10"),
    (lambda f: np.array([1], dtype=np.uint8).tofile(f / "train_y.bin"), "1 labels for 2 images"),
    (lambda f: (f / "train_X.bin").unlink(), "no such file"),
])
def test_malformed_folders_are_refused(tmp_path, damage, message):
    write_stl10(tmp_path, "train", np.zeros((2, 96, 96, 3), dtype=np.uint8), np.array([1, 2]))
    damage(tmp_path / "stl10_binary")
    with pytest.raises(DataError, match=message):
        read_stl10(tmp_path, "train")


@pytest.fixture(scope="module")
def stl10_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("stl10")
    write_stl10(root, "train", *learnable_stl10())
    torch.manual_seed(0)
    cfg = Stl10TrainConfig(**{**STL10_PRESETS["tiny"], "epochs": 10}, preset="tiny", data_dir=root,
                           out_dir=root / "run", val_fraction=0.25, lr=3e-3)
    result = train_stl10(cfg)
    return root, result


def test_tiny_training_lowers_the_loss_and_writes_plots(stl10_run):
    root, result = stl10_run
    saved = torch.load(root / "run" / "stl10_mlp.pt", weights_only=False)
    history = saved["history"]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert min(row["val_loss"] for row in history) < history[0]["val_loss"]
    assert result["val_accuracy"] >= 0.4  # chance is 0.1
    assert (root / "run" / "curves-stl10_mlp.png").exists() and (root / "run" / "confusion-stl10_mlp.png").exists()


def test_export_parity_and_contract(stl10_run, tmp_path):
    root, _ = stl10_run
    meta = export_stl10(root / "run" / "stl10_mlp.pt", tmp_path)
    for n in ("N=1", "N=5"):
        assert meta["parity"][n]["max_abs_diff"] <= 1e-4 and meta["parity"][n]["labels_equal"]
    session = ort.InferenceSession(str(tmp_path / "stl10_mlp.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    images = np.random.default_rng(0).integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)
    probs, labels = session.run(None, {"image": images})
    assert probs.shape == (3, 10) and labels.dtype == np.int64 and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert meta["class_names"][0] == "airplane" and len(meta["class_names"]) == 10


def test_cli_clear_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "training.train", "stl10", *args], capture_output=True,
                              text=True, timeout=300)
    missing = run("--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "o"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "no such file" in missing.stderr and "stl10_binary" in missing.stderr
    write_stl10(tmp_path, "train", np.zeros((2, 96, 96, 3), dtype=np.uint8), np.array([1, 12]))
    bad = run("--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o"))
    assert bad.returncode == 2 and "labels must be 1-10" in bad.stderr
    help_text = run("--help")
    assert help_text.returncode == 0 and "--data-dir" in help_text.stdout and "--hidden" in help_text.stdout


def test_bench_reports_test_accuracy_or_says_why_not(stl10_run, tmp_path):
    root, _ = stl10_run
    export_stl10(root / "run" / "stl10_mlp.pt", tmp_path / "model")
    write_stl10(root, "test", *learnable_stl10(n_per_class=3, seed=1))
    script = Path(__file__).resolve().parent.parent / "bench" / "stl10.py"
    bench = [sys.executable, str(script), "--model", str(tmp_path / "model" / "stl10_mlp.onnx"),
             "--out", str(tmp_path / "stl10.json")]
    ok = subprocess.run(bench + ["--data-dir", str(root)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "course report MLP" in ok.stdout and "0.4889" in ok.stdout and (tmp_path / "stl10.json").exists()
    missing = subprocess.run(bench + ["--data-dir", str(tmp_path / "none")], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0 and "no STL-10 test data" in missing.stderr
