import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from training.config import AGES
from training.data import BatchAugment, Batches, stratified_split, to_nchw, validation_split
from training.models import build_member
from training.train import evaluate, fit_ensemble_weights, make_loss, train_one_epoch


def learnable_batch(n=64, size=32, seed=0):
    """Images whose brightness encodes the label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (n,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 50 + torch.randint(0, 30, (n, 3, size, size), generator=g)).to(torch.uint8)
    return images, torch.randint(0, 2, (n,), generator=g), torch.randint(0, 5, (n,), generator=g), labels


def test_tiny_training_changes_weights_and_lowers_loss():
    torch.manual_seed(0)
    data = learnable_batch()
    model = build_member("nodrop", 32)
    before = [p.detach().clone() for p in model.parameters()]
    batches = Batches(data, 16, shuffle=True)
    loss_fn = make_loss(0.0)
    first = evaluate(model, Batches(data, 64), loss_fn)["loss"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(8):
        train_one_epoch(model, batches, optimizer, scheduler, loss_fn)
    after = evaluate(model, Batches(data, 64), loss_fn)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert after["loss"] < first * 0.8, (first, after["loss"])


def test_the_ensembles_age_is_the_median_of_its_members_mixed_distributions():
    from training.train import mixed_ages

    a, b = np.zeros((2, len(AGES))), np.zeros((2, len(AGES)))
    a[:, AGES.index(20)] = 1.0  # member a: 20 for both faces
    b[0, AGES.index(40)], b[1, AGES.index(30)], b[1, AGES.index(50)] = 1.0, 0.5, 0.5
    member = lambda d: {"age_dists": d, "mirrored_age_dists": np.roll(d, 1, axis=1)}  # noqa: E731 (mirror: +1 y)
    # weights 3 and 1, renormalised: face 0 mixes 0.75 on 20, 0.25 on 40 -> 20; face 1 likewise -> 20
    np.testing.assert_array_equal(mixed_ages([(3.0, member(a)), (1.0, member(b))], mirror=False), [20, 20])
    # weights 1 and 3: face 0 -> 40 (the mean would be 35); face 1: 0.25 on 20, 0.375 on 30 and on 50 -> 30
    np.testing.assert_array_equal(mixed_ages([(1.0, member(a)), (3.0, member(b))], mirror=False), [40, 30])
    # over the image and its mirror, each member's two distributions averaged first: face 0 0.125 on 20 and 21,
    # 0.375 on 40 and 41 -> 40; face 1 0.125 on 20 and 21, 0.1875 on 30, 31, 50 and 51 -> 31
    np.testing.assert_array_equal(mixed_ages([(1.0, member(a)), (3.0, member(b))], mirror=True), [40, 31])
    assert mixed_ages([(1.0, {"age_dists": None})], mirror=False) is None  # runs made before they were kept
    assert mixed_ages([(1.0, member(a))], mirror=True) is not None and mixed_ages([], mirror=False) is None


def test_ensemble_weights_favour_the_better_member():
    targets = np.arange(200) % 5
    good = np.eye(5)[targets] * 0.8 + 0.04
    bad = np.full((200, 5), 0.2)
    weights = fit_ensemble_weights(np.stack([bad, good]), targets)
    assert abs(weights.sum() - 1) < 1e-9
    assert weights[1] > 0.9


def test_split_is_stratified_and_fixed():
    labels = np.repeat(np.arange(5), 40)
    train, val = stratified_split(labels, 0.15, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 200
    assert np.bincount(labels[val]).tolist() == [6] * 5
    assert np.array_equal(val, stratified_split(labels, 0.15, seed=0)[1])


def test_folds_are_stratified_disjoint_and_cover_every_face_once():
    labels = np.repeat(np.arange(5), 30)
    folds = [validation_split(labels, 0.12, seed=0, folds=3, fold=k) for k in range(3)]
    validated = np.concatenate([val for _, val in folds])
    assert sorted(validated.tolist()) == list(range(150))  # each face validated exactly once
    for train, val in folds:
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 150
        assert np.bincount(labels[val]).tolist() == [10] * 5
    assert np.array_equal(folds[1][1], validation_split(labels, 0.12, seed=0, folds=3, fold=1)[1])
    assert np.array_equal(validation_split(labels, 0.12, 0)[1], stratified_split(labels, 0.12, 0)[1])  # no folds
    with pytest.raises(ValueError, match="fold must be 0-2"):
        validation_split(labels, 0.12, 0, folds=3, fold=3)
    train, val = validation_split(labels, 0.0, 0)  # no hold-out: a run on all of data.csv
    assert train.tolist() == list(range(150)) and len(val) == 0


def test_a_models_held_out_faces_follow_its_json_and_a_model_on_all_faces_has_none():
    from training.data import DataError, held_out_faces

    labels = np.repeat(np.arange(5), 30)
    split = {"fraction": 0.12, "seed": 0, "size": 20, "folds": 3, "fold": 2}
    assert np.array_equal(held_out_faces(split, labels), validation_split(labels, 0.12, 0, 3, 2)[1])
    assert np.array_equal(held_out_faces({"fraction": 0.2, "seed": 1, "size": 30}, labels),
                          stratified_split(labels, 0.2, 1)[1])
    with pytest.raises(DataError, match="all of data.csv"):
        held_out_faces({"fraction": 0.0, "seed": 0, "size": 0, "out_of_fold": {}}, labels)


def test_augmentation_keeps_shape_and_changes_pixels_only_when_asked():
    images = to_nchw(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)).float()
    torch.manual_seed(0)
    out = BatchAugment(flip=True, degrees=10, shift=0.05)(images)
    assert out.shape == images.shape and not torch.allclose(out, images)
    plain = next(iter(Batches((images.to(torch.uint8), torch.zeros(4)), 4)))[0]
    assert torch.equal(plain, images)  # no augmentation at evaluation time


def test_training_run_writes_checkpoints_plots_and_ensemble(tiny_run):
    saved = torch.load(tiny_run / "ensemble.pt", weights_only=False)
    assert [m["name"] for m in saved["members"]] == ["nodrop", "vgg-age", "res-group"]
    assert abs(sum(m["weight"] for m in saved["members"]) - 1) < 1e-6
    for name in ("member-nodrop.pt", "curves-nodrop.png", "confusion-nodrop.png", "confusion-ensemble.png"):
        assert (tiny_run / name).stat().st_size > 0
    member = torch.load(tiny_run / "member-nodrop.pt", weights_only=False)
    assert member["config"]["input_size"] == 32 and member["complete"] and len(member["history"]) == 2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "training.train", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_rejects_bad_arguments_with_one_line():
    for args in (["age", "--epochs", "many"], ["age", "--preset", "nope"], ["bogus"]):
        result = run_cli(*args)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "error" in result.stderr


def test_cli_help_lists_every_flag():
    result = run_cli("age", "--help")
    assert result.returncode == 0
    for flag in ("--input-size", "--epochs", "--label-smoothing", "--age-sigma", "--members", "--val-fraction"):
        assert flag in result.stdout


def test_cli_missing_columns_and_unreadable_images(tmp_path, face_dir):
    table = pd.read_csv(face_dir / "data.csv")
    broken = tmp_path / "nolabel"
    broken.mkdir()
    table.drop(columns=["Label"]).to_csv(broken / "data.csv", index=False)
    result = run_cli("age", "--preset", "tiny", "--data-dir", str(broken), "--out-dir", str(tmp_path / "o1"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "missing column(s) Label" in result.stderr

    unreadable = tmp_path / "unreadable"
    (unreadable / "images").mkdir(parents=True)
    (unreadable / "images" / "bad.jpg").write_bytes(b"not a jpeg")
    table.head(1).assign(Image="images/bad.jpg").to_csv(unreadable / "data.csv", index=False)
    result = run_cli("age", "--preset", "tiny", "--data-dir", str(unreadable), "--out-dir", str(tmp_path / "o2"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "bad.jpg" in result.stderr and "not an image" in result.stderr


def test_age_member_learns_from_exact_ages(tmp_path):
    from training.config import AgeTrainConfig
    from training.train import fit, make_member_loss

    torch.manual_seed(0)
    images, gender, race, labels = learnable_batch(96)
    targets = torch.stack([labels, 15 + 10 * labels], dim=1)  # (N, 2) [label, age]
    model = build_member("vgg-age", 32)
    loss_fn = make_member_loss(AgeTrainConfig(age_sigma=2.0), model)
    batches = Batches((images, gender, race, targets), 16, shuffle=True)
    first = evaluate(model, Batches((images, gender, race, targets), 96), loss_fn)
    best = fit(model, batches, Batches((images, gender, race, targets), 96), epochs=6, lr=3e-3, weight_decay=0.0,
               loss_fn=loss_fn, checkpoint=tmp_path / "m.pt", extra={}, name="age")
    after = evaluate(model, Batches((images, gender, race, targets), 96), loss_fn)
    assert after["loss"] < first["loss"] and best["val_accuracy"] == after["accuracy"]
    assert after["probs"].shape == (96, 5) and set(after) >= {"accuracy", "macro_f1", "mae"}
    median_ages = after["ages"]  # the age head's median age of each face, and its error in years
    assert median_ages.shape == (96,) and ((10 <= median_ages) & (median_ages <= 60)).all()
    assert abs(after["age_mae_years"] - np.abs(median_ages - targets[:, 1].numpy()).mean()) < 1e-4


def test_presets_name_existing_members():
    from training.config import AGE_PRESETS, COURSE_MEMBERS, member_by_name

    for name, preset in AGE_PRESETS.items():
        for member in preset.get("members", ()):
            member_by_name(member)
    assert AGE_PRESETS["course"]["members"] == tuple(m.name for m in COURSE_MEMBERS)
    assert len(AGE_PRESETS["cpu"]["members"]) >= 3


def test_pruning_leaves_out_members_under_the_floor_and_past_the_budget():
    import numpy as np

    from training.train import prune_members

    rng = np.random.default_rng(0)
    targets = rng.integers(0, 5, 300)
    good = np.eye(5)[targets] * 0.6 + 0.08  # (N, 5), right 68 % of the mass
    noise = rng.dirichlet(np.ones(5), (4, 300))  # four members that know nothing
    members = np.concatenate([good[None], 0.5 * good[None] + 0.5 * noise[:1], noise])  # (6, N, 5)
    keep, weights = prune_members(members, targets, min_weight=0.05, cap=6)
    assert 0 in keep and len(keep) >= 3 and abs(weights.sum() - 1) < 1e-6  # never fewer than three
    assert weights[list(keep).index(0)] == weights.max()
    keep, weights = prune_members(members, targets, min_weight=0.0, cap=2)
    assert len(keep) == 2 and 0 in keep  # the budget wins over the minimum of three


def test_equal_weights_replace_fitted_ones_only_where_they_make_fewer_errors():
    import numpy as np

    from training.train import uniform_if_better

    targets = np.array([0, 1, 2])
    sure = np.eye(5)[[0, 1, 3]] * 0.9 + 0.02  # right on the first two faces
    torn = np.eye(5)[[1, 2, 2]] * 0.5 + 0.1  # right on the third only
    members = np.stack([sure, torn])
    weights, equal = uniform_if_better(members, targets, np.array([0.8, 0.2]))  # 2 of 3 right
    assert not equal and weights.tolist() == [0.8, 0.2]  # equal weights: the same 2 of 3, not better
    weights, equal = uniform_if_better(members, targets, np.array([0.1, 0.9]))  # 1 of 3 right
    assert equal and weights.tolist() == [0.5, 0.5]


def test_a_member_with_its_own_size_and_epochs_trains_and_exports(face_dir, tmp_path, monkeypatch):
    """A run at 32 px with a member that sees 24 px and trains 3 epochs (as a from-scratch member beside
    fine-tuned ones does): its checkpoint holds 3 epochs, the others the run's 2, and the graph passes parity."""
    import json

    from training import config
    from training.config import AGE_PRESETS, AgeTrainConfig, MemberConfig
    from training.export import export_age_ensemble, load_age_ensemble
    from training.train import train_age_ensemble

    own = MemberConfig("own-size", seed=5, arch="resnet", target="age", input_size=24, epochs=3)
    monkeypatch.setattr(config, "DEFAULT_MEMBERS", config.DEFAULT_MEMBERS + (own,))
    cfg = AgeTrainConfig(**AGE_PRESETS["tiny"], preset="tiny", data_dir=face_dir, out_dir=tmp_path / "run",
                         members=("nodrop", "vgg-age", "own-size"), val_fraction=0.25, min_member_weight=0.0)
    train_age_ensemble(cfg)
    epochs = {name: len(torch.load(tmp_path / "run" / f"member-{name}.pt", weights_only=False)["history"])
              for name in ("nodrop", "own-size")}
    assert epochs == {"nodrop": 2, "own-size": 3}
    ensemble, summary = load_age_ensemble(tmp_path / "run")
    sizes = {entry["name"]: m.input_size for entry, m in zip(summary["members"], ensemble.members)}
    assert sizes == {"nodrop": 32, "vgg-age": 32, "own-size": 24}
    export_age_ensemble(tmp_path / "run", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "age_ensemble.json").read_text())
    assert meta["input_size"] == [32, 32]
    assert {m["name"]: m["input_size"] for m in meta["members"]} == sizes
    assert all(r["max_abs_diff"] <= 1e-4 for r in meta["parity"].values())


