"""Recipes compared by K-fold cross-validation: every recipe trained on each fold, every face of data.csv
validated once per recipe, the differences paired by fold and by face. Prints a table; writes bench/results/cv.json
(one entry per member set, fold count and baseline recipe).

    .venv/bin/python bench/cv.py --members face-age-c85 face-age-frz3 face-age-frz --folds 3 \\
        --recipe lr4="--keep-last --lr 4e-3" --recipe lr8="--keep-last --lr 8e-3"

A recipe is NAME=ARGS: more `agegroup-train age` arguments on top of --preset and --members (the first recipe is
the baseline the others are compared with). Each (recipe, fold) is one `agegroup-train age ... --folds K --fold i
--no-face-template` run under runs/<name>/<recipe>/fold<i>; a finished run is reused, so an interrupted sweep
resumes. Reported per recipe: accuracy, macro-F1 and age MAE (years) of the run's fitted ensemble (its one
member when there is one) on each fold, their mean and spread over the folds, and against the baseline the
paired difference by fold and by face (the mean over all faces of data.csv, with its standard error). Where a
recipe's runs kept their answers on the mirrored images, a row "NAME + mirror" scores the same ensemble averaged
over each image and its mirror (what `tta_flip` puts in the graph), paired with the baseline alike.

A subset is NAME=RECIPE:MEMBER,MEMBER,...: those members of a recipe's fold runs averaged with equal weights,
trained on nothing more, so that member sets are chosen out of fold from one sweep (its minutes per fold are
its members' own). A member may name its own recipe (lr4x:face-age-c85,lr8f:face-age-frz3,face-age-frz: a member
without one takes the recipe before it), so members trained at different settings are averaged too; a recipe
there trains only with --members that hold its members. `--base NAME` pairs every row with that row instead of
the first recipe, and `--only-folds 0` scores a sweep stopped after its first fold (every row on its faces):

    .venv/bin/python bench/cv.py --members face-age-c85 face-age-frz3 face-age-frz face-age-frz-ml face-age-frz-c85 \\
        --folds 3 --recipe lr4x="--keep-last --lr 4e-3" --base three \\
        --subset three=lr4x:face-age-c85,face-age-frz3,face-age-frz \\
        --subset four=lr4x:face-age-c85,face-age-frz3,face-age-frz,face-age-frz-ml \\
        --subset frozen3=lr4x:face-age-frz3,face-age-frz,face-age-frz-ml
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))  # before bench/, whose serving.py would shadow the serving package

from training.train import mixed_ages  # noqa: E402


def run_fold(args, recipe: str, extra: list[str], fold: int) -> dict | None:
    """Train (or reuse) one recipe on one fold; its fitted ensemble's validation answers, face by face (None for
    a run not finished yet with --report-only), and under "mirror" the same ensemble averaged over each image
    and its mirror (None for a run made before runs kept their mirrored answers)."""
    out = fold_dir(args, recipe, fold)
    if not (out / "summary.json").is_file():
        if args.report_only:
            return None
        command = [str(Path(sys.executable).with_name("agegroup-train")), "age", "--preset", args.preset,
                   "--data-dir", str(args.data_dir), "--out-dir", str(out), "--members", *args.members,
                   "--folds", str(args.folds), "--fold", str(fold), "--no-face-template", *extra]
        print("+", shlex.join(command), flush=True)
        start = time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)
        with (out / "train.log").open("w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    summary = torch.load(out / "ensemble.pt", weights_only=False)
    return weighted(summary, [(m["weight"], m["name"]) for m in summary["members"]], fold,
                    float(summary["train_seconds"]))


def run_subset(args, picks: list[tuple[str, str]], fold: int) -> dict | None:
    """(recipe, member) picks of one or more recipes' fold runs, scored with equal weights (None for a run not
    finished). Members are named by themselves where one recipe gives them all, else RECIPE:MEMBER."""
    runs = {}  # recipe -> its fold run's ensemble.pt
    for recipe in dict.fromkeys(r for r, _ in picks):
        if not (fold_dir(args, recipe, fold) / "summary.json").is_file():
            return None
        runs[recipe] = torch.load(fold_dir(args, recipe, fold) / "ensemble.pt", weights_only=False)
    first, *others = runs.values()
    if any(list(s["val_index"]) != list(first["val_index"]) for s in others):
        raise SystemExit(f"bench/cv.py: fold {fold} of {', '.join(runs)} validated different faces")
    missing = [f"{r}:{m}" for r, m in picks if m not in runs[r]["member_val"]]
    if missing:
        raise SystemExit(f"bench/cv.py: fold {fold}'s runs did not train {', '.join(missing)}")
    key = (lambda r, m: m) if len(runs) == 1 else (lambda r, m: f"{r}:{m}")
    merged = {**first, "member_val": {key(r, m): runs[r]["member_val"][m] for r, m in picks}}
    seconds = sum(float(torch.load(fold_dir(args, r, fold) / f"member-{m}.pt", weights_only=False,
                                   map_location="cpu")["train_seconds"]) for r, m in picks)
    return weighted(merged, [(1 / len(picks), key(r, m)) for r, m in picks], fold, seconds)


def subset_picks(spec: str) -> list[tuple[str, str]]:
    """RECIPE:MEMBER,MEMBER,RECIPE2:MEMBER,... -> [(recipe, member)]: a member without a recipe takes the one
    before it."""
    picks, recipe = [], ""
    for item in spec.split(","):
        recipe, _, member = item.rpartition(":") if ":" in item else (recipe, "", item)
        picks.append((recipe, member))
    return picks


def fold_dir(args, recipe: str, fold: int) -> Path:
    return REPO / "runs" / args.name / recipe / f"fold{fold}"


def weighted(summary: dict, weights: list[tuple[float, str]], fold: int, train_seconds: float) -> dict:
    """The (weight, member name) ensemble of a fold run scored on its validation faces, and over the mirror."""
    answers = [(w, summary["member_val"][name]) for w, name in weights]
    result = score(summary, answers, mirror=False)
    result.update(fold=fold, train_seconds=train_seconds, mirror=None,
                  members={name: float((summary["member_val"][name]["probs"].argmax(1) == summary["val_targets"])
                                       .mean()) for _, name in weights})
    if all(a.get("mirrored_probs") is not None for _, a in answers):
        result["mirror"] = score(summary, answers, mirror=True)
    return result


def score(summary: dict, answers: list[tuple[float, dict]], mirror: bool) -> dict:
    """Accuracy, macro-F1 and age MAE, face by face too, of the weighted (weight, member answers) ensemble, each
    member averaged with its mirrored answers where `mirror`. The age is the graph's: the median of the mixed age
    distributions; for runs made before those were kept, the mixed members' ages (then means, and so exact)."""
    def view(a: dict, key: str) -> np.ndarray:
        return (a[key] + a[f"mirrored_{key}"]) / 2 if mirror else a[key]

    probs = sum(w * view(a, "probs") for w, a in answers)
    ages = mixed_ages(answers, mirror)
    if ages is None:
        ages = sum(w * view(a, "ages") for w, a in answers)
    targets, labels = summary["val_targets"], probs.argmax(1)
    age_errors = np.abs(ages - summary["val_true_ages"])
    return {"index": np.asarray(summary["val_index"]), "correct": labels == targets,
            "accuracy": float((labels == targets).mean()),
            "macro_f1": float(f1_score(targets, labels, average="macro")),
            "abs_age_error": age_errors, "age_mae_years": float(age_errors.mean())}


