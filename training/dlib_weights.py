"""Read dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) into a PyTorch state_dict.

The weights come with PyPI's `face_recognition_models` (public domain, trained by Davis King on ~3 M faces of
7,485 identities for face recognition, no age labels). Neither dlib nor that package is imported: the file is
located with importlib and parsed here, following dlib's own serialization code (dlib/serialize.h,
dlib/dnn/core.h, layers.h, input.h, loss.h, cuda/tensor.h).

    python -m training.dlib_weights     # prints the file, its sha256 and the layer records read from it
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from serving.face import MODELS_LICENSE, MODELS_PACKAGE, find_model_file

WEIGHTS_FILE = "dlib_face_recognition_resnet_model_v1.dat"
# dlib's network definition (dlib/examples/dnn_face_recognition_ex.cpp): 32-channel stem, then stages of
# (channels, blocks); the first block of every stage but the first halves the map.
STEM_CHANNELS = 32
BN_EPS = 1e-5  # BatchNorm2d's default; a dlib affine layer is loaded as running variance 1 - BN_EPS
STAGES = ((32, 3), (64, 4), (128, 3), (256, 3), (256, 1))


class DlibFormatError(ValueError):
    """The file is not the network this reader expects."""


def find_weights_file(name: str = WEIGHTS_FILE) -> Path:
    """The weights file inside the installed face_recognition_models package (found as serving finds its
    landmark model: without importing the package)."""
    return find_model_file(name)


def provenance(path: Path) -> dict:
    """Name, sha256 and license of a starting-weights file, for the exported JSON."""
    return {"name": f"dlib {Path(path).stem}", "file": Path(path).name,
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), "license": MODELS_LICENSE,
            "source": f"PyPI {MODELS_PACKAGE}"}


class Stream:
    """dlib's serialization primitives over a byte buffer."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"file ends at byte {len(self.data)}, needed {n} more at {self.pos}")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        """Compact integer: a control byte (size in the low 4 bits, 0x80 = negative), then little-endian bytes;
        zero is one byte of payload, so a size of 0 never occurs."""
        control = self.take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8 or control & 0x70:
            raise DlibFormatError(f"bad integer control byte {control:#x} at {self.pos - 1}")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        """dlib's float_details: integer mantissa, then integer exponent (value = mantissa * 2**exponent)."""
        mantissa, exponent = self.int(), self.int()
        return float(np.ldexp(np.float64(mantissa), exponent))

    def bool(self) -> bool:
        value = self.take(1)
        if value not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {value!r} at {self.pos - 1}")
        return value == b"1"

    def string(self) -> str:
        return self.take(self.int()).decode("ascii")

    def tensor(self) -> np.ndarray:
        """Version 2, then num_samples, k, nr, nc, then raw little-endian float32: an (n, k, nr, nc) array."""
        version = self.int()
        if version != 2:
            raise DlibFormatError(f"tensor version {version} at {self.pos}, expected 2")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(shape).copy()

    def alias_tensor(self) -> tuple[int, ...]:
        """An alias_tensor holds only a shape: version 1, then four dims."""
        if self.int() != 1:
            raise DlibFormatError(f"alias_tensor version at {self.pos}, expected 1")
        return tuple(self.int() for _ in range(4))

    def expect(self, *names: str) -> str:
        name = self.string()
        if name not in names:
            raise DlibFormatError(f"found layer {name!r} at {self.pos}, expected {' or '.join(names)}")
        return name