def test_a_cross_validation_fold_validates_its_fold_and_keeps_answers_by_face(face_dir, tmp_path):
    from training.config import AGE_PRESETS, AgeTrainConfig
    from training.data import validation_split
    from training.train import same_recipe, to_jsonable, train_age_ensemble

    torch.set_num_threads(2)
    cfg = AgeTrainConfig(**{**AGE_PRESETS["tiny"], "epochs": 2}, preset="tiny", data_dir=face_dir,
                         out_dir=tmp_path, members=("vgg-age", "res-group"), folds=2, fold=1, face_template=False,
                         keep_last=True)
    train_age_ensemble(cfg)
    # the last epoch is kept, and validated alone
    history = torch.load(tmp_path / "member-vgg-age.pt", weights_only=False)["history"]
    assert [row["epoch"] for row in history] == [1, 2] and "val_accuracy" not in history[0]
    assert torch.load(tmp_path / "member-vgg-age.pt", weights_only=False)["metrics"]["epoch"] == 2
    saved = torch.load(tmp_path / "ensemble.pt", weights_only=False)
    labels = pd.read_csv(face_dir / "data.csv")["Label"].to_numpy()
    assert saved["val_index"] == validation_split(labels, 0.12, 0, folds=2, fold=1)[1].tolist()
    assert len(saved["val_index"]) == len(labels) // 2
    assert set(saved["member_val"]) == {"vgg-age", "res-group"}
    for answers in saved["member_val"].values():
        assert answers["probs"].shape == (len(labels) // 2, 5) and answers["ages"].shape == (len(labels) // 2,)
    assert saved["ensemble"]["age_mae_years"] >= 0 and len(saved["val_true_ages"]) == len(labels) // 2
    assert not (tmp_path / "face_template.json").exists()  # skipped when asked
    # a checkpoint written before a setting existed is the same recipe when the setting is at its default
    old = {k: v for k, v in to_jsonable(AgeTrainConfig()).items() if k not in ("age_sigma", "folds")}
    assert same_recipe(old, to_jsonable(AgeTrainConfig()))
    assert not same_recipe(old, to_jsonable(AgeTrainConfig(age_sigma=3.0)))
    # one written while a lever existed that was taken out since: the same recipe only if the lever was off
    assert same_recipe({**to_jsonable(AgeTrainConfig()), "swa_epochs": 0}, to_jsonable(AgeTrainConfig()))
    assert not same_recipe({**to_jsonable(AgeTrainConfig()), "swa_epochs": 3}, to_jsonable(AgeTrainConfig()))
    assert same_recipe({**to_jsonable(AgeTrainConfig()), "erase": 0.0, "mean_variance": [0.0, 0.0]},
                       to_jsonable(AgeTrainConfig()))
    assert not same_recipe({**to_jsonable(AgeTrainConfig()), "mean_variance": [0.2, 0.05]},
                           to_jsonable(AgeTrainConfig()))


def test_a_recipe_trains_the_same_members_whatever_ran_before_it_and_another_seed_does_not(face_dir, tmp_path):
    """Two runs of one recipe in one process, after different random draws, train identical members (each
    member's seed sets its initialisation, its batches and its augmentation); --seed-offset changes them."""
    from training.config import AGE_PRESETS, AgeTrainConfig
    from training.train import train_age_ensemble

    torch.set_num_threads(2)
    members = ("vgg-age", "res-group")
    recipe = dict(**{**AGE_PRESETS["tiny"], "epochs": 1}, preset="tiny", data_dir=face_dir, members=members,
                  val_fraction=0.25, face_template=False)

    def trained(name, draw, **changes):
        torch.manual_seed(draw)
        torch.rand(draw + 1)  # leaves the global generator somewhere else before each run
        train_age_ensemble(AgeTrainConfig(**recipe, **changes, out_dir=tmp_path / name))
        return {m: torch.load(tmp_path / name / f"member-{m}.pt", weights_only=False)["state_dict"]
                for m in members}

    first, again, reseeded = trained("first", 1), trained("again", 2), trained("reseeded", 1, seed_offset=1)
    for m in members:
        assert first[m].keys() == again[m].keys()
        assert all(torch.equal(first[m][k], again[m][k]) for k in first[m]), m
        assert not all(torch.equal(first[m][k], reseeded[m][k]) for k in first[m]), m


def test_a_run_on_all_faces_takes_its_members_weights_and_figures_from_out_of_fold_answers(face_dir, tmp_path):
    import json
    import shutil
    from dataclasses import replace

    from serving.runtime import model_summary
    from training.config import AGE_PRESETS, AgeTrainConfig
    from training.data import DataError
    from training.export import export_age_ensemble
    from training.quantize import QuantSettings
    from training.train import train_age_ensemble

    torch.set_num_threads(2)
    recipe = dict(**{**AGE_PRESETS["tiny"], "epochs": 1}, preset="tiny", data_dir=face_dir,
                  members=("vgg-age", "res-group"))
    for fold in (0, 1):  # the sweep bench/cv.py runs: each fold keeps its last epoch
        train_age_ensemble(AgeTrainConfig(**recipe, out_dir=tmp_path / "sweep" / f"fold{fold}", folds=2, fold=fold,
                                          keep_last=True, face_template=False))
    everything = AgeTrainConfig(**recipe, out_dir=tmp_path / "all", val_fraction=0,
                                oof_from=(str(tmp_path / "sweep"),))
    summary = train_age_ensemble(everything)
    faces = len(pd.read_csv(face_dir / "data.csv"))
    saved = torch.load(tmp_path / "all" / "ensemble.pt", weights_only=False)
    assert saved["val_index"] == [] and len(saved["val_targets"]) == faces
    assert [r["fold"] for r in summary["out_of_fold"]] == [0, 1]
    # the fitted figures are the out-of-fold answers of the fold runs (over the mirror too where that was
    # chosen: the fold runs keep their answers on the mirrored faces), weighted as fitted
    assert summary["fitted_with_flip"] is not None and summary["fitted_without_flip"] is not None
    answers = {}
    for fold in (0, 1):
        run = torch.load(tmp_path / "sweep" / f"fold{fold}" / "ensemble.pt", weights_only=False)
        for name, a in run["member_val"].items():
            seen = (a["probs"] + a["mirrored_probs"]) / 2 if summary["tta_flip"] else a["probs"]
            answers.setdefault(name, np.zeros((faces, 5)))[run["val_index"]] = seen
    mixed = sum(m["weight"] * answers[m["name"]] for m in summary["members"])
    assert summary["ensemble"]["accuracy"] == pytest.approx((mixed.argmax(1) == saved["val_targets"]).mean())
    # its age error is the graph's: the median of the exact-age members' distributions, mixed
    dists = {}
    for fold in (0, 1):
        run = torch.load(tmp_path / "sweep" / f"fold{fold}" / "ensemble.pt", weights_only=False)
        for name, a in run["member_val"].items():
            seen = (a["age_dists"] + a["mirrored_age_dists"]) / 2 if summary["tta_flip"] else a["age_dists"]
            dists.setdefault(name, np.zeros((faces, len(AGES))))[run["val_index"]] = seen
    age_members = [m for m in summary["members"] if m["member"]["target"] == "age"]
    mix = sum(m["weight"] * dists[m["name"]] for m in age_members) / sum(m["weight"] for m in age_members)
    median = 10 + (mix.cumsum(1) < 0.5).sum(1)
    assert summary["ensemble"]["age_mae_years"] == pytest.approx(np.abs(median - saved["val_true_ages"]).mean())
    for m in summary["members"]:  # every member trained on every face, its last epoch kept, never validated
        history = torch.load(tmp_path / "all" / m["checkpoint"], weights_only=False)["history"]
        assert len(history) == 1 and "val_loss" not in history[0]
    meta = export_age_ensemble(tmp_path / "all", tmp_path / "exported", int8=QuantSettings(images=16))
    folds = [torch.load(tmp_path / "sweep" / f"fold{k}" / "ensemble.pt", weights_only=False) for k in (0, 1)]
    assert meta["validation"]["out_of_fold"] == {
        "faces": faces, "folds": 2, "runs": [str(tmp_path / "sweep" / f"fold{k}") for k in (0, 1)],
        "train_seconds": round(sum(f["train_seconds"] for f in folds), 1)}
    assert meta["ensemble_val_accuracy"] == meta["float_ensemble_val_accuracy"] == summary["ensemble"]["accuracy"]
    assert meta["quantization"]["vs_float_on_training_faces"]["label_agreement"] >= 0.95
    # /model says where its accuracy comes from
    assert model_summary(tmp_path / "exported" / "age_ensemble.onnx")["validated_on"] == (
        f"out of fold: {faces} faces, each answered by the 2-fold run that held it out")
    # the same recipe with its figures from elsewhere (here fold runs made before they kept their mirrored
    # answers: no mirror to choose): nothing retrains
    shutil.copytree(tmp_path / "sweep", tmp_path / "sweep-copy")
    for path in (tmp_path / "sweep-copy").glob("fold*/ensemble.pt"):
        run = torch.load(path, weights_only=False)
        for a in run["member_val"].values():
            del a["mirrored_probs"], a["mirrored_ages"]
        torch.save(run, path)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "all").glob("member-*.pt")}
    older = train_age_ensemble(replace(everything, oof_from=(str(tmp_path / "sweep-copy"),)))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "all").glob("member-*.pt")} == stamps
    assert older["fitted_with_flip"] is None and not older["tta_flip"]

    # sweeps that cannot stand in for the run are refused before anything trains
    def refused(match: str, **changes) -> None:
        with pytest.raises(DataError, match=match):
            train_age_ensemble(AgeTrainConfig(**{**recipe, "out_dir": tmp_path / "refused", "val_fraction": 0,
                                                 "oof_from": (str(tmp_path / "sweep"),), **changes}))

    refused("oof-from", oof_from=())
    refused("another recipe", lr=0.5)
    refused("no fold", oof_from=(str(tmp_path),))
    shutil.copytree(tmp_path / "sweep" / "fold0", tmp_path / "half" / "fold0")
    refused("exactly once", oof_from=(str(tmp_path / "half"),))
    chosen = torch.load(tmp_path / "half" / "fold0" / "ensemble.pt", weights_only=False)
    chosen["config"]["keep_last"] = False
    torch.save(chosen, tmp_path / "half" / "fold0" / "ensemble.pt")
    refused("keep-last", oof_from=(str(tmp_path / "half"),))
    with pytest.raises(DataError, match="all of data.csv"):  # and a run that validates takes none
        train_age_ensemble(AgeTrainConfig(**recipe, out_dir=tmp_path / "refused", oof_from=("x",)))
    assert not (tmp_path / "refused").exists()
    assert json.loads((tmp_path / "exported" / "age_ensemble.json").read_text())["precision"] == "int8"