def mean_sd(values: list[float], scale: float = 100.0) -> tuple[float, float]:
    return scale * statistics.mean(values), scale * (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_se(differences: np.ndarray, scale: float = 100.0) -> tuple[float, float]:
    """The mean of paired differences (face by face) and its standard error, times `scale`."""
    d = scale * np.asarray(differences, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def by_face(folds: list[dict], key: str) -> np.ndarray:
    """A per-face array over every fold, ordered by the face's row in data.csv (so recipes pair by face)."""
    index = np.concatenate([f["index"] for f in folds])
    return np.concatenate([np.asarray(f[key], dtype=float) for f in folds])[np.argsort(index)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    parser.add_argument("--preset", default="face")
    parser.add_argument("--members", nargs="+", default=["face-age-frz"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--recipe", action="append", required=True, metavar="NAME=ARGS",
                        help="a recipe: its name and its extra agegroup-train arguments (the first is the baseline)")
    parser.add_argument("--subset", action="append", default=[], metavar="NAME=RECIPE:MEMBER,...",
                        help="also score these members of a recipe's fold runs, equal weights, nothing trained")
    parser.add_argument("--only-folds", type=int, nargs="+", metavar="K",
                        help="train and score only these folds (a sweep stopped early): every row on the same faces")
    parser.add_argument("--base", help="the row every other is paired with (default: the first recipe)")
    parser.add_argument("--name", default="cv", help="runs/<name>/ holds the runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "cv.json")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the recipes whose folds are all finished (a sweep still running)")
    args = parser.parse_args(argv)
    recipes = dict((name, shlex.split(extra)) for name, _, extra in (r.partition("=") for r in args.recipe))
    fold_ids = args.only_folds or list(range(args.folds))
    results = {name: [run_fold(args, name, extra, k) for k in fold_ids] for name, extra in recipes.items()}
    shown = {name: shlex.join(extra) for name, extra in recipes.items()}  # each row's args column
    for name, _, spec in (s.partition("=") for s in args.subset):
        picks = subset_picks(spec)
        if any(r not in recipes or not m for r, m in picks):
            parser.error(f"--subset {name}={spec}: give RECIPE:MEMBER,... with recipes among {', '.join(recipes)}")
        results[name] = [run_subset(args, picks, k) for k in fold_ids]
        shown[name] = "; ".join(f"{r}: {' '.join(m for rr, m in picks if rr == r)}"
                                for r in dict.fromkeys(r for r, _ in picks)) + ", equal weights"
        recipes[name] = [shown[name]]
    results = {name: folds for name, folds in results.items() if None not in folds}
    for name, folds in list(results.items()):  # each recipe's ensemble over the mirror too, where its runs kept it
        if all(f["mirror"] is not None for f in folds):
            results[f"{name} + mirror"] = [{**f, **f["mirror"]} for f in folds]
            recipes[f"{name} + mirror"], shown[f"{name} + mirror"] = recipes[name], shown[name]
    if not results:
        raise SystemExit("bench/cv.py: no recipe has all its folds finished yet")
    base_name = args.base or next(iter(results))
    if base_name not in results:
        raise SystemExit(f"bench/cv.py: --base {base_name} is not a recipe or subset with all its folds finished")
    base = results[base_name]
    scored = "" if len(fold_ids) == args.folds else f", scored on fold {', '.join(map(str, fold_ids))} only"
    report = {"members": args.members, "folds": args.folds, "preset": args.preset, "recipes": {}}
    if scored:
        report["scored_folds"] = fold_ids
    print(f"\n{args.folds}-fold cross-validation of {' '.join(args.members)} ({args.preset} preset{scored})\n")
    print("| recipe | args | accuracy by fold | accuracy | macro-F1 | age MAE (y) | vs " + base_name
          + ", by fold | vs " + base_name + ", by face | train min/fold |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, folds in results.items():
        acc, f1 = mean_sd([f["accuracy"] for f in folds]), mean_sd([f["macro_f1"] for f in folds])
        mae = mean_sd([f["age_mae_years"] for f in folds], 1.0)
        row = {"args": recipes[name], "accuracy_by_fold": [f["accuracy"] for f in folds], "accuracy": acc,
               "macro_f1": f1, "age_mae_years": mae, "train_minutes_per_fold":
               statistics.mean(f["train_seconds"] for f in folds) / 60,
               "members_by_fold": [f["members"] for f in folds]}
        if name != base_name:
            row["vs_base_by_fold"] = mean_sd([f["accuracy"] - b["accuracy"] for f, b in zip(folds, base)])
            diff = by_face(folds, "correct") - by_face(base, "correct")
            row["vs_base_by_face"] = mean_se(diff)
            age_diff = by_face(folds, "abs_age_error") - by_face(base, "abs_age_error")
            row["age_mae_vs_base_by_face"] = mean_se(age_diff, 1.0)
        report["recipes"][name] = row
        paired = (f"{row['vs_base_by_fold'][0]:+.2f} ± {row['vs_base_by_fold'][1]:.2f}",
                  f"{row['vs_base_by_face'][0]:+.2f} ± {row['vs_base_by_face'][1]:.2f} (SE)") \
            if name != base_name else ("", "")
        by_fold = ", ".join(f"{100 * f['accuracy']:.1f}" for f in folds)
        print(f"| {name} | {shown[name]} | {by_fold} | {acc[0]:.2f} ± {acc[1]:.2f} | "
              f"{f1[0]:.2f} ± {f1[1]:.2f} | {mae[0]:.2f} ± {mae[1]:.2f} | {paired[0]} | {paired[1]} | "
              f"{row['train_minutes_per_fold']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = json.loads(args.out.read_text()) if args.out.is_file() else {}
    # one entry per comparison: the same members and baseline with other recipes or subsets is another entry
    log[f"{' '.join(args.members)} / {args.folds} folds{scored} / {', '.join(recipes)} / against {base_name}"] = report
    args.out.write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
