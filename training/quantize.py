"""int8 export step: post-training static quantization of an exported age graph with ONNX Runtime's tooling.

    agegroup-export age --run-dir runs/face --int8                    # train -> float graph -> int8 graph
    agegroup-export quantize --model float/age_ensemble.onnx --data-dir ../shared/data/faces --out-dir exported

The float graph is prepared to quantize well (each member's input normalisation folded into its first
convolution), calibrated on faces of the training split (never the validation split), and quantized in QDQ
format: int8 per-channel convolution weights, uint8 activations, everything after the backbones (heads,
softmaxes, weighted average, age and age range) left in float. What ONNX Runtime would run in float between
a dequantization and a quantization is then made to run on the uint8 codes, exactly: the pixel ops in front
of the first convolutions, every Pad, and a normalisation that keeps the pixels' codes. The result is held to
the float graph on real faces (label agreement, max |delta prob|) before it is written.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from training.train import file_sha256

# What is quantized: the backbones. Their convolutions, and the ops between them, so that int8 tensors flow
# from one convolution to the next without a float round trip (a ReLU or a max pool of uint8 stays uint8).
QUANTIZED_OPS = ["Conv", "Relu", "Clip", "Add", "MaxPool", "AveragePool", "Pad"]
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                       "entropy": CalibrationMethod.Entropy}


@dataclass(frozen=True)
class QuantSettings:
    """How a float graph becomes int8; the defaults are what measured best on a 2-core AVX2 EPYC."""

    method: str = "minmax"  # activation ranges: minmax, percentile (99.999) or entropy
    reduce_range: bool = True  # 7-bit weights: without VNNI, 8-bit u8 x s8 products saturate (11 % labels moved)
    images: int = 256  # calibration faces, drawn from the training split
    seed: int = 0  # which training faces calibrate
    batch: int = 16  # faces per calibration run

    def describe(self) -> dict:
        return {"format": "QDQ (onnxruntime.quantization.quantize_static)", "quantized_ops": QUANTIZED_OPS,
                "weights": "int8 per output channel", "reduce_range": self.reduce_range,
                "depthwise_convolutions": "full-range int8 weights (MLAS accumulates them in 32 bits)",
                "activations": "uint8, asymmetric",
                "first_convolutions": "7-bit int8 weights whatever reduce_range says (u8 x s8 pairs of raw pixels "
                "stay under 2^15 without VNNI), biases corrected for the weights' rounding on the folded mean",
                "calibration_method": self.method, "settings": asdict(self)}


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute (an int, a list of ints, bytes...), `default` where it is not set."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def constant_of(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer, reached directly or through Identity nodes; None if it is not constant."""
    producers = producers_of(model)
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def producers_of(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {out: node for node in model.graph.node for out in node.output}


def consumers_of(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def uint8_inputs_of(model: onnx.ModelProto) -> set[str]:
    """The names of the graph's uint8 inputs (the image)."""
    return {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.UINT8}


def pad_value(model: onnx.ModelProto, pad: onnx.NodeProto) -> np.ndarray | None:
    """A Pad node's constant value: zeros where it has none, None where it is not a constant."""
    return constant_of(model, pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)


def per_tensor_params(model: onnx.ModelProto, node: onnx.NodeProto) -> tuple[float, np.ndarray] | None:
    """A Quantize/DequantizeLinear's one scale and zero point; None where they are per channel or not constant."""
    if len(node.input) < 3:
        return None
    scale, zero = constant_of(model, node.input[1]), constant_of(model, node.input[2])
    return None if scale is None or zero is None or scale.size != 1 or zero.size != 1 else (scale.item(), zero)


def rewire(model: onnx.ModelProto, old: str, new: str) -> None:
    """Every node that reads tensor `old` reads `new` instead, in place."""
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def rebuild(model: onnx.ModelProto, removed: set[str], added: list | None = None) -> None:
    """The graph's nodes less those named in `removed`, plus `added`, in an order ONNX accepts; then what
    nothing reads any more is pruned. In place."""
    nodes = [n for n in model.graph.node if n.name not in removed]
    del model.graph.node[:]
    model.graph.node.extend(topological(nodes + added, model) if added else nodes)
    prune_dead(model)


def fold_input_normalization(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], list[str]]:
    """Fold every `Conv((x - mean) / std)` into `Conv'(x)`, in place. Returns the convolutions that now read x
    itself (name: the mean per input channel, which correct_folded_biases needs), and the names of those that
    read x - mean.

    The division folds exactly into the weights (W / std per input channel). The mean folds into the bias
    (b - sum W * mean / std) only where the convolution pads nothing: a zero-padded border would stand for
    x = 0 instead of x = mean. A padding convolution keeps its Sub, so the graph computes the same function
    either way. Folding leaves the convolution reading raw 0-255 pixels, which quantize exactly."""
    producers = producers_of(model)
    consumers = consumers_of(model)
    inits = {init.name: init for init in model.graph.initializer}
    raw, scaled = {}, []
    for conv in [n for n in model.graph.node if n.op_type == "Conv"]:
        div = producers.get(conv.input[0])
        if div is None or div.op_type != "Div" or len(consumers[div.output[0]]) != 1 or conv.input[1] not in inits:
            continue
        sub = producers.get(div.input[0])
        std = constant_of(model, div.input[1])
        if sub is None or sub.op_type != "Sub" or std is None or len(consumers[sub.output[0]]) != 1:
            continue
        mean = constant_of(model, sub.input[1])
        if mean is None:
            continue
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)  # (O, C, kh, kw)
        channels = weight.shape[1]
        std, mean = np.broadcast_to(std.reshape(-1), (channels,)), np.broadcast_to(mean.reshape(-1), (channels,))
        divided = weight / std.reshape(1, -1, 1, 1)
        padless = not any(attribute(conv, "pads", [0])) and attribute(conv, "auto_pad", b"NOTSET") in (
            b"", b"NOTSET", b"VALID")
        bias = constant_of(model, conv.input[2]) if len(conv.input) > 2 else None
        bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
        tag = f"{conv.name}.folded"
        model.graph.initializer.extend([numpy_helper.from_array(divided.astype(np.float32), f"{tag}.weight")])
        if padless:  # both steps folded: the convolution reads the un-normalised input
            bias = bias - (divided * mean.reshape(1, -1, 1, 1)).sum(axis=(1, 2, 3))
            conv.input[0] = sub.input[0]
            raw[conv.name] = mean.astype(np.float64)
        else:  # only the division folded: the convolution reads x - mean
            conv.input[0] = sub.output[0]
            scaled.append(conv.name)
        model.graph.initializer.extend([numpy_helper.from_array(bias.astype(np.float32), f"{tag}.bias")])
        conv.input[1] = f"{tag}.weight"
        if len(conv.input) > 2:
            conv.input[2] = f"{tag}.bias"
        else:
            conv.input.append(f"{tag}.bias")
    prune_dead(model)  # the Sub and Div no convolution reads any more, and their constants
    return raw, scaled


