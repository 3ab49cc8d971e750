"""Training plots: loss/accuracy curves per epoch and a confusion matrix, written as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Train and validation loss and accuracy against epoch (validation where it was measured: a run that keeps
    its last epoch validates only that one)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        rows = [row for row in history if f"{split}_loss" in row]
        marker = "o" if len(rows) == 1 else None
        ax_loss.plot([r["epoch"] for r in rows], [r[f"{split}_loss"] for r in rows], marker=marker, label=split)
        ax_acc.plot([r["epoch"] for r in rows], [r[f"{split}_accuracy"] for r in rows], marker=marker, label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    ax_loss.legend()
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(targets, predictions, class_names, path: Path, title: str) -> None:
    """Row-normalised confusion matrix with the counts' share in each cell."""
    display = ConfusionMatrixDisplay.from_predictions(
        targets, predictions, labels=list(range(len(class_names))), display_labels=list(class_names),
        normalize="true", values_format=".2f", cmap="Blues", colorbar=False)
    display.ax_.set_title(title)
    display.figure_.tight_layout()
    display.figure_.savefig(path, dpi=100)
    plt.close(display.figure_)
