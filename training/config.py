"""Dataclass configs for every training task, their presets, and argparse built from them.

    python -m training.train --help     # every field below is a flag
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from serving.runtime import GENDER_NAMES, RACE_NAMES

AGE_GROUPS = ("10-19", "20-29", "30-39", "40-49", "50-60")
AGES = tuple(range(10, 61))  # the exact ages an "age" head scores, one class per year
GENDERS, RACES = GENDER_NAMES, RACE_NAMES  # one definition, in serving (training may import serving)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


def group_of_age(age: int) -> int:
    """Age in years (10-60) -> group index 0-4; 60 belongs to 50-60."""
    return min(max(age - 10, 0) // 10, len(AGE_GROUPS) - 1)


@dataclass(frozen=True)
class MemberConfig:
    """One ensemble member: a backbone, what its head predicts, and its own regularisation and seed."""

    name: str
    dropout: tuple[float, ...] = (0.0,) * 8  # vgg only: dropout rate after each of the 8 conv blocks (0 = none)
    seed: int = 0  # initialisation and shuffling seed, so members differ even when dropout does not
    arch: str = "vgg"  # "vgg" (the course design), "resnet" (strided stem, basic-block stages), "face" (dlib's
    # face-recognition ResNet, started from its published weights; training.dlib_weights) or "lite"
    # (EfficientNet-Lite0 started from its ImageNet weights; training.lite_weights)
    width: int = 32  # resnet only: channels of the first stage, doubled at every later stage
    depth: tuple[int, ...] = (1, 1, 1, 1)  # resnet only: basic blocks per stage
    target: str = "group"  # "group": 5-way softmax; "age": 51 exact ages, trained on a Gaussian around the age
    head_hidden: int = 32  # width of the head's hidden layer
    head_dropout: float = 0.5  # dropout before the head's last layer
    crop: float = 1.0  # share of the image side kept, centred, and resized to the member's input size (a framing)
    backbone_lr: float = 1.0  # the backbone's learning rate as a share of the run's (pretrained backbones: < 1)
    freeze: int = 0  # face, lite: the stem and this many stages keep their pretrained weights
    input_size: int = 0  # side in pixels the network sees (0 = the run's input size). The graph takes the run's
    # size; a member whose framed window is larger than its own side is shrunk inside the graph, antialiased as
    # Pillow's bilinear resize does, so members of different sizes share one input
    levels: int = 1  # face only: the pooled maps of this many last stages, concatenated, feed the head (1 = the
    # last stage's only; a recognition network's last stage is trained to ignore age, earlier ones keep texture)
    epochs: int = 0  # training epochs of this member (0 = the run's): a from-scratch member beside fine-tuned ones


# The course report's five members: 0.5 on block 7; 0.5 on blocks 6-7; 0.25 everywhere; 0.1 everywhere; none.
COURSE_MEMBERS = (
    MemberConfig("drop7-0.5", (0, 0, 0, 0, 0, 0, 0.5, 0), seed=1),
    MemberConfig("drop67-0.5", (0, 0, 0, 0, 0, 0.5, 0.5, 0), seed=2),
    MemberConfig("dropall-0.25", (0.25,) * 8, seed=3),
    MemberConfig("dropall-0.1", (0.1,) * 8, seed=4),
    MemberConfig("nodrop", (0.0,) * 8, seed=5),
)
# Members measured to do better (bench/results/experiments.md): exact-age heads, ResNet backbones, wider heads.
NEW_MEMBERS = (
    MemberConfig("vgg-age", seed=11, target="age", head_hidden=128, head_dropout=0.3),
    MemberConfig("vgg-age2", seed=17, target="age", head_hidden=128, head_dropout=0.3),
    MemberConfig("vgg-group", seed=12, head_hidden=128, head_dropout=0.3),
    MemberConfig("res-age", seed=13, arch="resnet", target="age", head_hidden=128, head_dropout=0.3),
    MemberConfig("res-group", seed=14, arch="resnet", head_hidden=128, head_dropout=0.3),
    MemberConfig("res2-age", seed=15, arch="resnet", depth=(2, 2, 2, 2), target="age", head_hidden=128,
                 head_dropout=0.3),
    MemberConfig("res48-age", seed=16, arch="resnet", width=48, target="age", head_hidden=128, head_dropout=0.3),
)
# Members fine-tuned from dlib's face-recognition ResNet (150 px), differing in framing, target, freezing, size, head.
FACE = dict(arch="face", head_hidden=128, head_dropout=0.3, backbone_lr=0.1, input_size=150)  # dlib's chip size
FACE_MEMBERS = (
    MemberConfig("face-age", seed=21, target="age", **FACE),
    MemberConfig("face-age-c85", seed=22, target="age", crop=0.85, **FACE),
    MemberConfig("face-age-frz", seed=23, target="age", crop=0.92, freeze=2, **FACE),
    MemberConfig("face-group", seed=24, **FACE),
    MemberConfig("face-group-c85", seed=25, crop=0.85, **FACE),
    MemberConfig("face-age-frz3", seed=26, target="age", freeze=3, **FACE),
    MemberConfig("face-age-blr3", seed=27, target="age", crop=0.92, **{**FACE, "backbone_lr": 0.3}),
    MemberConfig("face-age-c78", seed=28, target="age", crop=0.78, **FACE),
    MemberConfig("face-age-frz-b", seed=29, target="age", crop=0.92, freeze=2, **FACE),
    MemberConfig("face-age-frz-c85", seed=30, target="age", crop=0.85, freeze=2, **FACE),
    # the head on the pooled maps of the last three stages (128 + 256 + 256 channels), not the last one only
    MemberConfig("face-age-ml", seed=34, target="age", levels=3, **FACE),
    MemberConfig("face-age-frz-ml", seed=35, target="age", crop=0.92, freeze=2, levels=3, **FACE),
    # at the crop window's own resolution in a 200 px run (184 and 170 px: no resampling at all)
    MemberConfig("face-age-n92-frz", seed=31, target="age", crop=0.92, freeze=2, **{**FACE, "input_size": 184}),
    MemberConfig("face-age-n85", seed=32, target="age", crop=0.85, **{**FACE, "input_size": 170}),
    # EfficientNet-Lite0 from ImageNet (a different starting point from dlib's): full fine-tune, the backbone at
    # 0.3x the head's rate (ImageNet features are further from faces than dlib's), or stem and 3 stages frozen
    MemberConfig("lite-age", seed=36, target="age", **{**FACE, "arch": "lite", "backbone_lr": 0.3}),
    MemberConfig("lite-age-frz3", seed=37, target="age", freeze=3, **{**FACE, "arch": "lite", "backbone_lr": 0.3}),
    # from random initialisation, beside the face members of a face preset: its own small size and epochs
    MemberConfig("res-age-64", seed=33, arch="resnet", target="age", head_hidden=128, head_dropout=0.3,
                 input_size=64, epochs=40),
)
DEFAULT_MEMBERS = COURSE_MEMBERS + NEW_MEMBERS + FACE_MEMBERS  # every member a preset or --members can name
@dataclass
class AgeTrainConfig:
    """How the age-group ensemble is trained. Presets below override some fields."""

    preset: str = "cpu"  # name of the preset these values started from
    data_dir: Path = Path("../shared/data/faces")  # folder holding data.csv and images/
    out_dir: Path = Path("runs/age")  # checkpoints, curves and confusion matrices go here
    input_size: int = 80  # square side in pixels the images are resized to (Pillow bilinear)
    epochs: int = 20  # training epochs per member
    batch_size: int = 64  # images per optimisation step
    lr: float = 2e-3  # peak Adam learning rate, reached after warmup and then cosine-decayed
    warmup_epochs: float = 1.0  # linear warmup length in epochs
    weight_decay: float = 5e-4  # decoupled (AdamW) weight decay
    label_smoothing: float = 0.1  # cross-entropy label smoothing; ages are noisy labels
    age_sigma: float = 2.0  # "age" members: std in years of the Gaussian target around the true age
    val_fraction: float = 0.12  # stratified share of data.csv held out for validation and weight fitting (0 = none:
    # train on all of data.csv, with the ensemble weights fitted on --oof-from's out-of-fold answers)
    oof_from: tuple[str, ...] = ()  # with --val-fraction 0: cross-validation sweeps (folders of fold0..foldK-1 runs
    # of bench/cv.py, the same recipe with --keep-last) whose out-of-fold answers choose the members and weights
    split_seed: int = 0  # seed of the validation split; keep it fixed to compare runs
    folds: int = 0  # > 1: K-fold cross-validation, validating on fold `fold` of this many (val_fraction unused)
    fold: int = 0  # which of the `folds` stratified folds is validation (0-based)
    keep_last: bool = False  # keep each member's last epoch, validated once after it (no epoch chosen on validation)
    face_template: bool = True  # fit the face template after training (the export needs it; CV runs skip it)
    train_fraction: float = 1.0  # stratified share of the training split trained on (validation faces unchanged)
    seed_offset: int = 0  # added to every member's seed and to the training subsample's: the same recipe reseeded
    augment: bool = True  # random flip, small rotation, shift and scale on training batches only
    patience: int = 0  # stop a member after this many epochs without a better val loss (0 = never)
    members: tuple[str, ...] = ()  # the ensemble's member names (empty = the course's five members)
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    device: str = "auto"  # "auto" (cuda when present), "cpu" or "cuda"
    amp: bool = False  # bfloat16 autocast on CUDA
    limit: int = 0  # use only the first N rows of data.csv (0 = all); for smoke runs
    min_member_weight: float = 0.0  # members whose fitted weight falls under this are left out of the ensemble
    max_passes: int = 0  # inference budget: member forward passes per image, the mirror counted (0 = no limit)
    max_members: int = 0  # at most this many members in the graph (0 = no limit); each adds its weights' size


AGE_PRESETS: dict[str, dict] = {
    # 2-core CPU, <= 120 min: three members that differ in backbone and target, 80 px, 40 epochs each
    # (measured 0.69 / 0.87 / 0.69 min per epoch on 2 idle cores; bench/results/experiments.md ranks them).
    "cpu": dict(input_size=80, epochs=40, batch_size=64, members=("vgg-age", "res-age", "vgg-group")),
    # 2-core CPU: members fine-tuned from dlib's face-recognition ResNet at its 150 px (bench/results/experiments.md).
    # 10 epochs overfit (face-age peaked at epoch 3 of 10, 62.5 %), so 5, and four members that differ.
    # Of the 7 trained, at most 4 members (22.5 MB each: a graph under 100 MB, the largest file GitHub takes) and
    # 6 passes an image (about 100 img/s in onnxruntime on 2 cores): 4 members, or 3 with their mirrors.
    "face": dict(input_size=150, epochs=5, batch_size=64, lr=1e-3, age_sigma=3.0, min_member_weight=0.02,
                 max_passes=6, max_members=4, members=("face-age", "face-age-c85", "face-age-frz", "face-group-c85",
                                        "face-age-frz3", "face-age-blr3", "face-age-c78")),
    # The face members fed 200 px crops (no resize of the data set's crops): the 150 px members shrink them in the
    # graph, the native ones (n92, n85) see their window at full resolution; one graph, mixed member sizes.
    "face-mixed": dict(input_size=200, epochs=5, batch_size=64, lr=1e-3, age_sigma=3.0, min_member_weight=0.02,
                       max_passes=6, max_members=4, members=("face-age-c85", "face-age-frz", "face-age-frz3",
                                                             "face-age-n92-frz", "face-age-n85")),
    # The course report's design as it ran before: 5 VGG members differing in dropout, 80 px, 20 epochs.
    "course": dict(input_size=80, epochs=20, batch_size=64, members=tuple(m.name for m in COURSE_MEMBERS)),
    # The new recipe where a GPU is lent: five members at 96 px, 40 epochs, bf16 autocast.
    "gpu": dict(input_size=96, epochs=40, batch_size=64, amp=True,
                members=("vgg-age", "vgg-age2", "res-age", "res2-age", "vgg-group")),
    # Seconds-long run for smoke tests.
    "tiny": dict(input_size=32, epochs=2, batch_size=16),
}


@dataclass
class Stl10TrainConfig:
    """How the STL-10 MLP is trained (the course report's recipe by default)."""

    preset: str = "stl10"
    data_dir: Path = Path("../shared/data/stl10")  # folder holding stl10_binary/
    out_dir: Path = Path("runs/stl10")
    hidden: tuple[int, ...] = (1024, 512, 256)  # hidden layer widths
    dropout: float = 0.3  # dropout after every hidden layer
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    lr_step: int = 20  # halve the learning rate every this many epochs (0 = cosine instead)
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    val_fraction: float = 0.2  # stratified share of the training images held out for validation
    split_seed: int = 0
    augment: bool = True  # horizontal flip and +-10 degree rotation, training batches only
    patience: int = 15  # early stopping on validation loss (0 = never)
    threads: int = 0
    device: str = "auto"
    limit: int = 0


STL10_PRESETS: dict[str, dict] = {"stl10": {}, "tiny": dict(hidden=(64, 32), epochs=3, batch_size=16)}


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, presets: dict[str, dict]) -> None:
    """Add one --flag per dataclass field; help text is the field's comment in this file."""
    comments = _field_comments(config_cls)
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f"{comments.get(f.name, f.name)} (default: {default})"
        if f.name == "preset":
            parser.add_argument(flag, choices=sorted(presets), default=None, help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            parser.add_argument(flag, nargs="*", type=kind, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=None, help=help_text)


def config_from_args(args: argparse.Namespace, config_cls: type, presets: dict[str, dict]):
    """Defaults, then the preset, then every flag given on the command line."""
    preset = args.preset or config_cls().preset
    values = dict(presets[preset], preset=preset)
    for f in dataclasses.fields(config_cls):
        given = getattr(args, f.name, None)
        if given is not None and f.name != "preset":
            values[f.name] = tuple(given) if isinstance(given, list) else given
    return config_cls(**values)


def to_jsonable(config) -> dict:
    """A config as plain JSON types (paths as strings, tuples as lists)."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def _field_comments(config_cls: type) -> dict[str, str]:
    """Read `name: type = default  # comment` lines of a dataclass from this source file."""
    import inspect

    comments = {}
    for line in inspect.getsource(config_cls).splitlines():
        code, _, comment = line.partition("  # ")
        name = code.strip().split(":")[0]
        if comment and name.isidentifier():
            comments[name] = comment.strip()
    return comments


def member_by_name(name: str) -> MemberConfig:
    """The DEFAULT_MEMBERS entry with this name."""
    for member in DEFAULT_MEMBERS:
        if member.name == name:
            return member
    raise UnknownMember(f"unknown member {name!r}; choose from {', '.join(m.name for m in DEFAULT_MEMBERS)}")


class UnknownMember(ValueError):
    """A member name that is not in DEFAULT_MEMBERS."""