def correct_folded_biases(quantized: onnx.ModelProto, folded: onnx.ModelProto, means: dict[str, np.ndarray]) -> None:
    """Give each convolution that reads raw pixels the bias its quantized weights need, in place.

    Folding the mean made the bias b - sum(W * mean): right for the float weights W, but the int8 graph
    multiplies by the quantized W + e, and on uncentred 0-255 pixels the error's mean part, sum(e * mean), is
    a constant shift of each output channel. The bias b - sum((W + e) * mean) takes it back, so the convolution
    computes (W + e) * (x - mean) + b, as it would have on the centred input."""
    float_inits = {init.name: init for init in folded.graph.initializer}
    float_convs = {n.name: n for n in folded.graph.node if n.op_type == "Conv"}
    producers = producers_of(quantized)
    inits = {init.name: init for init in quantized.graph.initializer}
    for conv in [n for n in quantized.graph.node if n.op_type == "Conv" and n.name in means and len(n.input) > 2]:
        weight_dq, bias_dq = producers.get(conv.input[1]), producers.get(conv.input[2])
        if weight_dq is None or bias_dq is None or bias_dq.input[0] not in inits:
            continue
        codes, scale = numpy_helper.to_array(inits[weight_dq.input[0]]), constant_of(quantized, weight_dq.input[1])
        zero = constant_of(quantized, weight_dq.input[2]) if len(weight_dq.input) > 2 else np.zeros_like(scale)
        shape = (-1,) + (1,) * (codes.ndim - 1)
        dequantized = (codes.astype(np.float64) - zero.astype(np.float64).reshape(shape)) * scale.reshape(shape)
        weight = numpy_helper.to_array(float_inits[float_convs[conv.name].input[1]]).astype(np.float64)
        shift = ((weight - dequantized) * means[conv.name].reshape(1, -1, 1, 1)).sum(axis=(1, 2, 3))
        bias_scale = constant_of(quantized, bias_dq.input[1]).astype(np.float64)
        bias = numpy_helper.to_array(inits[bias_dq.input[0]]).astype(np.float64) * bias_scale + shift
        corrected = np.round(bias / bias_scale).astype(np.int32)
        inits[bias_dq.input[0]].CopyFrom(numpy_helper.from_array(corrected, bias_dq.input[0]))


