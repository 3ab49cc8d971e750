"""Train the age-group CNN ensemble or the STL-10 MLP with one loop: train_one_epoch, evaluate, fit.

    agegroup-train age --preset cpu --data-dir ../shared/data/faces --out-dir runs/cpu
    agegroup-train stl10 --data-dir /path/to/stl10 --out-dir runs/stl10
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from tqdm import tqdm

from serving.cli import ArgumentParser, fail
from serving.table import read_face_table
from training.config import (
    AGE_GROUPS,
    AGE_PRESETS,
    AGES,
    COURSE_MEMBERS,
    STL10_CLASSES,
    STL10_PRESETS,
    AgeTrainConfig,
    Stl10TrainConfig,
    UnknownMember,
    add_config_arguments,
    config_from_args,
    member_by_name,
    to_jsonable,
)
from training.data import (
    AUGMENT_PRESETS,
    Batches,
    DataError,
    channel_stats,
    load_images,
    read_stl10,
    stratified_split,
    to_nchw,
    validation_split,
)
from training.models import Stl10MLP, age_distribution_loss, age_summary, build_member

TEMPLATE_FILE = "face_template.json"
CROP_SIDE = 200  # the data set's crops: the template is fitted on them at their own size
CALIBRATION_IMAGES = 1024  # training images that set a pretrained backbone's BatchNorm statistics


def train_one_epoch(model, batches, optimizer, scheduler, loss_fn, amp: bool = False, desc: str = "train") -> dict:
    """One pass over the training batches; each batch is (*model inputs, target). Returns mean loss and accuracy."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=None)  # silent when not a TTY
    for *inputs, target in bar:
        with torch.autocast(target.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(*inputs)
        loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(target)
        correct += (decode(model, logits.detach().float()).argmax(1) == class_of(target)).sum().item()
        seen += len(target)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"loss": total_loss / seen, "accuracy": correct / seen}


@torch.no_grad()
def evaluate(model, batches, loss_fn) -> dict:
    """Loss, accuracy, macro-F1 and the softmax probabilities (N, C) over the batches, in order; for an age
    model with [label, age] targets also each face's distribution over the ages 10-60 ("age_dists"), its median age
    ("ages") and their mean absolute error in years."""
    model.eval()
    probs, targets, dists, ages, true_ages, total_loss = [], [], [], [], [], 0.0
    for *inputs, target in batches:
        logits = model(*inputs).float()
        total_loss += loss_fn(logits, target).item() * len(target)
        probs.append(decode(model, logits).cpu())
        targets.append(class_of(target).cpu())
        if hasattr(model, "age_probs") and target.ndim == 2:
            dists.append(model.age_probs(logits).cpu())
            ages.append(age_summary(dists[-1])[0])
            true_ages.append(target[:, 1].cpu())
    probs, targets = torch.cat(probs).numpy(), torch.cat(targets).numpy()
    ages_mae = {}
    if ages:
        ages_mae = {"ages": torch.cat(ages).numpy(), "age_dists": torch.cat(dists).numpy(),
                    "age_mae_years": float((torch.cat(ages) - torch.cat(true_ages)).abs().mean())}
    return {"loss": total_loss / len(targets), **classification_metrics(probs, targets), **ages_mae,
            "probs": probs, "targets": targets}


def decode(model, logits: torch.Tensor) -> torch.Tensor:
    """A model's logits -> class probabilities (an age head's own decoding, else softmax)."""
    return model.decode(logits) if hasattr(model, "decode") else logits.softmax(1)


def class_of(target: torch.Tensor) -> torch.Tensor:
    """The class index of a batch's targets: (B,) labels, or column 0 of (B, 2) [label, age] face targets."""
    return target[:, 0] if target.ndim == 2 else target


def classification_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    """Accuracy, macro-F1 and mean absolute error in classes (groups are ordered) of the argmax of (N, C)."""
    pred = probs.argmax(1)
    return {"accuracy": float(accuracy_score(targets, pred)),
            "macro_f1": float(f1_score(targets, pred, average="macro", zero_division=0)),
            "mae": float(np.abs(pred - targets).mean())}


