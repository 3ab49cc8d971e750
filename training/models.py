"""The one place models are defined: AgeCNN (over a VGG or ResNet backbone), AgeEnsemble and Stl10MLP.

Every model takes images as float (B, 3, H, W) in 0..255 and normalizes them itself with buffers
computed from the training images, so the constants travel with the weights into ONNX. A member's head
predicts either the 5 groups or the 51 exact ages 10-60; `group_probs` turns either into 5 probabilities.

    python -c "from training.models import build_member; print(build_member('nodrop', 64))"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import AGE_GROUPS, AGES, GENDERS, RACES, MemberConfig, group_of_age, member_by_name

CHANNELS = (32, 32, 64, 64, 128, 128, 256, 256)  # output channels of the course design's 8 conv blocks
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


class BasicBlock(nn.Module):
    """ResNet basic block: two Conv3x3-BatchNorm, a projected shortcut when the shape changes, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def vgg_features(input_size: int, dropout: tuple[float, ...]) -> tuple[nn.Sequential, int]:
    """The course design: 8 conv blocks, pooling while the map stays >= 2 px. Returns (layers, channels)."""
    assert len(dropout) == len(CHANNELS), f"need {len(CHANNELS)} dropout rates, got {len(dropout)}"
    c_in, blocks = 3, []
    for c_out, pool, p in zip(CHANNELS, pool_plan(input_size), dropout):
        blocks.append(conv_block(c_in, c_out, pool, p))
        c_in = c_out
    return nn.Sequential(*blocks), c_in


def resnet_features(width: int, depth: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """Strided Conv3x3 stem, then one stage per entry of `depth` (blocks), doubling width and halving the map."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    c_in = width
    for stage, blocks in enumerate(depth):
        c_out = width * 2 ** stage
        for b in range(blocks):
            layers.append(BasicBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1))
            c_in = c_out
    return nn.Sequential(*layers), c_in


def age_group_matrix() -> torch.Tensor:
    """(51, 5) 0/1: which group each exact age 10-60 belongs to."""
    groups = torch.tensor([group_of_age(a) for a in AGES])
    return (groups.unsqueeze(1) == torch.arange(len(AGE_GROUPS))).to(torch.float32)


class AgeCNN(nn.Module):
    """A CNN over the face, its pooled features concatenated with one-hot gender and race, then a small head.

    `target="group"`: the head scores the 5 groups. `target="age"`: it scores the 51 exact ages 10-60 and a
    group's probability is the mass of its ages (trained on a Gaussian around the true age).
    """

    def __init__(self, input_size: int, dropout: tuple[float, ...] = (0.0,) * 8,
                 mean: tuple[float, ...] = (127.5,) * 3, std: tuple[float, ...] = (64.0,) * 3, *,
                 arch: str = "vgg", width: int = 32, depth: tuple[int, ...] = (1, 1, 1, 1),
                 target: str = "group", head_hidden: int = 32, head_dropout: float = 0.5):
        super().__init__()
        self.input_size, self.target = input_size, target
        self.normalize = Normalize(mean, std)
        if arch == "vgg":
            self.features, channels = vgg_features(input_size, dropout)
        elif arch == "resnet":
            self.features, channels = resnet_features(width, depth)
        else:
            raise ValueError(f"unknown arch {arch!r}; choose vgg or resnet")
        self.pool = nn.AdaptiveAvgPool2d(1)  # identity-sized at 224 px with vgg; averages any map to 1x1
        outputs = {"group": len(AGE_GROUPS), "age": len(AGES)}[target]
        self.head = nn.Sequential(
            nn.Linear(channels + len(GENDERS) + len(RACES), head_hidden),
            nn.BatchNorm1d(head_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(head_dropout),
            nn.Linear(head_hidden, outputs),
        )
        if target == "age":
            self.register_buffer("age_to_group", age_group_matrix(), persistent=False)

    def forward(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(images))  # (B, C, h, w)
        x = self.pool(x).flatten(1)  # (B, C)
        x = torch.cat([x, one_hot(gender, len(GENDERS)), one_hot(race, len(RACES))], dim=1)  # (B, C + 7)
        return self.head(x)  # (B, 5) group logits or (B, 51) age logits

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits -> (B, 5) group probabilities that sum to 1."""
        probs = logits.softmax(dim=1)
        return probs @ self.age_to_group if self.target == "age" else probs

    def group_probs(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        return self.decode(self(images, gender, race))


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
            return torch.stack([m.group_probs(x, gender, race) for m in self.members], dim=0)  # (M, B, 5)

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


def build_member(member: MemberConfig | dict | str, input_size: int, mean=(127.5,) * 3, std=(64.0,) * 3) -> AgeCNN:
    """The public factory: an AgeCNN for a member config (or its name) at an input size."""
    if isinstance(member, str):
        member = member_by_name(member)
    elif isinstance(member, dict):
        member = MemberConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in member.items()})
    return AgeCNN(input_size, tuple(float(p) for p in member.dropout), mean, std, arch=member.arch,
                  width=member.width, depth=tuple(member.depth), target=member.target,
                  head_hidden=member.head_hidden, head_dropout=member.head_dropout)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float, label_smoothing: float = 0.0):
    """Cross-entropy down-weighted on easy examples by (1 - p_target) ** gamma."""
    ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing)
    p_target = logits.softmax(dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return ((1 - p_target) ** gamma * ce).mean()


def age_distribution(age: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B,) ages in years -> (B, 51) a Gaussian over the ages 10-60 around each, normalised to sum 1."""
    grid = torch.tensor(AGES, dtype=torch.float32, device=age.device)
    weights = torch.exp(-0.5 * ((grid.unsqueeze(0) - age.unsqueeze(1).float()) / sigma) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def age_distribution_loss(logits: torch.Tensor, age: torch.Tensor, sigma: float) -> torch.Tensor:
    """Label-distribution learning: KL(Gaussian around the true age || softmax over ages), batch mean."""
    target = age_distribution(age, sigma)
    return F.kl_div(logits.log_softmax(dim=1), target, reduction="batchmean")
