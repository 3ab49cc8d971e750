"""The data slope of a recipe: the same members trained on shares of the training split under several seeds,
all scored on the same validation faces. Prints mean and spread per share; writes bench/results/slope.json.

    .venv/bin/python bench/slope.py --data-dir ../shared/data/faces --members face-age-frz3 \\
        --fractions 0.8636 1.0 --seeds 0 1 2 3        # 76 % and 88 % of data.csv, 4 seeds each

A share of 0.8636 of the 88 % training split is 76 % of data.csv. Each run is one `agegroup-train age` command
with --train-fraction and --seed-offset (the subsample and the members' seeds move together); a finished run
is reused, so an interrupted sweep resumes. The difference between shares is paired by seed.

    --cv-runs runs/cv/last      # also: the same members' 3-fold runs (bench/cv.py, 67 % of data.csv each),
                                # scored on the same validation faces, each face by the fold that held it out
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def run(args, fraction: float, seed: int) -> dict:
    out = REPO / "runs" / args.name / f"f{fraction:g}-s{seed}"
    summary = out / "summary.json"
    if not summary.is_file():
        command = [str(Path(sys.executable).with_name("agegroup-train")), "age", "--preset", args.preset,
                   "--data-dir", str(args.data_dir), "--out-dir", str(out), "--members", *args.members,
                   "--train-fraction", str(fraction), "--seed-offset", str(seed), *args.extra]
        print("+", " ".join(command), flush=True)
        start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        with (out / "train.log").open("w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    data = json.loads(summary.read_text())
    members = {m["name"]: m["val_accuracy"] for m in data["members"]}
    return {"fraction": fraction, "seed": seed, "accuracy": data["ensemble"]["accuracy"],
            "macro_f1": data["ensemble"]["macro_f1"], "log_loss": data["ensemble"].get("log_loss"),
            "members": members}


def cv_row(folder: Path, members: list[str], val_index: list[int]) -> dict:
    """The fold runs under `folder` on the split's validation faces: each face answered by the one fold run that
    did not train on it (the members' uniform mean), with the share of data.csv those runs trained on."""
    import numpy as np
    import torch

    runs = [torch.load(p, weights_only=False) for p in sorted(folder.glob("fold*/ensemble.pt"))]
    if not runs:
        raise SystemExit(f"bench/slope.py: no fold*/ensemble.pt under {folder}")
    answers, targets = {}, {}
    for run in runs:
        probs = np.mean([run["member_val"][m]["probs"] for m in members], axis=0)
        for row, face in enumerate(run["val_index"]):
            answers[face], targets[face] = probs[row], run["val_targets"][row]
    if not set(val_index) <= set(answers):
        raise SystemExit(f"bench/slope.py: the fold runs under {folder} do not answer every validation face")
    correct = [answers[f].argmax() == targets[f] for f in val_index]
    folds = runs[0]["config"]["folds"]
    return {"fraction": f"{folds}-fold", "data_share": (folds - 1) / folds, "accuracy": float(np.mean(correct)),
            "runs": len(runs), "keep_last": bool(runs[0]["config"].get("keep_last"))}


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    parser.add_argument("--preset", default="face")
    parser.add_argument("--members", nargs="+", default=["face-age-frz3"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.8636, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--name", default="slope", help="runs/<name>/ holds the runs")
    parser.add_argument("--cv-runs", type=Path, help="bench/cv.py fold runs of the same members to score too")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more agegroup-train arguments")
    args = parser.parse_args(argv)
    rows = [run(args, f, s) for s in args.seeds for f in args.fractions]
    print(f"\n{', '.join(args.members)} ({args.preset} preset): validation accuracy, mean ± sd over seeds "
          f"{args.seeds}\n| share of the training split | faces share of data.csv | accuracy % | macro-F1 % |"
          "\n|---:|---:|---:|---:|")
    for f in args.fractions:
        mine = [r for r in rows if r["fraction"] == f]
        print(f"| {f:g} | {88 * f:.0f} % | {spread([r['accuracy'] for r in mine])} | "
              f"{spread([r['macro_f1'] for r in mine])} |")
    if len(args.fractions) == 2:
        low, high = args.fractions
        diffs = [next(r["accuracy"] for r in rows if r["fraction"] == high and r["seed"] == s)
                 - next(r["accuracy"] for r in rows if r["fraction"] == low and r["seed"] == s) for s in args.seeds]
        print(f"paired gain {high:g} over {low:g}: {spread(diffs)} points (per seed: "
              + ", ".join(f"{100 * d:+.2f}" for d in diffs) + ")")
    report = {"members": args.members, "preset": args.preset, "extra": args.extra, "rows": rows}
    if args.cv_runs:
        import torch

        first = REPO / "runs" / args.name / f"f{args.fractions[0]:g}-s{args.seeds[0]}" / "ensemble.pt"
        report["cv"] = cv_row(args.cv_runs, args.members, torch.load(first, weights_only=False)["val_index"])
        print(f"{report['cv']['fraction']} runs ({report['cv']['data_share']:.0%} of data.csv, "
              f"{'last' if report['cv']['keep_last'] else 'best'} epoch) on the same faces: "
              f"{100 * report['cv']['accuracy']:.2f} %")
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
