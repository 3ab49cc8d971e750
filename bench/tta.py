"""Test-time views for a trained age ensemble: does averaging over crops, shifts or mirrors raise validation accuracy?

    .venv/bin/python bench/tta.py --run-dir runs/cpu3 --data-dir ../shared/data/faces

Scores the run's members on its validation split (the split the run recorded) over several views of each
image, all made from the model's own input (what an in-graph view could use), averaged per member, then
combined with the run's fitted weights and with uniform weights. Prints a table, writes
bench/results/tta.json. Inference only: about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving.table import read_face_table  # noqa: E402
from training.config import AGE_GROUPS, AGES  # noqa: E402
from training.data import load_images, stratified_split, to_nchw  # noqa: E402
from training.export import load_age_ensemble  # noqa: E402

RESULTS = REPO / "bench" / "results"


def view(x: torch.Tensor, scale: float = 1.0, shift: float = 0.0, mirror: bool = False) -> torch.Tensor:
    """A centred window of 1/scale of the image, shifted by `shift` (fraction of the half-width), resized back."""
    theta = torch.zeros(x.shape[0], 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, 0, 2] = shift
    out = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                        padding_mode="reflection", align_corners=False)
    return out.flip(3) if mirror else out


VIEWS = {"image": {}, "mirror": {"mirror": True}, "zoom-in 1.1": {"scale": 1.1},
         "zoom-in 1.1 mirrored": {"scale": 1.1, "mirror": True}, "zoom-out 0.9": {"scale": 0.9},
         "zoom-out 0.9 mirrored": {"scale": 0.9, "mirror": True}, "shift left 3 %": {"shift": 0.06},
         "shift right 3 %": {"shift": -0.06}}
SETS = (("image",), ("image", "mirror"), ("image", "mirror", "zoom-in 1.1", "zoom-in 1.1 mirrored"),
        ("image", "mirror", "zoom-out 0.9", "zoom-out 0.9 mirrored"), ("image", "mirror", "shift left 3 %",
                                                                       "shift right 3 %"), tuple(VIEWS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "cpu", help="training run folder")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ensemble, summary = load_age_ensemble(args.run_dir)
    table = read_face_table(args.data_dir / "data.csv", labels=len(AGE_GROUPS), ages=(AGES[0], AGES[-1]))
    labels = table["Label"].to_numpy()
    _, val_idx = stratified_split(labels, 0.12, 0)
    val_idx = np.asarray(summary.get("val_index", val_idx))
    images = to_nchw(load_images([table["path"].iloc[i] for i in val_idx], summary["input_size"])).float()
    gender, race = (torch.tensor(table[k].to_numpy()[val_idx]) for k in ("Gender", "Race"))
    targets = labels[val_idx]
    with torch.no_grad():
        probs = {name: torch.stack([m.group_probs(view(images, **how), gender, race) for m in ensemble.members])
                 .numpy() for name, how in VIEWS.items()}  # name -> (members, N, 5)
    weights = {"fitted": ensemble.weights.numpy(), "uniform": np.full(len(ensemble.members), 1 / len(ensemble.members))}
    rows = []
    print(f"{'views averaged':<72}{'fitted':>8}{'uniform':>9}")
    for views in SETS:
        mean = np.mean([probs[v] for v in views], axis=0)
        row = {"views": list(views), **{k: float(((mean * w[:, None, None]).sum(0).argmax(1) == targets).mean())
                                        for k, w in weights.items()}}
        rows.append(row)
        print(f"{' + '.join(views):<72}{row['fitted']:>8.1%}{row['uniform']:>9.1%}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tta.json").write_text(json.dumps({"run_dir": str(args.run_dir), "val_images": len(targets),
                                                  "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
