"""Accuracy of the shipped ensemble and of each member on the validation split, beside the seed report.

    .venv/bin/python bench/accuracy.py --run-dir runs/cpu --data-dir ../shared/data/faces

The split is rebuilt from the exported JSON (fraction, seed), so it is the one the weights were fitted on.
The ensemble row is the shipped ONNX file itself, fed through the serving image code; member rows come
from the run's PyTorch checkpoints. Prints a table; writes bench/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving.runtime import MODEL_DIR, OnnxModel  # noqa: E402
from serving.table import read_face_table  # noqa: E402

# The course report behind the design, on the course's own held-out test set (not this validation split).
SEED_REPORT = {"best single CNN": 0.686, "hand-weighted 5-model ensemble": 0.708}


def pytorch_probabilities(run_dir: Path, images: np.ndarray, gender: np.ndarray, race: np.ndarray) -> dict:
    """(group probabilities (N, 5), median age (N,) or None) of every member checkpoint of a run by name, and of
    the ensemble as exported. A member's median age comes from its exact-age head; group members have none."""
    import torch

    from training.data import Batches, to_nchw
    from training.export import load_age_ensemble
    from training.models import age_summary

    ensemble, summary = load_age_ensemble(run_dir)
    batches = Batches((to_nchw(images), torch.from_numpy(gender), torch.from_numpy(race)), 64)
    out = {}
    with torch.inference_mode():
        for entry, member in zip(summary["members"], ensemble.members):
            logits = [member(*b) for b in batches]
            probs = torch.cat([member.decode(z) for z in logits]).numpy()
            age = (torch.cat([age_summary(member.age_probs(z))[0] for z in logits]).numpy()
                   if member.target == "age" else None)
            out[f"member {entry['name']}"] = (probs, age)
        out["ensemble as exported (PyTorch)"] = (torch.cat([ensemble(*b) for b in batches]).numpy(), None)
    return out