class FaceBatches(CalibrationDataReader):
    """Feeds the graph's own inputs, a batch at a time: (N, H, W, 3) uint8 faces with their gender and race."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.position = 0

    def get_next(self) -> dict | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def backbone_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that feed a convolution, directly or through others, and the convolutions: what
    quantization may touch. Everything downstream of the last convolutions (pooling, heads, softmax, the
    weighted average, age and age range) stays float."""
    producers = producers_of(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    upstream, stack = set(), list(convs)
    while stack:
        node = stack.pop()
        if node.name in upstream:
            continue
        upstream.add(node.name)
        stack += [producers[i] for i in node.input if i in producers]
    return sorted(upstream)


def quantize_graph(float_model: onnx.ModelProto, out_path: Path, faces: Faces,
                   settings: QuantSettings = QuantSettings()) -> dict:
    """Fold the input normalisation, calibrate on `faces` (training-split faces), quantize and write the int8
    graph to out_path, its first convolutions fed the uint8 pixels where they read them as they are."""
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    raw, scaled = fold_input_normalization(model)
    keep = set(backbone_nodes(model))
    exclude = [n.name for n in model.graph.node if n.name not in keep]
    # The first convolutions see the full 0-255 range, where 8-bit u8 x s8 pairs overflow int16 without VNNI
    # (2 x 255 x 127 > 32767): their weights stay 7-bit (2 x 255 x 64 < 32767) even with reduce_range off. On
    # uncentred pixels 7-bit weights cost labels unless their biases are corrected (correct_folded_biases).
    firsts = [n for n in model.graph.node if n.name in raw or n.name in scaled]
    overrides = {n.input[1]: [{"reduce_range": True}] for n in firsts}
    # raw 0-255 pixels in: scale 1 and zero point 0 hold them exactly, so the uint8 image can feed them as is
    pixels = {"scale": np.array(1.0, np.float32), "zero_point": np.array(0, np.uint8)}
    overrides.update({n.input[0]: [pixels] for n in firsts if n.name in raw})
    overrides.update(code_preserving_scales(model))
    # Depthwise convolutions (one input channel a filter) run in MLAS's own kernel, which accumulates in 32 bits:
    # no saturation to avoid, and 7-bit weights there cost a Lite0 member 5 % of its labels (89.3 against 94.7 %).
    depthwise = [n for n in model.graph.node if n.op_type == "Conv" and n.name in keep and attribute(n, "group", 1) > 1]
    overrides.update({n.input[1]: [{"reduce_range": False, "axis": 0}] for n in depthwise})  # per output channel
    extra = {"CalibPercentile": 99.999, "TensorQuantOverrides": overrides}
    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        onnx.save(model, str(folded))
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(folded), str(prepared))  # shape inference and graph clean-up, ORT's first step
        quantize_static(str(prepared), str(out_path), FaceBatches(faces.feeds(settings.batch)),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                        per_channel=True, reduce_range=settings.reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                        calibrate_method=CALIBRATION_METHODS[settings.method], extra_options=extra)
    quantized = onnx.load(str(out_path))
    correct_folded_biases(quantized, model, raw)
    direct = uint8_front(quantized)
    kept = drop_code_preserving_normalization(quantized)
    pads = uint8_pads(quantized)
    onnx.save(quantized, str(out_path))
    return {"folded_convolutions": len(raw) + len(scaled), "uint8_fed_convolutions": direct,
            "code_preserving_normalizations": kept, "uint8_pads": pads}


