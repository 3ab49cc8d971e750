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
GENDERS, RACES = GENDER_NAMES, RACE_NAMES  # one definition, in serving (training may import serving)
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")


@dataclass(frozen=True)
class MemberConfig:
    """One ensemble member: the AgeCNN design with its own dropout placement."""

    name: str
    dropout: tuple[float, ...] = (0.0,) * 8  # dropout rate after each of the 8 conv blocks (0 = none)
    seed: int = 0  # initialisation and shuffling seed, so members differ even when dropout does not


# The course report's five members: 0.5 on block 7; 0.5 on blocks 6-7; 0.25 everywhere; 0.1 everywhere; none.
DEFAULT_MEMBERS = (
    MemberConfig("drop7-0.5", (0, 0, 0, 0, 0, 0, 0.5, 0), seed=1),
    MemberConfig("drop67-0.5", (0, 0, 0, 0, 0, 0.5, 0.5, 0), seed=2),
    MemberConfig("dropall-0.25", (0.25,) * 8, seed=3),
    MemberConfig("dropall-0.1", (0.1,) * 8, seed=4),
    MemberConfig("nodrop", (0.0,) * 8, seed=5),
)


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
    focal_gamma: float = 0.0  # > 0 switches the loss to focal loss with this gamma
    val_fraction: float = 0.12  # stratified share of data.csv held out for validation and weight fitting
    split_seed: int = 0  # seed of the validation split; keep it fixed to compare runs
    augment: bool = True  # random flip, small rotation, shift and scale on training batches only
    patience: int = 0  # stop a member after this many epochs without a better val loss (0 = never)
    members: tuple[str, ...] = ()  # train only these member names (empty = all DEFAULT_MEMBERS)
    threads: int = 0  # torch intra-op threads (0 = torch's default)
    device: str = "auto"  # "auto" (cuda when present), "cpu" or "cuda"
    amp: bool = False  # bfloat16 autocast on CUDA
    limit: int = 0  # use only the first N rows of data.csv (0 = all); for smoke runs


AGE_PRESETS: dict[str, dict] = {
    # 2-core CPU: measured 27 s per member epoch at 64 px, so ~42 s at 80 px: 5 members x 20 epochs ~ 75 min.
    "cpu": dict(input_size=80, epochs=20, batch_size=64),
    # The seed design at full resolution, for a lent GPU.
    "gpu": dict(input_size=224, epochs=30, batch_size=64, amp=True),
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

