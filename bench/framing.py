"""Crops as /predict frames them: fold runs scored on their held-out faces both ways, paired by face.

    .venv/bin/python bench/framing.py --run shipped=runs/cv/lr4 [--run OTHER=runs/cv/OTHER ...]

Each fold run's members (equal weights, as shipped) answer every face of data.csv they did not train on twice:
the crop as the graph takes it (resized to the input size: what the hidden test and `aligned=true` feed it) and
the crop framed as /predict frames a photo (`aligned=false`: the detector's landmarks mapped onto the shipped
model's face template, `serving.face.prepare_face`, the served function itself). The difference is the served
path's framing cost on faces the data set already frames; the second run and after are also paired with the first
on each. Prints a table; writes bench/results/framing.json. Heavy: run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))  # before bench/, whose serving.py would shadow the serving package

from bench.cv import mean_se  # noqa: E402
from serving.face import FaceFinder, NoFace, prepare_face  # noqa: E402
from serving.image import prepare_image  # noqa: E402
from serving.runtime import MODEL_DIR  # noqa: E402
from serving.table import read_face_table  # noqa: E402
from training.config import AGE_GROUPS, AGES  # noqa: E402
from training.export import AgeGraph, load_age_ensemble  # noqa: E402

VIEWS = ("crop", "framed")


def frame_all(paths: list[str], size: int, template: dict) -> tuple[dict[str, np.ndarray], int]:
    """Both views of every face at the model's input size; a crop without a face found keeps its crop view there
    (/predict would refuse it). Also how many had none."""
    finder = FaceFinder(template)
    crops, framed, missed = [], [], 0
    for path in paths:
        crops.append(prepare_image(path, size))
        try:
            framed.append(prepare_face(path, (size, size), finder).pixels)
        except NoFace:
            framed.append(crops[-1])
            missed += 1
    return {"crop": np.stack(crops), "framed": np.stack(framed)}, missed


def answer(run_fold: Path, views: dict[str, np.ndarray], gender: torch.Tensor, race: torch.Tensor,
           labels: np.ndarray, ages: np.ndarray) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """The fold run's held-out faces and, for each view, whether each was classified right and its age error."""
    ensemble, summary = load_age_ensemble(run_fold)
    if summary["input_size"] != views["crop"].shape[1]:
        raise SystemExit(f"bench/framing.py: {run_fold} takes {summary['input_size']} px faces, the shipped model "
                         f"{views['crop'].shape[1]} px: score runs at the shipped model's input size")
    ensemble.weights.fill_(1 / len(ensemble.members))
    index = np.asarray(summary["val_index"])
    index = index[index < len(views["crop"])]  # with --limit, only the faces framed
    graph, out = AgeGraph(ensemble), {}
    for view, images in views.items():
        predicted, predicted_ages = [], []
        with torch.no_grad():  # what the ONNX graph computes: uint8 NHWC in, label and median age out
            for start in range(0, len(index), 128):
                rows = index[start:start + 128]
                _, label, age, _ = graph(torch.from_numpy(images[rows]), gender[rows], race[rows])
                predicted.append(label.numpy())
                predicted_ages.append(age.numpy())
        out[view] = {"correct": np.concatenate(predicted) == labels[index],
                     "age_error": np.abs(np.concatenate(predicted_ages) - ages[index])}
    return index, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="NAME=DIR",
                        help="a folder of fold runs (fold0, fold1 ...); the first is the one others pair with")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--only-folds", type=int, nargs="+", metavar="K", help="score these folds only (e.g. 0)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N faces of data.csv (a smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "framing.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if any("=" not in spec for spec in args.run):
        parser.error("--run takes NAME=DIR, e.g. --run shipped=runs/cv/lr4")
    runs = dict(spec.split("=", 1) for spec in args.run)
    table = read_face_table(args.data_dir / "data.csv", labels=len(AGE_GROUPS), ages=(AGES[0], AGES[-1]))
    n = args.limit or len(table)
    metadata = json.loads((MODEL_DIR / "age_ensemble.json").read_text())
    size = metadata["input_size"][0]
    start = time.perf_counter()
    views, missed = frame_all(table["path"].tolist()[:n], size, metadata["face_template"])
    print(f"{n} faces framed both ways in {time.perf_counter() - start:.0f} s; no face found on {missed}")
    labels, ages = table["Label"].to_numpy(), table["Age"].to_numpy().astype(float)
    gender, race = torch.tensor(table["Gender"].to_numpy()), torch.tensor(table["Race"].to_numpy())

    results = {}
    for name, folder in runs.items():
        correct = {v: np.full(len(table), np.nan) for v in VIEWS}
        error = {v: np.full(len(table), np.nan) for v in VIEWS}
        for fold in args.only_folds or range(args.folds):
            index, out = answer(REPO / folder / f"fold{fold}", views, gender, race, labels, ages)
            for v in VIEWS:
                correct[v][index] = out[v]["correct"]
                error[v][index] = out[v]["age_error"]
        seen = ~np.isnan(correct["crop"])
        views_scored = {v: {"accuracy": float(correct[v][seen].mean()), "age_mae_years": float(error[v][seen].mean())}
                        for v in VIEWS}
        results[name] = {"folder": folder, "faces": int(seen.sum()), **views_scored,
                         "framed_minus_crop_points": mean_se(correct["framed"][seen] - correct["crop"][seen]),
                         "framed_minus_crop_mae": mean_se(error["framed"][seen] - error["crop"][seen], 1.0),
                         "_correct": correct, "_error": error, "_seen": seen}

    first_name, first = next(iter(results.items()))
    print(f"\n| run | faces | crops | framed | framed − crops (points ± SE) | age MAE crops / framed | "
          f"vs {first_name}: crops | framed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        against = ["", ""]
        if r is not first:
            seen = r["_seen"] & first["_seen"]
            for i, v in enumerate(VIEWS):
                r[f"vs_first_{v}_points"] = mean_se(r["_correct"][v][seen] - first["_correct"][v][seen])
                r[f"vs_first_{v}_mae"] = mean_se(r["_error"][v][seen] - first["_error"][v][seen], 1.0)
                mean, se = r[f"vs_first_{v}_points"]
                against[i] = f"{mean:+.2f} ± {se:.2f}"
        d, se = r["framed_minus_crop_points"]
        crop, framed = r["crop"], r["framed"]
        print(f"| {name} | {r['faces']:,} | {100 * crop['accuracy']:.2f} % | {100 * framed['accuracy']:.2f} % "
              f"| {d:+.2f} ± {se:.2f} | {crop['age_mae_years']:.2f} / {framed['age_mae_years']:.2f} "
              f"| {against[0]} | {against[1]} |")
    saved = {"faces_without_face_found": missed, "input_size": size, "weights": "equal",
             "runs": {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