def code_preserving_scales(model: onnx.ModelProto) -> dict[str, list[dict]]:
    """Quantization overrides for normalised pixels that no convolution folded (one padded first, as
    EfficientNet-Lite's "SAME" stem does): (x - mean) / std quantized with scale 1 / std and zero point mean
    has x's own codes, so drop_code_preserving_normalization can remove the float Sub and Div. Needs one
    whole-number mean for every channel, 0-255, and one std."""
    producers = producers_of(model)
    consumers = consumers_of(model)
    uint8_inputs = uint8_inputs_of(model)
    overrides = {}
    for div in [n for n in model.graph.node if n.op_type == "Div"]:
        sub = producers.get(div.input[0])
        if sub is None or sub.op_type != "Sub" or sub.input[0] not in producers:
            continue
        cast = producers[sub.input[0]]
        mean, std = constant_of(model, sub.input[1]), constant_of(model, div.input[1])
        if cast.op_type != "Cast" or not reaches(producers, cast.input[0], uint8_inputs) or mean is None \
                or std is None or np.ptp(mean) or np.ptp(std) or not 0 <= mean.flat[0] <= 255 \
                or mean.flat[0] != round(float(mean.flat[0])) or std.flat[0] <= 0:
            continue
        codes = {"scale": np.array(1.0 / std.flat[0], np.float32), "zero_point": np.array(mean.flat[0], np.uint8)}
        overrides[div.output[0]] = [codes]
        for pad in consumers.get(div.output[0], []):  # a zero padding keeps the codes (it pads with the mean's)
            if pad.op_type == "Pad" and zero_padding(model, pad):
                overrides[pad.output[0]] = [codes]
    return overrides


def zero_padding(model: onnx.ModelProto, pad: onnx.NodeProto) -> bool:
    """Whether a Pad node pads with constant zeros."""
    if attribute(pad, "mode", b"constant") != b"constant":
        return False
    value = pad_value(model, pad)
    return value is not None and not value.any()


def drop_code_preserving_normalization(model: onnx.ModelProto) -> int:
    """Remove each DequantizeLinear (or Cast of uint8 pixels) -> Sub -> Div -> QuantizeLinear chain that gives
    every uint8 code back unchanged (code_preserving_scales arranges it), in place: its readers read the codes it
    was given. Checked on all 256 codes, so a chain that would move one stays. Returns how many were removed."""
    producers = producers_of(model)
    uint8_inputs = uint8_inputs_of(model)
    removed = set()
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        div = producers.get(q.input[0])
        sub = producers.get(div.input[0]) if div is not None and div.op_type == "Div" else None
        dq = producers.get(sub.input[0]) if sub is not None and sub.op_type == "Sub" else None
        if dq is not None and dq.op_type == "Cast" and reaches(producers, dq.input[0], uint8_inputs):
            source = [np.array(1.0, np.float32), np.array(0, np.uint8)]  # uint8 pixels cast to float: codes as is
        elif dq is not None and dq.op_type == "DequantizeLinear":
            source = [constant_of(model, name) for name in dq.input[1:3]]
        else:
            continue
        values = source + [constant_of(model, name) for name in (sub.input[1], div.input[1], *q.input[1:3])]
        if any(v is None for v in values) or values[0].size != 1 or values[4].size != 1:
            continue
        (in_scale, in_zero, mean, std, out_scale, out_zero) = values
        codes = np.arange(256, dtype=np.float32)
        normalised = ((codes - np.float32(in_zero.item())) * in_scale - mean.reshape(-1, 1)) / std.reshape(-1, 1)
        back = np.clip(np.rint(normalised.astype(np.float32) / out_scale) + out_zero.item(), 0, 255)
        if not (back == codes).all():
            continue
        rewire(model, q.output[0], dq.input[0])
        removed.add(q.name)
    rebuild(model, removed)
    return len(removed)


