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
from training.dlib_weights import BN_EPS, STAGES, STEM_CHANNELS  # dlib's layout (one way: it imports nothing here)
from training.lite_weights import LITE_BN_EPS, LITE_HEAD, LITE_STAGES, LITE_STEM  # EfficientNet-Lite0's (likewise)

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




class FaceResBlock(nn.Module):
    """dlib's residual block: Conv3x3-BN-ReLU-Conv3x3-BN plus the input, then ReLU. A block that halves the map
    does it with an unpadded strided conv and adds a 2x2 average pool of its input, as dlib's add_prev does:
    over the larger of the two shapes, the smaller one (fewer channels, or a map one pixel short) zero-padded
    at the end."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 2 if down else 1, 0 if down else 1)
        self.bn1 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
        return F.relu(pad_to(y, x.shape) + pad_to(x, y.shape))


def pad_to(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Zero-pad (B, C, H, W) at the end of C, H and W up to `shape` where it is smaller (sizes are static)."""
    extra = [max(0, int(shape[d]) - int(x.shape[d])) for d in (3, 2, 1)]
    return F.pad(x, (0, extra[0], 0, extra[1], 0, extra[2])) if any(extra) else x


class FaceResNet(nn.Module):
    """dlib's face-recognition ResNet (dlib_face_recognition_resnet_model_v1): an unpadded 7x7/2 stem, 3x3/2 max
    pool, then residual stages of 32, 64, 128, 256 and 256 channels; 150 px in, (B, 256, 2, 2) out. `descriptor`
    adds dlib's last layers (global average pool, 128-d linear map) to compare the port with dlib itself.
    Weights come from training.dlib_weights.dlib_state_dict."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, STEM_CHANNELS, 7, 2, 0), nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        stages, c_in = [], STEM_CHANNELS
        for stage, (c_out, blocks) in enumerate(STAGES):
            stages.append(nn.Sequential(*(FaceResBlock(c_in if b == 0 else c_out, c_out, stage > 0 and b == 0)
                                          for b in range(blocks))))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.stage_channels = tuple(c for c, _ in STAGES)  # each stage's output channels; the last is forward's
        self.descriptor = nn.Linear(c_in, 128, bias=False)  # dlib's fc_no_bias; unused by AgeCNN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, 256, h, w)

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of every residual stage, the last one being forward's."""
        maps, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def conv_norm_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """Every convolution with the BatchNorm that follows it."""
        pairs = [(self.stem[0], self.stem[1])]
        for stage in self.stages:
            pairs += [(b.conv1, b.bn1) for b in stage] + [(b.conv2, b.bn2) for b in stage]
        return pairs

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 150, 150) normalised as dlib does -> (B, 128) face descriptor."""
        return self.descriptor(self(x).mean(dim=(2, 3)))


def same_padding(side: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one axis (before, after): the extra pixel, if any, goes after."""
    total = max((-(-side // stride) - 1) * stride + kernel - side, 0)
    return total // 2, total - total // 2


class SameConv(nn.Conv2d):
    """A bias-free convolution padded as TensorFlow's "SAME" (EfficientNet-Lite's weights were trained so): a
    strided one on an even side pads one pixel more after than before, which Conv2d's symmetric padding cannot
    say, so that case pads explicitly. Sizes are static, so the export traces plain integers."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(c_in, c_out, kernel, stride, 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (top, bottom), (left, right) = (same_padding(int(x.shape[d]), self.kernel_size[0], self.stride[0])
                                        for d in (2, 3))
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, None, self.stride, (top, left), 1, self.groups)
        return super().forward(F.pad(x, (left, right, top, bottom)))


class LiteBlock(nn.Module):
    """EfficientNet-Lite's inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection (no squeeze-excite),
    ReLU6 after the first two; the input added back where the shape is unchanged."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        wide = c_in * expand
        if expand != 1:
            self.expand = SameConv(c_in, wide, 1)
            self.expand_norm = nn.BatchNorm2d(wide, eps=LITE_BN_EPS)
        self.depthwise = SameConv(wide, wide, kernel, stride, groups=wide)
        self.depthwise_norm = nn.BatchNorm2d(wide, eps=LITE_BN_EPS)
        self.project = SameConv(wide, c_out, 1)
        self.project_norm = nn.BatchNorm2d(c_out, eps=LITE_BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.expand_norm(self.expand(x))) if hasattr(self, "expand") else x
        y = self.project_norm(self.project(F.relu6(self.depthwise_norm(self.depthwise(y)))))
        return x + y if self.residual else y


class LiteNet(nn.Module):
    """EfficientNet-Lite0 (3.4 M parameters without its ImageNet classifier): a 3x3/2 stem, seven stages of
    inverted residual blocks, a 1x1 conv to 1,280 channels; ImageNet weights from training.lite_weights."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(SameConv(3, LITE_STEM, 3, 2), nn.BatchNorm2d(LITE_STEM, eps=LITE_BN_EPS),
                                  nn.ReLU6(inplace=True))
        stages, c_in = [], LITE_STEM
        for blocks, kernel, stride, expand, c_out in LITE_STAGES:
            stages.append(nn.Sequential(*(LiteBlock(c_in if b == 0 else c_out, c_out, kernel,
                                                    stride if b == 0 else 1, expand) for b in range(blocks))))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(SameConv(c_in, LITE_HEAD, 1), nn.BatchNorm2d(LITE_HEAD, eps=LITE_BN_EPS),
                                  nn.ReLU6(inplace=True))
        self.stage_channels = (LITE_HEAD,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))  # (B, 1280, h, w)

    def conv_norm_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """Every convolution with the BatchNorm that follows it."""
        blocks = [b for stage in self.stages for b in stage]
        inner = [(getattr(b, part), getattr(b, part + "_norm"))
                 for b in blocks for part in ("expand", "depthwise", "project") if hasattr(b, part)]
        return [(self.stem[0], self.stem[1]), *inner, (self.head[0], self.head[1])]


def antialias_matrix(source: int, size: int) -> torch.Tensor:
    """(size, source) the linear map of a 1-D antialiased bilinear resize (torch's, which matches Pillow's
    BILINEAR within a grey level), read off by resizing the unit vectors; ONNX has no antialiased Resize in the
    exporter, but a matrix product exports everywhere."""
    unit = torch.eye(source).view(source, 1, 1, source)
    return F.interpolate(unit, size=(1, size), mode="bilinear", align_corners=False, antialias=True).view(
        source, size).T.contiguous()


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
                 target: str = "group", head_hidden: int = 32, head_dropout: float = 0.5, crop: float = 1.0,
                 backbone_lr: float = 1.0, freeze: int = 0, source_size: int = 0, levels: int = 1):
        super().__init__()
        self.input_size, self.target, self.crop, self.backbone_lr = input_size, target, crop, backbone_lr
        self.source_size = source_size or input_size  # side of the images it is fed (the graph's input)
        if levels > 1 and arch != "face":
            raise ValueError("levels > 1 needs the face backbone")
        self.levels = levels  # pooled maps of this many last stages feed the head
        window = self.window_side()
        if window > input_size:  # shrinking: Pillow's antialiased bilinear filter as a (input_size, window) matrix
            self.register_buffer("shrink", antialias_matrix(window, input_size), persistent=False)
        self.normalize = Normalize(mean, std)
        if arch == "vgg":
            self.features, channels = vgg_features(input_size, dropout)
        elif arch == "resnet":
            self.features, channels = resnet_features(width, depth)
        elif arch in ("face", "lite"):
            self.features = FaceResNet() if arch == "face" else LiteNet()
            channels = sum(self.features.stage_channels[-levels:])
            if arch == "face":
                self.features.descriptor.requires_grad_(False)
            for frozen in [self.features.stem, *self.features.stages[:freeze]]:
                frozen.requires_grad_(False)
        else:
            raise ValueError(f"unknown arch {arch!r}; choose vgg, resnet, face or lite")
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
        x = self.normalize(self.frame(images))
        if self.levels > 1:  # (B, C) the last stages' pooled maps side by side
            x = torch.cat([self.pool(m).flatten(1) for m in self.features.stage_maps(x)[-self.levels:]], dim=1)
        else:
            x = self.pool(self.features(x)).flatten(1)  # (B, C)
        x = torch.cat([x, one_hot(gender, len(GENDERS)), one_hot(race, len(RACES))], dim=1)  # (B, C + 7)
        return self.head(x)  # (B, 5) group logits or (B, 51) age logits

    def window_side(self) -> int:
        """Side of the centred window of the fed image that this member frames (all of it at crop 1)."""
        return round(self.source_size * self.crop) if self.crop < 1 else self.source_size

    def frame(self, images: torch.Tensor) -> torch.Tensor:
        """The centred `crop` share of the fed image at the member's input size: shrunk with an antialiased
        filter, enlarged bilinearly, or as it is. Sizes are static, so the export traces plain integers."""
        side, keep, size = self.source_size, self.window_side(), self.input_size
        start = (side - keep) // 2
        window = images if keep == side else images[:, :, start:start + keep, start:start + keep]
        if keep > size:
            return self.shrink @ window @ self.shrink.T  # rows, then columns: (B, C, size, size)
        if keep < size:
            return F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False)
        return window

    @torch.no_grad()
    def calibrate_batchnorm(self, images: torch.Tensor, batch_size: int = 64) -> None:
        """Make a backbone loaded from folded affine layers (BatchNorm with mean 0, variance 1 - eps) train like
        a batch-normalised one: measure each BatchNorm's input mean and variance over `images` (B, 3, H, W,
        0..255), make them the running statistics and rescale weight and bias so that eval output is unchanged.
        Without this, training-mode batch statistics would replace dlib's folded ones and wreck the features."""
        norms = [m for m in self.features.modules() if isinstance(m, nn.BatchNorm2d)]
        sums: dict[nn.Module, list] = {m: [0.0, 0.0, 0] for m in norms}
        if isinstance(self.features, FaceResNet):
            # dlib's convolutions are tiny (mean |w| 0.0005-0.01, deeper ones smaller): an Adam step of 1e-4 would
            # overwrite them within an epoch. A BatchNorm follows each one, so scaling a conv by c and dividing
            # the affine scale after it by c leaves the function as it is; scale each to He-initialisation size.
            for conv, norm in self.features.conv_norm_pairs():
                c = (2.0 / conv.weight[0].numel()) ** 0.5 / conv.weight.std()
                conv.weight.mul_(c)
                conv.bias.mul_(c)
                norm.weight.div_(c)  # still folded (running mean 0, variance 1 - eps): weight is the scale

        def record(module, inputs, _output):
            x = inputs[0].double()
            acc = sums[module]
            acc[0] = acc[0] + x.sum(dim=(0, 2, 3))
            acc[1] = acc[1] + (x * x).sum(dim=(0, 2, 3))
            acc[2] += x.numel() // x.shape[1]

        hooks = [m.register_forward_hook(record) for m in norms]
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(images), batch_size):
                self.features(self.normalize(self.frame(images[start:start + batch_size].float())))
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
        for m in norms:
            total, squares, count = sums[m]
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0)
            scale = m.weight.double() / (m.running_var.double() + m.eps).sqrt()  # the folded dlib scale
            shift = m.bias.double() - scale * m.running_mean.double()
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.weight.copy_(scale * (var + m.eps).sqrt())
            m.bias.copy_(shift + scale * mean)

    def parameter_groups(self, lr: float) -> list[dict]:
        """Optimizer groups: the backbone at `backbone_lr` x lr, the head at lr; frozen weights left out."""
        backbone = [p for p in self.features.parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": lr * self.backbone_lr}, {"params": head, "lr": lr}]

    def train(self, mode: bool = True):
        """Frozen stages keep their BatchNorm statistics too (eval mode), so they stay the pretrained ones."""
        super().train(mode)
        if mode and isinstance(self.features, (FaceResNet, LiteNet)):
            for module in [self.features.stem, *self.features.stages]:
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits -> (B, 5) group probabilities that sum to 1."""
        probs = logits.softmax(dim=1)
        return probs @ self.age_to_group if self.target == "age" else probs

    def group_probs(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        return self.decode(self(images, gender, race))

    def age_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits -> (B, 51) a distribution over the ages 10-60: an age head's softmax, or a group head's
        probabilities spread evenly over the ages of each group."""
        if self.target == "age":
            return logits.softmax(dim=1)
        spread = age_group_matrix().to(logits.device)  # (51, 5)
        return logits.softmax(dim=1) @ (spread / spread.sum(dim=0)).T


class AgeEnsemble(nn.Module):
    """Weighted average of the members' softmax outputs, optionally also over the mirrored image."""

    def __init__(self, members: list[AgeCNN], weights: list[float] | None = None, tta_flip: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.tta_flip = tta_flip  # average each member over the image and its horizontal mirror
        w = torch.ones(len(members)) if weights is None else torch.tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w / w.sum())

    def member_outputs(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor):
        """Every member's (M, B, 5) group probabilities and (M, B, 51) age distribution, from one pass of each
        member (two with the mirror, averaged)."""
        def outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = [m(x, gender, race) for m in self.members]
            groups = torch.stack([m.decode(z) for m, z in zip(self.members, logits)])  # (M, B, 5)
            ages = torch.stack([m.age_probs(z) for m, z in zip(self.members, logits)])  # (M, B, 51)
            return groups, ages

        groups, ages = outputs(images)
        if self.tta_flip:
            mirrored_groups, mirrored_ages = outputs(images.flip(3))
            groups, ages = 0.5 * (groups + mirrored_groups), 0.5 * (ages + mirrored_ages)
        return groups, ages

    def forward(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor) -> torch.Tensor:
        return self.predict(images, gender, race)[0]  # (B, 5)

    def predict(self, images: torch.Tensor, gender: torch.Tensor, race: torch.Tensor):
        """(B, 5) group probabilities, the weighted average of the members', and (B, 51) the age distribution:
        the weighted mix of the exact-age members' (weights renormalised among them), or of every member's
        group probabilities spread over their ages when no member scores exact ages."""
        groups, ages = self.member_outputs(images, gender, race)
        scores_ages = torch.tensor([m.target == "age" for m in self.members], device=images.device)
        age_weights = self.weights * scores_ages if bool(scores_ages.any()) else self.weights
        age_weights = age_weights / age_weights.sum()
        probs = (groups * self.weights.view(-1, 1, 1)).sum(dim=0)  # (B, 5)
        return probs, (ages * age_weights.view(-1, 1, 1)).sum(dim=0)  # (B, 5), (B, 51)


def age_summary(distribution: torch.Tensor, low: float = 0.1, high: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 51) distributions over the ages 10-60 -> (B,) the median age and (B, 2) the `low` and `high` quantiles,
    each the youngest age whose cumulative probability reaches it. The median, not the mean: the point estimate
    with the least expected absolute error (out of fold, the shipped recipe's age MAE 4.61 -> 4.50 years)."""
    grid = torch.tensor(AGES, dtype=distribution.dtype, device=distribution.device)
    cdf = distribution.cumsum(dim=1)
    quantiles = torch.tensor([0.5, low, high], dtype=distribution.dtype, device=distribution.device)
    below = (cdf.unsqueeze(1) < quantiles.view(1, 3, 1)).to(distribution.dtype).sum(dim=2)  # (B, 3) ages below
    ages = (grid[0] + below).clamp(max=grid[-1])
    return ages[:, 0], ages[:, 1:]


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


def build_member(member: MemberConfig | dict | str, input_size: int, mean=(127.5,) * 3, std=(64.0,) * 3,
                 pretrained: bool = False) -> AgeCNN:
    """The public factory: an AgeCNN for a member config (or its name) fed images of `input_size` (the run's and
    the graph's); it sees them at its own `input_size` where the config names one.

    `pretrained` starts a "face" backbone from dlib's published weights, normalised as dlib normalises
    ((x - its channel means) / 256), and a "lite" one from EfficientNet-Lite0's ImageNet weights ((x - 127) /
    128), instead of with `mean` and `std`; a checkpoint restores both anyway."""
    if isinstance(member, str):
        member = member_by_name(member)
    elif isinstance(member, dict):
        member = MemberConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in member.items()})
    if pretrained and member.arch == "face":
        from training.dlib_weights import dlib_state_dict

        state, settings = dlib_state_dict()
        mean, std = settings["means"], (256.0,) * 3
    elif pretrained and member.arch == "lite":
        from training.lite_weights import LITE_MEAN, LITE_STD, lite_state_dict

        state, mean, std = lite_state_dict(), (LITE_MEAN,) * 3, (LITE_STD,) * 3
    model = AgeCNN(member.input_size or input_size, tuple(float(p) for p in member.dropout), mean, std,
                   arch=member.arch, width=member.width, depth=tuple(member.depth), target=member.target,
                   head_hidden=member.head_hidden, head_dropout=member.head_dropout, crop=member.crop,
                   backbone_lr=member.backbone_lr, freeze=member.freeze, source_size=input_size,
                   levels=member.levels)
    if pretrained and member.arch in ("face", "lite"):
        model.features.load_state_dict(state)
    return model


def age_distribution(age: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B,) ages in years -> (B, 51) a Gaussian over the ages 10-60 around each, normalised to sum 1."""
    grid = torch.tensor(AGES, dtype=torch.float32, device=age.device)
    weights = torch.exp(-0.5 * ((grid.unsqueeze(0) - age.unsqueeze(1).float()) / sigma) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def age_distribution_loss(logits: torch.Tensor, age: torch.Tensor, sigma: float) -> torch.Tensor:
    """Label-distribution learning: KL(Gaussian around the true age || softmax over ages), batch mean."""
    return F.kl_div(logits.log_softmax(dim=1), age_distribution(age, sigma), reduction="batchmean")