def read_con(s: Stream) -> dict:
    """A con_ record: params (filters then biases), settings, the filter and bias shapes, multipliers."""
    version = s.expect("con_4", "con_5", "con_6")
    params = s.tensor().ravel()
    filters, rows, cols, stride_y, stride_x, pad_y, pad_x = (s.int() for _ in range(7))
    weight_shape, _ = s.alias_tensor(), s.alias_tensor()  # filters, biases
    for _ in range(4):  # learning-rate and weight-decay multipliers
        s.float()
    use_bias = s.bool() if version in ("con_5", "con_6") else True
    if version == "con_6":
        s.bool()  # use_relu: a ReLU fused by dlib's own layer fusing, never set in a saved training net
    n_weight = int(np.prod(weight_shape))
    if weight_shape[0] != filters or len(params) != n_weight + (filters if use_bias else 0):
        raise DlibFormatError(f"con_ params hold {len(params)} values for filters {weight_shape}")
    return {"kind": "con", "weight": params[:n_weight].reshape(weight_shape),  # (out, in, rows, cols) as torch
            "bias": params[n_weight:] if use_bias else np.zeros(filters, np.float32),
            "kernel": (rows, cols), "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)}


def read_affine(s: Stream) -> dict:
    """An affine_ record: params = [gamma (scale) x C, beta (shift) x C], then their shapes, mode, disabled."""
    version = s.expect("affine_", "affine_2")
    params = s.tensor().ravel()
    gamma_shape, beta_shape = s.alias_tensor(), s.alias_tensor()
    s.int()  # mode: per channel (CONV_MODE) or per element
    if version == "affine_2" and s.bool():
        raise DlibFormatError("a disabled affine_ layer is not supported")
    channels = int(np.prod(gamma_shape))
    if channels != int(np.prod(beta_shape)) or len(params) != 2 * channels:
        raise DlibFormatError(f"affine_ params hold {len(params)} values for {channels} channels")
    return {"kind": "affine", "scale": params[:channels], "shift": params[channels:]}


def read_relu(s: Stream) -> dict:
    if s.expect("relu_", "relu_2") == "relu_2" and s.bool():
        raise DlibFormatError("a disabled relu_ layer is not supported")
    return {"kind": "relu"}


def read_pool(s: Stream, kind: str) -> dict:
    s.expect(f"{kind}_2")
    rows, cols, stride_y, stride_x, pad_y, pad_x = (s.int() for _ in range(6))
    return {"kind": kind, "kernel": (rows, cols), "stride": (stride_y, stride_x), "padding": (pad_y, pad_x)}


def read_fc(s: Stream) -> dict:
    version = s.expect("fc_2", "fc_3")
    outputs, inputs = s.int(), s.int()
    params = s.tensor().ravel()
    s.alias_tensor(), s.alias_tensor()  # weight and bias shapes (the sizes are checked below)
    s.int()  # bias mode
    for _ in range(4):
        s.float()
    if version == "fc_3" and s.bool():
        raise DlibFormatError("fc_ with a bias is not the network this reader expects (fc_no_bias)")
    if len(params) < inputs * outputs:
        raise DlibFormatError(f"fc_ params hold {len(params)} values for {inputs} x {outputs}")
    # dlib multiplies row vectors by an (inputs, outputs) matrix; torch's Linear weight is (outputs, inputs)
    return {"kind": "fc", "weight": params[:inputs * outputs].reshape(inputs, outputs).T.copy()}


LAYER_READERS = {
    "con": read_con, "affine": read_affine, "relu": read_relu, "fc": read_fc,
    "max_pool": lambda s: read_pool(s, "max_pool"), "avg_pool": lambda s: read_pool(s, "avg_pool"),
    "add_prev": lambda s: {"kind": "add_prev", "name": s.expect("add_prev_")},
}


def network_nodes() -> list[tuple[str, str]]:
    """dlib's anet_type from the outside in, as (node, layer) pairs: "layer" nodes are add_layer records of that
    layer kind, "tag" and "skip" nodes hold no layer. Mirrors the C++ template in dnn_face_recognition_ex.cpp."""
    def block() -> list:  # BN<con<N,3,3,1,1,relu<BN<con<N,3,3,s,s,SUBNET>>>>>, whatever the stride s
        return [("layer", "affine"), ("layer", "con"), ("layer", "relu"), ("layer", "affine"), ("layer", "con")]

    def ares() -> list:  # relu<add_prev1<block<tag1<SUBNET>>>>
        return [("layer", "relu"), ("layer", "add_prev"), *block(), ("tag", "")]

    def ares_down() -> list:  # relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<..,2,tag1<SUBNET>>>>>>>
        return [("layer", "relu"), ("layer", "add_prev"), ("layer", "avg_pool"), ("skip", ""), ("tag", ""),
                *block(), ("tag", "")]

    nodes = [("layer", "fc"), ("layer", "avg_pool")]
    for _, blocks in reversed(STAGES[1:]):  # outermost stage first
        nodes += ares() * (blocks - 1) + ares_down()
    nodes += ares() * STAGES[0][1]
    return nodes + [("layer", "max_pool"), ("layer", "relu"), ("layer", "affine"), ("input", "con")]


def read_network(path: str | Path) -> tuple[dict, list[dict]]:
    """Parse the file: (input settings, layer records from the input outwards).

    dlib writes a network from the outside in: each wrapper writes its version, then its whole subnetwork,
    then its own layer and state. So the versions come first, outermost first; the input layer sits in the
    middle; the layers follow from the input outwards, each with its state tensors after it."""
    s = Stream(Path(path).read_bytes())
    if s.int() != 1:
        raise DlibFormatError("expected an add_loss_layer (version 1) at the start")
    if s.expect("loss_metric_", "loss_metric_2") == "loss_metric_2":
        s.float(), s.float()  # margin and distance threshold of the training loss
    nodes = network_nodes()
    versions = []
    for node, _ in nodes:
        version = s.int()
        allowed = {"layer": (1, 2), "tag": (1,), "skip": (1,), "input": (2, 3)}[node]
        if version not in allowed:
            raise DlibFormatError(f"unexpected {node} version {version} at byte {s.pos}")
        versions.append(version)
    s.expect("input_rgb_image_sized")
    means = tuple(s.float() for _ in range(3))  # avg_red, avg_green, avg_blue subtracted from 0..255 pixels
    size = (s.int(), s.int())
    records = []
    for (node, kind), version in reversed(list(zip(nodes, versions))):
        if node in ("tag", "skip"):
            continue  # nothing after their subnetwork
        records.append(LAYER_READERS[kind](s))
        s.bool(), s.bool(), s.bool()  # this_layer_setup_called, gradient_input_is_stale, output disabled
        s.tensor(), s.tensor()  # x_grad, cached_output (empty in a saved net)
        if node == "input":
            s.tensor()  # grad_final
            if version == 3:
                s.int()  # sample expansion factor
        elif version == 2:
            s.tensor()  # params_grad
    if s.pos != len(s.data):
        raise DlibFormatError(f"{len(s.data) - s.pos} bytes left after the last layer")
    return {"means": means, "size": size}, records


def dlib_state_dict(path: str | Path | None = None) -> tuple[dict, dict]:
    """The file as a state_dict for training.models.FaceResNet, plus its input settings (means, size).

    Every dlib affine (scale, shift) becomes a BatchNorm2d with running mean 0 and running variance 1 - eps,
    so that the module in eval mode computes exactly dlib's scale * x + shift and can be fine-tuned as a
    batch-normalised network."""
    import torch

    settings, records = read_network(path or find_weights_file())
    it = iter(records)
    state: dict[str, torch.Tensor] = {}

    def take(kind: str) -> dict:
        record = next(it)
        if record["kind"] != kind:
            raise DlibFormatError(f"layer order: found {record['kind']}, expected {kind}")
        return record

    def conv(prefix: str) -> None:
        record = take("con")
        state[f"{prefix}.weight"] = torch.from_numpy(record["weight"])
        state[f"{prefix}.bias"] = torch.from_numpy(record["bias"])

    def norm(prefix: str) -> None:
        record = take("affine")
        channels = len(record["scale"])
        state[f"{prefix}.weight"] = torch.from_numpy(record["scale"])
        state[f"{prefix}.bias"] = torch.from_numpy(record["shift"])
        state[f"{prefix}.running_mean"] = torch.zeros(channels)
        state[f"{prefix}.running_var"] = torch.full((channels,), 1.0 - BN_EPS)
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    conv("stem.0"), norm("stem.1"), take("relu"), take("max_pool")
    for stage, (_, blocks) in enumerate(STAGES):
        for b in range(blocks):
            prefix = f"stages.{stage}.{b}"
            conv(f"{prefix}.conv1"), norm(f"{prefix}.bn1"), take("relu"), conv(f"{prefix}.conv2"), norm(f"{prefix}.bn2")
            if stage > 0 and b == 0:
                take("avg_pool")
            take("add_prev"), take("relu")
    take("avg_pool")
    state["descriptor.weight"] = torch.from_numpy(take("fc")["weight"])
    return state, settings


def main(argv: list[str] | None = None) -> None:
    path = find_weights_file()
    settings, records = read_network(path)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["kind"]] = counts.get(record["kind"], 0) + 1
    floats = sum(r[k].size for r in records for k in ("weight", "bias", "scale", "shift") if k in r)
    print(f"{path}\n{provenance(path)}\ninput {settings}\nlayers {counts}\n{floats:,} parameters")


if __name__ == "__main__":
    main()