PIXEL_OPS = ("Transpose", "Slice", "Resize")  # ops that move or resample pixels, which ONNX Runtime runs on uint8


def uint8_front(model: onnx.ModelProto) -> int:
    """Drop the float round trip in front of the first convolutions, in place: where a QuantizeLinear of scale 1
    and zero point 0 reads pixels that come from the uint8 image through a Cast to float and pixel ops only
    (crop, resize), run those ops on the uint8 image instead and let the DequantizeLinear read their output.
    Returns how many such QuantizeLinear nodes were removed."""
    producers = producers_of(model)
    uint8_inputs = uint8_inputs_of(model)
    removed, added = set(), []
    def unit(node) -> bool:  # a Quantize/DequantizeLinear with scale 1 and zero point 0: uint8 <-> float as is
        params = per_tensor_params(model, node)
        return params is not None and params[1].dtype == np.uint8 and params[0] == 1.0 and params[1].item() == 0

    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and unit(n)]:
        chain, name = [], q.input[0]  # pixel ops between the float pixels and the QuantizeLinear, last first
        while name in producers and producers[name].op_type in PIXEL_OPS:
            chain.append(producers[name])
            name = producers[name].input[0]
        start = producers.get(name)  # a Cast of uint8 pixels to float, or their exact DequantizeLinear
        if start is None or not (start.op_type == "Cast" or start.op_type == "DequantizeLinear" and unit(start)) \
                or not reaches(producers, start.input[0], uint8_inputs):
            continue
        source = start.input[0]
        for node in reversed(chain):  # a uint8 copy of each pixel op
            copy = onnx.helper.make_node(node.op_type, [source, *node.input[1:]], [f"{node.output[0]}.u8"],
                                         name=f"{node.name}.u8")
            copy.attribute.extend(node.attribute)
            added.append(copy)
            source = copy.output[0]
        rewire(model, q.output[0], source)  # the DequantizeLinear (and anything else) reads the uint8 pixels
        removed.add(q.name)
    rebuild(model, removed, added)
    return len(removed)


