"""The data slope of a recipe: the same members trained on shares of the training split under several seeds,
all scored on the same validation faces. Prints mean and spread per share; writes bench/results/slope.json.

    .venv/bin/python bench/slope.py --data-dir ../shared/data/faces --members face-age-frz3 \\
        --fractions 0.8636 1.0 --seeds 0 1 2 3        # 76 % and 88 % of data.csv, 4 seeds each

A share of 0.8636 of the 88 % training split is 76 % of data.csv. Each run is one `agegroup-train age` command
with --train-fraction and --seed-offset (the subsample and the members' seeds move together); a finished run
is reused, so an interrupted sweep resumes. The difference between shares is paired by seed.
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
    out = RESULTS / f"{args.name}.json"
    out.write_text(json.dumps({"members": args.members, "preset": args.preset, "extra": args.extra,
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
