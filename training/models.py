"""The one place models are defined: AgeCNN, AgeEnsemble and Stl10MLP.

Every model takes images as float (B, 3, H, W) in 0..255 and normalizes them itself with buffers
computed from the training images, so the constants travel with the weights into ONNX.

    python -c "from training.models import build_member; print(build_member('nodrop', 64))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import AGE_GROUPS, GENDERS, RACES, MemberConfig, member_by_name

CHANNELS = (32, 32, 64, 64, 128, 128, 256, 256)  # output channels of the 8 conv blocks
HEAD_HIDDEN = 32  # width of the classifier head's hidden layer
MIN_POOLED_SIDE = 2  # a block max-pools only if the map stays at least this wide afterwards


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the statistics stored as buffers."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_block(c_in: int, c_out: int, pool: bool, dropout: float) -> nn.Sequential:
    """Conv3x3 -> BatchNorm -> ReLU -> MaxPool (if pool) -> Dropout (if dropout > 0)."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def pool_plan(input_size: int, blocks: int = len(CHANNELS)) -> list[bool]:
    """Which blocks max-pool: all while the map is large enough, so 224 px pools 6 times, 64 px 5 times."""
    plan, side = [], input_size
    for _ in range(blocks):
        pool = side // 2 >= MIN_POOLED_SIDE
        plan.append(pool)
        side = side // 2 if pool else side
    return plan


def one_hot(index: torch.Tensor, classes: int) -> torch.Tensor:
    """(B,) int64 -> (B, classes) float; written as a comparison so it exports as Equal+Cast."""
    return (index.unsqueeze(1) == torch.arange(classes, device=index.device)).to(torch.float32)


class AgeCNN(nn.Module):
    """VGG-style CNN over the face, concatenated with one-hot gender and race, then a small head."""

    def __init__(self, input_size: int, dropout: tuple[float, ...] = (0.0,) * 8,
                 mean: tuple[float, ...] = (127.5,) * 3, std: tuple[float, ...] = (64.0,) * 3):
        super().__init__()
        assert len(dropout) == len(CHANNELS), f"need {len(CHANNELS)} dropout rates, got {len(dropout)}"
        self.input_size = input_size
        self.normalize = Normalize(mean, std)
        c_in, blocks = 3, []
        for c_out, pool, p in zip(CHANNELS, pool_plan(input_size), dropout):
            blocks.append(conv_block(c_in, c_out, pool, p))
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)  # identity-sized at 224 px; averages the 2x2 map at 64 px
        self.head = nn.Sequential(
            nn.Linear(CHANNELS[-1] + len(GENDERS) + len(RACES), HEAD_HIDDEN),
            nn.BatchNorm1d(HEAD_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(HEAD_HIDDEN, len(AGE_GROUPS)),
        )

    def forward(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(images))  # (B, 256, h, w)
        x = self.pool(x).flatten(1)  # (B, 256)
        x = torch.cat([x, one_hot(gender, len(GENDERS)), one_hot(race, len(RACES))], dim=1)  # (B, 263)
        return self.head(x)  # (B, 5) logits


class AgeEnsemble(nn.Module):
    """Weighted average of the members' softmax outputs, optionally also over the mirrored image."""

    def __init__(self, members: list[AgeCNN], weights: list[float] | None = None, tta_flip: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tta_flip = tta_flip  # average each member over the image and its horizontal mirror
        w = torch.ones(len(members)) if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())

    def member_probs(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        def softmaxes(x: torch.Tensor) -> torch.Tensor:
            return torch.stack([m(x, gender, race).softmax(dim=1) for m in self.members], dim=0)  # (M, B, 5)

        probs = softmaxes(images)
        return 0.5 * (probs + softmaxes(images.flip(3))) if self.tta_flip else probs

    def forward(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        probs = self.member_probs(images, gender, race)  # (M, B, 5)
        return (probs * self.weights.view(-1, 1, 1)).sum(dim=0)  # (B, 5)


class Stl10MLP(nn.Module):
    """Flatten 3x96x96 -> [Linear -> BatchNorm -> ReLU -> Dropout] per hidden layer -> 10 classes."""

    def __init__(self, hidden: tuple[int, ...] = (1024, 512, 256), dropout: float = 0.3, classes: int = 10,
                 input_size: int = 96, mean: tuple[float, ...] = (127.5,) * 3, std: tuple[float, ...] = (64.0,) * 3):
        super().__init__()
        self.input_size = input_size
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        width = 3 * input_size * input_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.normalize(images).flatten(1))  # (B, 27648) -> (B, 10) logits


def build_member(member: MemberConfig | str, input_size: int, mean=(127.5,) * 3, std=(64.0,) * 3) -> AgeCNN:
    """The public factory: an AgeCNN for a member config (or its name) at an input size."""
    if isinstance(member, str):
        member = member_by_name(member)
    return AgeCNN(input_size, tuple(float(p) for p in member.dropout), mean, std)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, label_smoothing: float = 0.0):
    """Cross-entropy down-weighted on easy examples by (1 - p_target) ** gamma."""
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    p_target = logits.softmax(dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return ((1 - p_target) ** gamma * ce).mean()