def uint8_pads(model: onnx.ModelProto) -> int:
    """Pad quantized tensors as they are, in place: a DequantizeLinear -> Pad -> QuantizeLinear chain with one
    scale and zero point becomes a Pad of the uint8 tensor with the pad value's uint8 code (exact wherever that
    value is a code: zero padding pads with the zero point). ONNX Runtime fuses no Pad into its int8 kernels, so
    each would run in float between a dequantization and a quantization, on one thread; a shortcut's channel
    padding, a "SAME" padding. A Pad whose output is not requantized gets the DequantizeLinear after it instead.
    Returns how many Pad nodes now run on uint8."""
    producers = producers_of(model)
    consumers = consumers_of(model)

    removed, added, count = set(), [], 0
    for pad in [n for n in model.graph.node if n.op_type == "Pad" and attribute(n, "mode", b"constant") == b"constant"]:
        dq = producers.get(pad.input[0])
        quant = per_tensor_params(model, dq) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if quant is None:
            continue
        (scale, zero), readers = quant, consumers.get(pad.output[0], [])
        value = pad_value(model, pad)
        if value is None or value.size != 1:
            continue
        code = value.item() / scale + int(zero.item())
        info = np.iinfo(zero.dtype)
        if abs(code - round(code)) > 1e-4 or not info.min <= round(code) <= info.max:
            continue
        requantized = readers and all(r.op_type == "QuantizeLinear" and (p := per_tensor_params(model, r)) is not None
                                      and p[0] == scale and p[1] == zero for r in readers)
        model.graph.initializer.extend([numpy_helper.from_array(np.array(round(code), zero.dtype), f"{pad.name}.code")])
        out = f"{pad.output[0]}.u8"
        added.append(onnx.helper.make_node("Pad", [dq.input[0], pad.input[1], f"{pad.name}.code", *pad.input[3:]],
                                           [out], name=f"{pad.name}.u8", mode="constant"))
        if requantized:  # the QuantizeLinear nodes go; their readers read the uint8 Pad
            for q in readers:
                rewire(model, q.output[0], out)
                removed.add(q.name)
        else:  # the float readers get the same values through a DequantizeLinear after the Pad
            added.append(onnx.helper.make_node("DequantizeLinear", [out, *dq.input[1:]], [pad.output[0]],
                                               name=f"{pad.name}.dq"))
        removed.add(pad.name)
        count += 1
    rebuild(model, removed, added)
    return count


def reaches(producers: dict, name: str, sources: set[str]) -> bool:
    """Whether tensor `name` is one of `sources` seen through pixel ops only."""
    while name not in sources:
        if name not in producers or producers[name].op_type not in PIXEL_OPS:
            return False
        name = producers[name].input[0]
    return True


def topological(nodes: list, model: onnx.ModelProto) -> list:
    """`nodes` ordered so that each comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    ordered, pending = [], list(nodes)
    while pending:
        left = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {left[0].name}")
        pending = left
    return ordered


def prune_dead(model: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nothing reads (Identity aliases included), then initializers nothing reads."""
    outputs = {o.name for o in model.graph.output}
    while True:
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


@dataclass
class Faces:
    """Decoded faces at the graph's input size with what the graph and the metrics need."""

    images: np.ndarray  # (N, H, W, 3) uint8
    gender: np.ndarray  # (N,) int64
    race: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64 age group
    ages: np.ndarray  # (N,) years

    def feeds(self, batch: int = 32) -> list[dict]:
        return [{"image": self.images[i:i + batch], "gender": self.gender[i:i + batch],
                 "race": self.race[i:i + batch]} for i in range(0, len(self.images), batch)]


COMPARISON_FRACTION = 0.12  # a run on all faces: the share of them the int8 graph is compared with the float one on


def split_faces(data_dir: Path, size: int, val_fraction: float, split_seed: int, calibration: int, seed: int,
                data_sha256: str | None = None, folds: int = 0, fold: int = 0) -> tuple[Faces | None, Faces]:
    """The run's own split of data.csv: `calibration` faces drawn from its training split, and its whole
    validation split (to compare the graphs on; never used to calibrate; calibration 0: None and the validation
    faces alone; `folds`/`fold`: a cross-validation run's split). A run on all of data.csv (`val_fraction` 0)
    validated no face: the graphs are compared on the faces of the default hold-out instead (seen in training,
    so their accuracy there is not a validation figure), and calibrated on the others. Checks that data.csv is
    the run's."""
    from serving.table import read_face_table
    from training.config import AGE_GROUPS, AGES
    from training.data import load_images, stratified_split, validation_split

    csv = Path(data_dir) / "data.csv"
    table = read_face_table(csv, labels=len(AGE_GROUPS), ages=(AGES[0], AGES[-1]))
    if data_sha256 and file_sha256(csv) != data_sha256:
        raise ValueError(f"{csv} is not the data.csv the model was trained on (sha256 differs): its split would "
                         "not be the model's, and calibration could see validation faces")
    train_idx, val_idx = validation_split(table["Label"].to_numpy(), val_fraction, split_seed, folds, fold)
    if not len(val_idx):
        train_idx, val_idx = stratified_split(table["Label"].to_numpy(), COMPARISON_FRACTION, split_seed)
    rng = np.random.default_rng(seed)
    calib_idx = np.sort(rng.choice(train_idx, min(calibration, len(train_idx)), replace=False))

    def faces(index: np.ndarray) -> Faces:
        rows = table.iloc[index]
        return Faces(load_images(rows["path"].tolist(), size), rows["Gender"].to_numpy(np.int64),
                     rows["Race"].to_numpy(np.int64), rows["Label"].to_numpy(np.int64), rows["Age"].to_numpy())

    return (faces(calib_idx) if len(calib_idx) else None), faces(val_idx)