def fit(model, train_batches, val_batches, *, epochs: int, lr: float, weight_decay: float, loss_fn,
        checkpoint: Path, extra: dict, warmup_epochs: float = 0.0, lr_step: int = 0, patience: int = 0,
        amp: bool = False, name: str = "model", keep_last: bool = False) -> dict:
    """Train with AdamW and a warmup+cosine (or halving step) schedule; keep the best-on-validation weights
    (with `keep_last`: the last epoch's, and validate only after it, as a fold run must to stand in for a run
    on all of data.csv, which has no validation to choose by; with `val_batches` None: the last epoch's, never
    validated).

    Saves `checkpoint` (state_dict, `extra`, metrics, history) whenever validation accuracy improves and stops
    early after `patience` epochs without a lower validation loss. Returns the best epoch's metrics.
    """
    groups = model.parameter_groups(lr) if hasattr(model, "parameter_groups") else model.parameters()
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    steps_per_epoch, total = len(train_batches), epochs * len(train_batches)
    warmup = int(warmup_epochs * steps_per_epoch)
    if lr_step:
        schedule = lambda step: 0.5 ** (step // (lr_step * steps_per_epoch))  # noqa: E731
    else:
        schedule = lambda step: (step + 1) / warmup if step < warmup else 0.5 * (  # noqa: E731
            1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history, best, best_loss, stale, start = [], None, float("inf"), 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        train = train_one_epoch(model, train_batches, optimizer, scheduler, loss_fn, amp, f"{name} {epoch}/{epochs}")
        if val_batches is None or (keep_last and epoch < epochs):  # nothing validated (this epoch, or at all)
            history.append({"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
                            "lr": optimizer.param_groups[-1]["lr"], "seconds": time.perf_counter() - start})
            print(f"{name} epoch {epoch:3d}/{epochs}  train loss {train['loss']:.4f} acc {train['accuracy']:.4f}  "
                  f"[{history[-1]['seconds']:.0f}s]", flush=True)
            if epoch == epochs:  # without validation: the last epoch is what is kept
                best = history[-1]
                torch.save({"state_dict": model.state_dict(), **extra, "metrics": best, "history": history},
                           checkpoint)
            continue
        val = evaluate(model, val_batches, loss_fn)
        row = {"epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
               "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
               "lr": optimizer.param_groups[-1]["lr"], "seconds": time.perf_counter() - start}
        history.append(row)
        improved = best is None or val["accuracy"] > best["val_accuracy"]
        print(f"{name} epoch {epoch:3d}/{epochs}  train loss {train['loss']:.4f} acc {train['accuracy']:.4f}  "
              f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} f1 {val['macro_f1']:.4f}"
              f"{'  *best' if improved else ''}  [{row['seconds']:.0f}s]", flush=True)
        if improved:
            best = row
            torch.save({"state_dict": model.state_dict(), **extra, "metrics": best, "history": history}, checkpoint)
        stale = 0 if val["loss"] < best_loss else stale + 1
        best_loss = min(best_loss, val["loss"])
        if patience and stale >= patience:
            print(f"{name}: early stop after {epoch} epochs ({patience} without a lower val loss)", flush=True)
            break
    saved = torch.load(checkpoint, weights_only=False)
    model.load_state_dict(saved["state_dict"])
    saved.update(history=history, complete=True, train_seconds=time.perf_counter() - start)
    torch.save(saved, checkpoint)
    return best


def fit_ensemble_weights(member_probs: np.ndarray, targets: np.ndarray, steps: int = 300) -> np.ndarray:
    """Weights on the simplex minimising the NLL of the weighted average of (M, N, C) member probabilities."""
    probs, y = torch.from_numpy(member_probs).double(), torch.from_numpy(targets)
    logits = torch.zeros(len(probs), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        mixed = (logits.softmax(0).view(-1, 1, 1) * probs).sum(0)  # (N, C)
        loss = F.nll_loss(mixed.clamp_min(1e-12).log(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return logits.detach().softmax(0).numpy()


MIN_ENSEMBLE = 3  # pruning never leaves fewer members than this (where there are that many)


def prune_members(member_probs: np.ndarray, targets: np.ndarray, min_weight: float, cap: int):
    """Fit weights on (M, N, C) member probabilities, then leave out members under `min_weight` and past the
    `cap` largest, refitting on the rest until nothing changes. Returns (kept indices, their weights)."""
    keep = np.arange(len(member_probs))
    weights = fit_ensemble_weights(member_probs, targets)
    while True:
        order = np.argsort(-weights)
        kept = [k for k in order if weights[k] >= min_weight][:cap]
        if len(kept) < min(MIN_ENSEMBLE, cap, len(order)):
            kept = list(order[:min(MIN_ENSEMBLE, cap, len(order))])
        if len(kept) == len(keep):
            return keep, weights
        keep = keep[np.sort(kept)]
        weights = fit_ensemble_weights(member_probs[keep], targets)


def uniform_if_better(member_probs: np.ndarray, targets: np.ndarray, weights: np.ndarray):
    """Equal weights for the (M, N, C) members where they classify `targets` strictly better than the fitted
    `weights` do (which minimise log loss, not errors). Returns (weights, whether they are the equal ones)."""
    equal = np.full(len(weights), 1.0 / len(weights))
    errors = [(np.tensordot(w, member_probs, axes=1).argmax(1) != targets).sum() for w in (weights, equal)]
    return (equal, True) if errors[1] < errors[0] else (weights, False)


def make_loss(label_smoothing: float):
    """Cross-entropy with label smoothing on the class of the targets."""
    return lambda logits, y: F.cross_entropy(logits, class_of(y), label_smoothing=label_smoothing)


def make_member_loss(cfg: AgeTrainConfig, model):
    """The loss of one member: group cross-entropy, or for an age head the age-distribution loss.
    Targets are (B, 2) [label, age]."""
    if getattr(model, "target", "group") == "group":
        return make_loss(cfg.label_smoothing)
    return lambda logits, y: age_distribution_loss(logits, y[:, 1], cfg.age_sigma)


def pick_device(name: str) -> torch.device:
    """'auto' is CUDA when a GPU is visible, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def train_age_ensemble(cfg: AgeTrainConfig) -> dict:
    """Train every member, fit the ensemble weights on validation, save checkpoints, plots and a summary.

    With `val_fraction` 0 every face of data.csv is trained on and none validated: the members keep their last
    epoch, and the member choice, the weights and every validation figure of the summary come from the
    out-of-fold answers of the cross-validation runs under `oof_from` (out_of_fold_answers)."""
    from training.plots import plot_confusion, plot_curves

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, out = pick_device(cfg.device), Path(cfg.out_dir)
    table = read_face_table(Path(cfg.data_dir) / "data.csv", labels=len(AGE_GROUPS), limit=cfg.limit,
                            ages=(AGES[0], AGES[-1]))
    members = [member_by_name(n) for n in cfg.members] if cfg.members else list(COURSE_MEMBERS)
    all_data = cfg.val_fraction == 0 and cfg.folds <= 1
    data_sha256 = file_sha256(Path(cfg.data_dir) / "data.csv")
    if all_data:  # read before training, so that a sweep that does not fit fails now, not after the members
        out_of_fold, oof_sources = out_of_fold_answers(cfg, [m.name for m in members], len(table), data_sha256)
    elif cfg.oof_from:
        raise DataError("--oof-from is for a run on all of data.csv (--val-fraction 0); this run validates its own")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    images = load_images(table["path"].tolist(), cfg.input_size)  # (N, H, W, 3) uint8
    print(f"decoded {len(images)} images at {cfg.input_size}px in {time.perf_counter() - t0:.1f}s", flush=True)
    labels = table["Label"].to_numpy()
    train_idx, val_idx = validation_split(labels, cfg.val_fraction, cfg.split_seed, cfg.folds, cfg.fold)
    if cfg.train_fraction < 1:  # a stratified subsample of the training split; validation stays the same faces
        keep, _ = stratified_split(labels[train_idx], 1 - cfg.train_fraction, cfg.seed_offset)
        train_idx = train_idx[keep]
        print(f"training on {len(train_idx)} faces ({cfg.train_fraction:.0%} of the training split)", flush=True)
    mean, std = channel_stats(images[train_idx])
    targets = torch.tensor(np.stack([labels, table["Age"].to_numpy()], axis=1))  # (N, 2) [label, age]
    tensors = (to_nchw(images), torch.tensor(table["Gender"].to_numpy()),
               torch.tensor(table["Race"].to_numpy()), targets)
    tensors = tuple(t.to(device) for t in tensors)  # the whole data set fits on the device
    train_set = tuple(t[torch.from_numpy(train_idx).to(device)] for t in tensors)
    val_set = tuple(t[torch.from_numpy(val_idx).to(device)] for t in tensors)
    val_batches = None if all_data else Batches(val_set, 256, device=device)
    mirrored_batches = Batches(val_set, 256, augment=lambda x: x.flip(3), device=device)  # for flip averaging
    common = {"config": to_jsonable(cfg), "input_size": cfg.input_size, "mean": mean, "std": std,
              "data_sha256": data_sha256, "val_index": val_idx.tolist()}
    if all_data:
        common["out_of_fold"] = oof_sources
    results = []
    for member in members:
        checkpoint = out / f"member-{member.name}.pt"
        previous = torch.load(checkpoint, weights_only=False) if checkpoint.exists() else None
        reuse = bool(previous and previous.get("complete") and same_recipe(previous["config"], common["config"]))
        # pretrained weights only for a member that trains: a finished checkpoint replaces them anyway; its seed
        # sets its initialisation too (unseeded, the first member of a process started from a random state)
        torch.manual_seed(member.seed + cfg.seed_offset)
        model = build_member(member, cfg.input_size, mean, std, pretrained=not reuse)
        model = model.to(device, memory_format=torch.channels_last)
        loss_fn = make_member_loss(cfg, model)
        origin = starting_weights(member.arch)
        if reuse:
            print(f"{member.name}: reusing finished checkpoint {checkpoint}", flush=True)
            model.load_state_dict(previous["state_dict"])
        else:
            torch.manual_seed(member.seed + cfg.seed_offset)
            if member.arch in ("face", "lite"):  # pretrained: batch statistics from a sample of training images
                model.calibrate_batchnorm(train_set[0][torch.randperm(len(train_set[0]))[:CALIBRATION_IMAGES]])
            augment = AUGMENT_PRESETS["faces"]() if cfg.augment else None
            train_batches = Batches(train_set, cfg.batch_size, shuffle=True, augment=augment, device=device,
                                    seed=member.seed + cfg.seed_offset)
            fit(model, train_batches, val_batches, epochs=member.epochs or cfg.epochs, lr=cfg.lr,
                weight_decay=cfg.weight_decay, loss_fn=loss_fn, checkpoint=checkpoint,
                extra={**common, "member": asdict(member), "starting_weights": origin},
                warmup_epochs=cfg.warmup_epochs, patience=cfg.patience, amp=cfg.amp and device.type == "cuda",
                name=member.name, keep_last=cfg.keep_last)
            previous = torch.load(checkpoint, weights_only=False)
        plot_curves(previous["history"], out / f"curves-{member.name}.png", member.name)
        if all_data:  # its answers on faces it never saw: its fold runs'
            answers = out_of_fold[member.name]
            val = {**classification_metrics(answers["probs"], labels), "probs": answers["probs"],
                   "targets": labels, "ages": answers["ages"], "age_dists": answers["age_dists"],
                   "age_mae_years": None if answers["ages"] is None
                   else float(np.abs(answers["ages"] - table["Age"].to_numpy()).mean())}
            mirrored = {"probs": answers["mirrored_probs"], "ages": answers["mirrored_ages"],
                        "age_dists": answers["mirrored_age_dists"]}
        else:
            val = evaluate(model, val_batches, loss_fn)
            mirrored = evaluate(model, mirrored_batches, loss_fn)
        plot_confusion(val["targets"], val["probs"].argmax(1), AGE_GROUPS, out / f"confusion-{member.name}.png",
                       f"{member.name}: val accuracy {val['accuracy']:.3f}")
        results.append({"name": member.name, "member": asdict(member), "checkpoint": checkpoint.name,
                        "starting_weights": origin,
                        "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
                        "val_age_mae_years": val.get("age_mae_years"), "val_ages": val.get("ages"),
                        "val_age_dists": val.get("age_dists"), "mirrored_age_dists": mirrored.get("age_dists"),
                        "train_seconds": previous["train_seconds"], "probs": val["probs"],
                        "mirrored_probs": mirrored["probs"], "mirrored_ages": mirrored.get("ages")})
    # the faces the weights are fitted on and the figures measured on: validation, or out of fold on all faces
    targets, true_ages = (labels.copy(), table["Age"].to_numpy().copy()) if all_data else (
        class_of(val_set[-1]).cpu().numpy(), val_set[-1][:, 1].cpu().numpy())
    plain = np.stack([r.pop("probs") for r in results])  # (M, N, 5)
    # every trained member's validation answers, kept or not (ensemble.pt only): bench/cv.py pairs them by face
    # (and their answers on the mirrored images, which a run on all faces takes from its fold runs)
    member_val = {r["name"]: {"probs": p, "ages": r.pop("val_ages"), "mirrored_probs": r.pop("mirrored_probs"),
                              "mirrored_ages": r.pop("mirrored_ages"), "age_dists": r.pop("val_age_dists"),
                              "mirrored_age_dists": r.pop("mirrored_age_dists")} for r, p in zip(results, plain)}
    mirrored = [v["mirrored_probs"] for v in member_val.values()]
    # fold runs made before they kept mirrored answers: a run on all faces from them is fitted without the flip
    flip_averaged = None if any(m is None for m in mirrored) else 0.5 * (plain + np.stack(mirrored))
    candidates = {}
    for tta_flip, member_probs in ((False, plain), (True, flip_averaged)):
        if member_probs is None:
            continue
        passes = cfg.max_passes // (2 if tta_flip else 1)  # one pass a member, two with the mirror
        cap = min(cfg.max_members or len(results), passes or len(results))
        if cap < min(MIN_ENSEMBLE, len(results)):
            continue  # the budget leaves too few members for an ensemble with this option
        keep, weights = prune_members(member_probs, targets, cfg.min_member_weight, cap)
        probs = np.tensordot(weights, member_probs[keep], axes=1)  # (N, 5)
        candidates[tta_flip] = {"weights": weights, "keep": keep, "probs": probs, **ensemble_metrics(probs, targets)}
    # the mirror only where it classifies better (and the budget allows it)
    tta_flip = True in candidates and candidates[True]["accuracy"] > candidates[False]["accuracy"]
    weights, fitted_probs, keep = (candidates[tta_flip][k] for k in ("weights", "probs", "keep"))
    fitted, without_flip, with_flip = ({k: candidates[f][k] for k in ("accuracy", "macro_f1", "mae", "log_loss")}
                                       if f in candidates else None for f in (tta_flip, False, True))
    # the fit minimises log loss, not errors: equal weights where they classify these faces better
    chosen_members = (flip_averaged if tta_flip else plain)[keep]
    weights, uniform_weights = uniform_if_better(chosen_members, targets, weights)
    if uniform_weights:
        fitted_probs = chosen_members.mean(0)
        fitted = ensemble_metrics(fitted_probs, targets)
    plain = plain[keep]
    dropped = [{"name": r["name"], "val_accuracy": r["val_accuracy"]} for i, r in enumerate(results) if i not in keep]
    train_seconds = sum(r["train_seconds"] for r in results)  # every member trained, kept or not
    if dropped:
        print("left out of the ensemble (weight under the floor, or past the budget of passes): "
              + ", ".join(d["name"] for d in dropped), flush=True)
    results = [results[i] for i in keep]
    uniform = classification_metrics(plain.mean(0), targets)
    for r, w in zip(results, weights):
        r["weight"] = float(w)
    plot_confusion(targets, fitted_probs.argmax(1), AGE_GROUPS, out / "confusion-ensemble.png",
                   f"ensemble: val accuracy {fitted['accuracy']:.3f}")
    ensemble_ages = mixed_ages([(w, member_val[r["name"]]) for r, w in zip(results, weights)
                                if r["member"]["target"] == "age"], tta_flip)
    if ensemble_ages is not None:
        fitted["age_mae_years"] = float(np.abs(ensemble_ages - true_ages).mean())
    summary = {**common, "members": results, "dropped_members": dropped, "ensemble": fitted, "uniform": uniform,
               "tta_flip": bool(tta_flip), "weights": "uniform" if uniform_weights else "fitted",
               "fitted_without_flip": without_flip, "fitted_with_flip": with_flip,
               "train_seconds": train_seconds, "preset": cfg.preset,
               "epochs": cfg.epochs}
    torch.save({**summary, "member_val": member_val, "val_targets": targets, "val_true_ages": true_ages},
               out / "ensemble.pt")
    if cfg.face_template:
        write_face_template(table["path"].iloc[train_idx].tolist(), out)
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "val_index"}, indent=2))
    if all_data:
        print(f"trained on all {len(labels)} faces; the figures below are out of fold, from "
              f"{len(oof_sources)} cross-validation runs in {', '.join(cfg.oof_from)}", flush=True)
    print_summary(results, uniform, without_flip, with_flip, tta_flip, uniform_weights)
    return summary


@functools.lru_cache(maxsize=None)  # hashes a 22 MB file: once per run, not once per member
def starting_weights(arch: str) -> dict:
    """Where a member's weights start: dlib's file for "face", EfficientNet-Lite0's for "lite" (name, sha256,
    license), else random init."""
    if arch == "face":
        from training.dlib_weights import find_weights_file, provenance

        return provenance(find_weights_file())
    if arch == "lite":
        from training.lite_weights import find_lite_file, lite_provenance

        return lite_provenance(find_lite_file())
    return {"name": "random initialisation"}


def write_face_template(paths: list[str], out_dir: Path) -> dict:
    """Fit the face template (mean landmarks of the training crops, serving/face.py) and write it to
    out_dir/face_template.json, where agegroup-export finds it. Also says how many crops had a face found."""
    from serving.face import FaceFinder, fit_template

    t0 = time.perf_counter()
    template = fit_template(FaceFinder(), list(load_images(paths, CROP_SIDE)))
    (Path(out_dir) / TEMPLATE_FILE).write_text(json.dumps(template, indent=2) + "\n")
    print(f"face template: landmarks found on {template['faces_found']}/{template['images']} training crops "
          f"in {time.perf_counter() - t0:.0f}s -> {Path(out_dir) / TEMPLATE_FILE}", flush=True)
    return template


def same_recipe(a: dict, b: dict, also_ignored: tuple[str, ...] = ()) -> bool:
    """Two configs train identical members (which members, threads, device and folders aside, where a run on
    all faces takes its figures from, and the settings in `also_ignored`); a setting one of them predates counts
    at its default, and a setting this code no longer has (a lever tried and taken out) only where it was on."""
    ignored = {"members", "threads", "device", "out_dir", "data_dir", "preset", "min_member_weight", "max_passes",
               "max_members", "face_template", "oof_from", *also_ignored}
    defaults = to_jsonable(AgeTrainConfig())

    def on(value) -> bool:  # a removed lever's value: 0, False, None or all zeros ([0.0, 0.0]) is off
        return any(map(bool, value)) if isinstance(value, (list, tuple)) else bool(value)

    def trained_by(config: dict) -> dict:
        return {k: v for k, v in {**defaults, **config}.items() if k not in ignored and (k in defaults or on(v))}

    return trained_by(a) == trained_by(b)


SPLIT_SETTINGS = ("val_fraction", "folds", "fold", "keep_last")  # where a run validates, not how it trains


# what a fold run keeps of each member, face by face (ensemble.pt "member_val"), and a run on all faces reads
ANSWER_KEYS = ("probs", "ages", "mirrored_probs", "mirrored_ages", "age_dists", "mirrored_age_dists")


def out_of_fold_answers(cfg: AgeTrainConfig, names: list[str], faces: int, data_sha256: str) -> tuple[dict, list]:
    """Each member's answers on every face of data.csv from the cross-validation runs that never trained on it:
    the fold runs (fold*/ensemble.pt) in the folders of `cfg.oof_from`, trained on the same data.csv by the same
    recipe as `cfg` (its split settings aside), each keeping its last epoch as a run on all faces does.
    Returns ({name: {"probs": (N, 5), "ages": (N,), "mirrored_probs": (N, 5), "mirrored_ages": (N,), "age_dists":
    (N, 51), "mirrored_age_dists": (N, 51)}} in data.csv's row order, each None where a fold run lacks it (ages: a
    group member; mirrored: a run made before they were kept; age_dists: one made before they were), and the runs
    read)."""
    if not cfg.oof_from:
        raise DataError("a run on all of data.csv (--val-fraction 0) has no validation faces: give --oof-from the "
                        "cross-validation sweeps of its recipe (bench/cv.py ... --recipe NAME=--keep-last) whose "
                        "out-of-fold answers choose its members and weights")
    found, sources = {}, []
    for sweep in map(Path, cfg.oof_from):
        runs = sorted(sweep.glob("fold*/ensemble.pt"))
        if not runs:
            raise DataError(f"{sweep}: no fold*/ensemble.pt in it (a bench/cv.py recipe folder, runs/<name>/<recipe>)")
        for path in runs:
            run = torch.load(path, weights_only=False)
            config = run["config"]
            problem = ("was trained on another data.csv" if run["data_sha256"] != data_sha256
                       else "is not a cross-validation run" if config.get("folds", 0) <= 1
                       else "chose its epoch on validation (train it with --keep-last)" if not config.get("keep_last")
                       else "trained another recipe" if not same_recipe(config, to_jsonable(cfg), SPLIT_SETTINGS)
                       else None)
            if problem:
                raise DataError(f"{path.parent} {problem}: its answers cannot stand in for this run's")
            for name in set(names) & set(run["member_val"]):
                found.setdefault(name, []).append((np.asarray(run["val_index"]), run["member_val"][name]))
            sources.append({"run": str(path.parent), "folds": config["folds"], "fold": config["fold"],
                            "members": sorted(run["member_val"]), "train_seconds": float(run["train_seconds"])})
    answers = {}
    for name in names:
        parts = found.get(name, [])
        index = np.concatenate([i for i, _ in parts]) if parts else np.arange(0)
        if not np.array_equal(np.sort(index), np.arange(faces)):
            raise DataError(f"{name}: its fold runs in {', '.join(cfg.oof_from)} do not validate every face of "
                            f"data.csv exactly once ({len(parts)} runs, {len(index)} answers for {faces} faces)")
        order = np.argsort(index)
        answers[name] = {}
        for key in ANSWER_KEYS:  # None where a fold run lacks them
            values = [a.get(key) for _, a in parts]
            answers[name][key] = None if any(v is None for v in values) else np.concatenate(values)[order]
    return answers, sources


def mixed_ages(answers: list[tuple[float, dict]], mirror: bool) -> np.ndarray | None:
    """The graph's age from members' answers [(weight, {"age_dists": (N, 51), "mirrored_age_dists": ...})]: the
    median of their distributions mixed with the weights renormalised among them (each averaged with its mirror's
    when `mirror`); None without members or where an answer lacks its distributions (runs made before they were
    kept)."""
    views = ("age_dists", "mirrored_age_dists") if mirror else ("age_dists",)
    if not answers or any(a.get(view) is None for _, a in answers for view in views):
        return None
    total = sum(w for w, _ in answers)
    mix = sum(w / total * np.mean([a[view] for view in views], axis=0) for w, a in answers)
    return age_summary(torch.from_numpy(np.asarray(mix, dtype=np.float32)))[0].numpy()


def print_summary(results: list[dict], uniform: dict, without_flip: dict, with_flip: dict | None,
                  tta_flip: bool, uniform_weights: bool) -> None:
    rows = [(r["name"], f"{r['weight']:.3f}", r["val_accuracy"], r["val_macro_f1"]) for r in results]
    rows += [("ensemble, uniform", "", uniform["accuracy"], uniform["macro_f1"]),
             ("ensemble, fitted", "", without_flip["accuracy"], without_flip["macro_f1"])]
    if with_flip is not None:  # None where the budget of passes leaves too few members to mirror, or no
        # mirrored answers were kept (fold runs made before they were)
        rows.append(("ensemble, fitted + flip", "", with_flip["accuracy"], with_flip["macro_f1"]))
    print(f"\n{'model':<26}{'weight':>8}{'val acc':>9}{'val F1':>8}")
    for name, weight, acc, f1 in rows:
        print(f"{name:<26}{weight:>8}{acc:>9.4f}{f1:>8.4f}")
    flip = ("not tried: budget of passes or no mirrored answers" if with_flip is None
            else "raises validation accuracy" if tta_flip else "does not raise validation accuracy")
    print(f"shipped ensemble: {'uniform' if uniform_weights else 'fitted'} weights{' + flip' if tta_flip else ''} "
          f"(flip test-time averaging {flip}; "
          f"equal weights {'classify' if uniform_weights else 'do not classify'} it better than fitted ones)",
          flush=True)


def log_loss(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())


def ensemble_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    """An ensemble's log loss beside its accuracy, macro-F1 and MAE in groups on `targets`."""
    return {"log_loss": log_loss(probs, targets), **classification_metrics(probs, targets)}


def train_stl10(cfg: Stl10TrainConfig) -> dict:
    """Train the STL-10 MLP on the official training split with a stratified validation hold-out."""
    from training.plots import plot_confusion, plot_curves

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, out = pick_device(cfg.device), Path(cfg.out_dir)
    images, labels = read_stl10(cfg.data_dir, "train")
    if cfg.limit:
        images, labels = images[:cfg.limit], labels[:cfg.limit]
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
    mean, std = channel_stats(images[train_idx])
    tensors = tuple(t.to(device) for t in (to_nchw(images), torch.from_numpy(labels)))
    train_set = tuple(t[torch.from_numpy(train_idx).to(device)] for t in tensors)
    val_set = tuple(t[torch.from_numpy(val_idx).to(device)] for t in tensors)
    out.mkdir(parents=True, exist_ok=True)
    model = Stl10MLP(cfg.hidden, cfg.dropout, len(STL10_CLASSES), mean=mean, std=std).to(device)
    augment = AUGMENT_PRESETS["stl10"]() if cfg.augment else None
    loss_fn = make_loss(cfg.label_smoothing)
    checkpoint = out / "stl10_mlp.pt"
    extra = {"config": to_jsonable(cfg), "input_size": 96, "mean": mean, "std": std,
             "hidden": list(cfg.hidden), "dropout": cfg.dropout}
    best = fit(model, Batches(train_set, cfg.batch_size, shuffle=True, augment=augment, device=device),
               Batches(val_set, 512, device=device), epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
               loss_fn=loss_fn, checkpoint=checkpoint, extra=extra, lr_step=cfg.lr_step, patience=cfg.patience,
               name="stl10-mlp")
    val = evaluate(model, Batches(val_set, 512, device=device), loss_fn)
    saved = torch.load(checkpoint, weights_only=False)
    plot_curves(saved["history"], out / "curves-stl10_mlp.png", "stl10 mlp")
    plot_confusion(val["targets"], val["probs"].argmax(1), STL10_CLASSES, out / "confusion-stl10_mlp.png",
                   f"stl10 mlp: val accuracy {val['accuracy']:.3f}")
    print(f"stl10 mlp: best epoch {best['epoch']} val accuracy {val['accuracy']:.4f} "
          f"macro-F1 {val['macro_f1']:.4f}", flush=True)
    return {"val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"], "checkpoint": str(checkpoint)}


def fit_run_template(data_dir: Path, out_dir: Path) -> dict:
    """The template of a finished run, from the same training split (the split settings of its summary)."""
    summary_path = Path(out_dir) / "ensemble.pt"
    if not summary_path.is_file():
        raise DataError(f"{summary_path} not found: train first (agegroup-train age --out-dir {out_dir})")
    config = torch.load(summary_path, weights_only=False)["config"]
    table = read_face_table(Path(data_dir) / "data.csv", labels=len(AGE_GROUPS), limit=config["limit"],
                            ages=(AGES[0], AGES[-1]))
    train_idx, _ = validation_split(table["Label"].to_numpy(), config["val_fraction"], config["split_seed"],
                                    config.get("folds", 0), config.get("fold", 0))
    return write_face_template(table["path"].iloc[train_idx].tolist(), out_dir)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="agegroup-train", description=__doc__.split("\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True, parser_class=ArgumentParser)
    age = tasks.add_parser("age", help="train the age-group CNN ensemble on a faces folder")
    add_config_arguments(age, AgeTrainConfig, AGE_PRESETS)
    template = tasks.add_parser("template", help="fit only the face template of a run (training does it too)")
    template.add_argument("--data-dir", type=Path, default=AgeTrainConfig.data_dir, help="folder with data.csv")
    template.add_argument("--out-dir", type=Path, required=True, help="the run folder to write it to")
    stl = tasks.add_parser("stl10", help="train the STL-10 MLP on an stl10_binary folder")
    add_config_arguments(stl, Stl10TrainConfig, STL10_PRESETS)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.task == "age":
            cfg = config_from_args(args, AgeTrainConfig, AGE_PRESETS)
            for name in cfg.members:
                member_by_name(name)
            train_age_ensemble(cfg)
        elif args.task == "template":
            fit_run_template(args.data_dir, args.out_dir)
        else:
            train_stl10(config_from_args(args, Stl10TrainConfig, STL10_PRESETS))
    except (DataError, UnknownMember) as exc:
        fail("agegroup-train", str(exc), 2)


if __name__ == "__main__":
    main()