def metrics(probs: np.ndarray, labels: np.ndarray, age: np.ndarray | None = None,
            true_age: np.ndarray | None = None) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    pred = probs.argmax(1)
    return {"accuracy": float(accuracy_score(labels, pred)),
            "macro_f1": float(f1_score(labels, pred, average="macro")),
            "mae": float(np.abs(pred - labels).mean()),  # in groups: the classes are ordered
            "mae_years": None if age is None else float(np.abs(age - true_age).mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "age_ensemble.onnx", help="exported ensemble")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "cpu",
                        help="training run behind the model, for member rows (skipped if absent)")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "faces",
                        help="folder with data.csv and images/")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accuracy.json")
    args = parser.parse_args(argv)
    if not (args.data_dir / "data.csv").is_file():
        raise SystemExit(f"bench/accuracy.py: {args.data_dir}/data.csv not found; pass --data-dir")
    from sklearn.metrics import confusion_matrix

    from training.data import DataError, held_out_faces

    model = OnnxModel(args.model, device="cpu")
    meta = model.metadata
    table = read_face_table(args.data_dir / "data.csv", labels=len(model.class_names))
    labels_all = table["Label"].to_numpy()
    split = meta["validation"]
    try:
        val = held_out_faces(split, labels_all)
    except DataError as exc:
        raise SystemExit(f"bench/accuracy.py: {exc}") from None
    labels, gender, race = labels_all[val], table["Gender"].to_numpy()[val], table["Race"].to_numpy()[val]
    true_age = table["Age"].to_numpy()[val]
    images = np.stack([model.prepare(p) for p in table["path"].to_numpy()[val]])  # (N, H, W, 3) uint8
    outputs = [model.predict_all(images[i:i + 64], gender[i:i + 64], race[i:i + 64]) for i in range(0, len(val), 64)]
    shipped = np.concatenate([o["probabilities"] for o in outputs])
    shipped_age = np.concatenate([o["age"] for o in outputs]) if "age" in outputs[0] else None
    shipped_range = np.concatenate([o["age_range"] for o in outputs]) if "age_range" in outputs[0] else None

    rows = {}
    if (args.run_dir / "ensemble.pt").exists():
        torch_outputs = pytorch_probabilities(args.run_dir, images, gender, race)
        members = [p for name, (p, _) in torch_outputs.items() if name.startswith("member")]
        rows.update({name: metrics(p, labels, age, true_age) for name, (p, age) in torch_outputs.items()
                     if name.startswith("member")})
        rows["ensemble, uniform weights, no flip"] = metrics(np.mean(members, axis=0), labels)
        for flip in ("without", "with"):  # both candidates, as training measured them
            if meta.get(f"fitted_{flip}_flip_val_accuracy") is not None:
                rows[f"ensemble, fitted weights, {flip} flip (training)"] = {
                    "accuracy": meta[f"fitted_{flip}_flip_val_accuracy"], "macro_f1": None, "mae": None,
                    "mae_years": None}
        rows["ensemble as exported (PyTorch)"] = metrics(torch_outputs["ensemble as exported (PyTorch)"][0], labels)
    rows[f"shipped ONNX ({'fitted + flip' if 'mirror' in meta['test_time_augmentation'] else 'fitted'})"] = \
        metrics(shipped, labels, shipped_age, true_age)

    width = max([len(k) for k in rows] + [len(k) + 28 for k in SEED_REPORT]) + 2
    if meta.get("training", {}).get("limit"):
        print(f"warning: the model was trained on only the first {meta['training']['limit']} rows of data.csv")
    print(f"validation split: {len(val)} images ({split['fraction']:.0%} stratified, seed {split['seed']}), "
          f"input {model.height}x{model.width}, preset {meta.get('preset')}")
    weights = {f"member {m['name']}": m["weight"] for m in meta["members"]}
    print(f"{'model':<{width}}{'weight':>8}{'accuracy':>10}{'macro-F1':>10}{'MAE':>8}{'MAE years':>11}")
    for name, m in rows.items():
        f1 = "n/a" if m["macro_f1"] is None else f"{m['macro_f1']:.4f}"
        mae = "n/a" if m["mae"] is None else f"{m['mae']:.3f}"
        years = "n/a" if m.get("mae_years") is None else f"{m['mae_years']:.2f}"
        weight = f"{weights[name]:.3f}" if name in weights else ""
        print(f"{name:<{width}}{weight:>8}{m['accuracy']:>10.4f}{f1:>10}{mae:>8}{years:>11}")
    for name, acc in SEED_REPORT.items():
        print(f"{'seed report (its test set): ' + name:<{width}}{'':>8}{acc:>10.4f}")
    matrix = confusion_matrix(labels, shipped.argmax(1), labels=range(len(model.class_names)))
    print("\nconfusion matrix of the shipped ensemble (rows: true, columns: predicted)")
    print(" " * 8 + "".join(f"{c:>8}" for c in model.class_names))
    for name, row in zip(model.class_names, matrix):
        print(f"{name:>8}" + "".join(f"{v:>8}" for v in row))
    if shipped_range is not None:
        inside = float(((shipped_range[:, 0] <= true_age) & (true_age <= shipped_range[:, 1])).mean())
        width_years = float((shipped_range[:, 1] - shipped_range[:, 0]).mean())
        print(f"\nage range (10th-90th percentile): holds the true age for {inside:.1%} of the faces; "
              f"{width_years:.1f} years wide on average")
    else:
        inside = width_years = None
    best_member = max((m["accuracy"] for k, m in rows.items() if k.startswith("member")), default=None)
    result = {"model": str(args.model), "validation_size": int(len(val)), "rows": rows,
              "weights": {m["name"]: m["weight"] for m in meta["members"]}, "class_names": model.class_names,
              "confusion_matrix": matrix.tolist(), "seed_report": SEED_REPORT, "best_member_accuracy": best_member,
              "shipped_accuracy": metrics(shipped, labels)["accuracy"],
              "shipped_age_mae_years": rows[next(k for k in rows if k.startswith("shipped"))]["mae_years"],
              "age_range_coverage": inside, "age_range_mean_width_years": width_years,
              "ensemble_beats_every_member": best_member is not None and
              metrics(shipped, labels)["accuracy"] > best_member}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