def scores(session: ort.InferenceSession, faces: Faces) -> dict:
    """The graph's outputs over `faces`, and its accuracy, macro-F1 and age MAE there."""
    from sklearn.metrics import f1_score

    outs = [session.run(None, feed) for feed in faces.feeds()]
    probs, labels = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
    result = {"probs": probs, "labels": labels, "accuracy": float((labels == faces.labels).mean()),
              "macro_f1": float(f1_score(faces.labels, labels, average="macro", zero_division=0))}
    if len(outs[0]) > 2:
        result["age"] = np.concatenate([o[2] for o in outs])
        result["age_mae_years"] = float(np.abs(result["age"] - faces.ages).mean())
    return result


def compare_on_faces(float_path: Path, int8_path: Path, faces: Faces) -> dict:
    """Both graphs on the same real faces: each one's accuracy, macro-F1 and age MAE, and how far apart they are
    (label agreement, max and mean |delta prob|, max |delta age|)."""
    runs = [scores(ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]), faces)
            for p in (float_path, int8_path)]
    delta = np.abs(runs[0]["probs"] - runs[1]["probs"])
    agreement = float((runs[0]["labels"] == runs[1]["labels"]).mean())
    report = {"faces": int(len(faces.labels)), "label_agreement": agreement,
              "max_abs_diff_prob": float(delta.max()), "mean_abs_diff_prob": float(delta.mean())}
    if "age" in runs[0]:
        report["max_abs_diff_age_years"] = float(np.abs(runs[0]["age"] - runs[1]["age"]).max())
    for name, run in zip(("float", "int8"), runs):
        report[name] = {k: v for k, v in run.items() if k in ("accuracy", "macro_f1", "age_mae_years")}
    return report


MIN_LABEL_AGREEMENT = 0.95  # the int8 graph must give the float graph's label on this share of validation faces


class QuantizationError(RuntimeError):
    """The int8 graph strayed too far from the float graph; nothing was written."""


def int8_graph(float_path: Path, out_path: Path, calibration: Faces, validation: Faces,
               settings: QuantSettings = QuantSettings()) -> dict:
    """Quantize the float graph at float_path into out_path and hold it to the float graph on the validation
    faces; returns the JSON's `quantization` section. Raises QuantizationError below MIN_LABEL_AGREEMENT."""
    steps = quantize_graph(onnx.load(str(float_path)), out_path, calibration, settings)
    report = compare_on_faces(float_path, out_path, validation)
    if report["label_agreement"] < MIN_LABEL_AGREEMENT:
        raise QuantizationError(f"int8 graph keeps the float graph's label on {report['label_agreement']:.1%} of "
                                f"{report['faces']} validation faces (needs {MIN_LABEL_AGREEMENT:.0%})")
    return {**settings.describe(), **steps,
            "calibration": {"faces": int(len(calibration.labels)), "from": "the training split (never validation)",
                            "seed": settings.seed},
            "float_graph": {"sha256": file_sha256(float_path), "bytes": Path(float_path).stat().st_size},
            "vs_float_on_validation": report}
