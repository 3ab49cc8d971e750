"""The int8 export step: normalisation folding, the uint8 front, and a tiny ensemble quantized in seconds."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import random_faces
from torch import nn

from training.export import ExportError, export_graph, quantize_export
from training.quantize import QuantSettings, fold_input_normalization, quantize_graph

TINY = QuantSettings(images=32)


@pytest.fixture(scope="module")
def tiny_int8(tiny_export, face_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    quantize_export(tiny_export / "age_ensemble.onnx", face_dir, out, TINY)
    return out


def run(path, feed: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def test_int8_graph_keeps_the_contract(tiny_export, tiny_int8):
    graphs = [onnx.load(str(d / "age_ensemble.onnx")) for d in (tiny_export, tiny_int8)]
    for a, b in (("input", "input"), ("output", "output")):
        assert [(v.name, v.type.tensor_type.elem_type) for v in getattr(graphs[0].graph, a)] == \
               [(v.name, v.type.tensor_type.elem_type) for v in getattr(graphs[1].graph, b)]
    meta = json.loads((tiny_int8 / "age_ensemble.json").read_text())
    assert meta["precision"] == "int8" and meta["input_size"] == json.loads(
        (tiny_export / "age_ensemble.json").read_text())["input_size"]


def test_int8_weights_replace_the_float_convolution_weights(tiny_export, tiny_int8):
    model = onnx.load(str(tiny_int8 / "age_ensemble.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert convs
    for conv in convs:  # every convolution reads its weights from an int8 (or uint8) tensor through a DQ node
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    float_bytes = (tiny_export / "age_ensemble.onnx").stat().st_size
    assert (tiny_int8 / "age_ensemble.onnx").stat().st_size < 0.5 * float_bytes


def test_int8_graph_stays_near_the_float_graph(tiny_export, tiny_int8):
    meta = json.loads((tiny_int8 / "age_ensemble.json").read_text())
    vs = meta["quantization"]["vs_float_on_validation"]
    assert vs["label_agreement"] >= 0.95 and vs["max_abs_diff_prob"] <= 0.1, vs
    assert meta["quantization"]["calibration"]["faces"] == 32
    assert meta["ensemble_val_accuracy"] == vs["int8"]["accuracy"]
    assert meta["quantization"]["float_graph"]["bytes"] == (tiny_export / "age_ensemble.onnx").stat().st_size
    rng = np.random.default_rng(0)  # and on inputs it never saw: same shapes, probabilities near
    feed = {"image": rng.integers(0, 256, (7, *meta["input_size"], 3), dtype=np.uint8),
            "gender": rng.integers(0, 2, 7), "race": rng.integers(0, 5, 7)}
    (p_float, _, age_float, _), (p_int8, labels, age_int8, age_range) = (
        run(d / "age_ensemble.onnx", feed) for d in (tiny_export, tiny_int8))
    assert p_int8.shape == (7, 5) and labels.dtype == np.int64 and age_range.shape == (7, 2)
    assert np.abs(p_int8.sum(1) - 1).max() < 1e-5
    assert np.abs(p_int8 - p_float).max() < 0.15 and np.abs(age_int8 - age_float).max() < 5


def test_an_int8_graph_is_not_quantized_again(tiny_int8, face_dir, tmp_path):
    with pytest.raises(ExportError, match="int8 already"):
        quantize_export(tiny_int8 / "age_ensemble.onnx", face_dir, tmp_path, TINY)
    assert not list(tmp_path.iterdir())


def test_cli_refuses_bad_requests_in_one_line(tiny_export, tmp_path):
    cases = [["quantize", "--model", str(tiny_export / "age_ensemble.onnx"), "--data-dir", str(tmp_path),
              "--out-dir", str(tmp_path / "out")],
             ["age", "--run-dir", str(tmp_path), "--half", "--int8"]]
    for args in cases:
        proc = subprocess.run([sys.executable, "-m", "training.export", *args], capture_output=True, text=True)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


class Toy(nn.Module):
    """A member in miniature: crop and resize the uint8 image, normalise, an unpadded first convolution (as
    dlib's stem) and a padded one, then the graph's two contract outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("mean", torch.tensor([120.0, 110.0, 100.0]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([60.0, 55.0, 50.0]).view(1, 3, 1, 1))
        self.convs = nn.Sequential(nn.Conv2d(3, 8, 5, 2, 0), nn.ReLU(), nn.Conv2d(8, 8, 3, 1, 1), nn.ReLU())
        self.head = nn.Linear(8 + 7, 5)

    def forward(self, image, gender, race):
        x = image.permute(0, 3, 1, 2).float()[:, :, 2:30, 2:30]
        x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = self.convs((x - self.mean) / self.std).mean(dim=(2, 3))
        extra = torch.cat([nn.functional.one_hot(gender, 2), nn.functional.one_hot(race, 5)], 1).float()
        probs = self.head(torch.cat([x, extra], 1)).softmax(1)
        return probs, probs.argmax(1)


@pytest.fixture(scope="module")
def toy_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.onnx"
    inputs = (torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
              torch.zeros(2, dtype=torch.long))
    export_graph(Toy().eval(), inputs, ["image", "gender", "race"], path)
    return path


def test_folding_the_normalisation_keeps_the_function(toy_graph, tmp_path):
    model = onnx.load(str(toy_graph))
    raw, scaled = fold_input_normalization(model)
    assert len(raw) == 1 and not scaled  # the unpadded first convolution takes the mean into its bias
    assert not [n for n in model.graph.node if n.op_type in ("Sub", "Div")]
    onnx.save(model, str(tmp_path / "folded.onnx"))
    feed = random_faces(5, 1).feeds()[0]
    (before, _), (after, _) = run(toy_graph, feed), run(tmp_path / "folded.onnx", feed)
    assert np.abs(before - after).max() < 1e-5


def test_a_padded_first_convolution_keeps_its_mean_subtraction(toy_graph, tmp_path):
    model = onnx.load(str(toy_graph))
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[0].endswith("Div_output_0"):
            node.attribute.remove(next(a for a in node.attribute if a.name == "pads"))
            node.attribute.append(onnx.helper.make_attribute("pads", [1, 1, 1, 1]))
    onnx.save(model, str(tmp_path / "padded.onnx"))
    raw, scaled = fold_input_normalization(model)
    assert not raw and len(scaled) == 1  # zero padding stands for the mean only after the subtraction
    onnx.save(model, str(tmp_path / "folded.onnx"))
    feed = random_faces(5, 2).feeds()[0]
    (before, _), (after, _) = run(tmp_path / "padded.onnx", feed), run(tmp_path / "folded.onnx", feed)
    assert np.abs(before - after).max() < 1e-5


def test_the_first_convolution_reads_the_uint8_pixels(toy_graph, tmp_path):
    out = tmp_path / "toy.int8.onnx"
    steps = quantize_graph(onnx.load(str(toy_graph)), out, random_faces(64, 3), TINY)
    assert steps == {"folded_convolutions": 1, "uint8_fed_convolutions": 1, "code_preserving_normalizations": 0,
                     "uint8_pads": 0}
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    dq = producers[stem.input[0]]
    chain = []  # back from the stem's input to the image: pixel ops on uint8, no Cast, no QuantizeLinear
    name = dq.input[0]
    while name in producers:
        chain.append(producers[name].op_type)
        name = producers[name].input[0]
    assert name == "image" and set(chain) <= {"Transpose", "Slice", "Resize"} and "Resize" in chain, chain
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] == "image"]
    feed = random_faces(16, 4).feeds()[0]
    (p_float, l_float), (p_int8, l_int8) = run(toy_graph, feed), run(out, feed)
    assert np.abs(p_float - p_int8).max() < 0.05 and (l_float == l_int8).mean() >= 0.8


def test_the_folded_bias_answers_for_the_rounded_weights(toy_graph, tmp_path):
    """On raw pixels, rounding the folded weights W / std by e would shift each output channel by sum(e * mean);
    the int8 stem's bias takes it back: at x = mean its output is the original bias, to the bias's own step."""
    out = tmp_path / "toy.int8.onnx"
    quantize_graph(onnx.load(str(toy_graph)), out, random_faces(64, 3), TINY)
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}

    def dequantized(name):
        dq = producers[name]
        codes, scale, *zero = (onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == n))
                               for n in dq.input)
        zero = zero[0] if zero else np.zeros_like(scale)
        shape = (-1,) + (1,) * (codes.ndim - 1)
        return (codes.astype(np.float64) - zero.astype(np.float64).reshape(shape)) * scale.reshape(shape), scale

    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    (weight, _), (bias, step) = dequantized(stem.input[1]), dequantized(stem.input[2])
    toy = Toy()
    mean = toy.mean.reshape(1, 3, 1, 1).double().numpy()
    at_mean = (weight * mean).sum(axis=(1, 2, 3)) + bias
    assert np.abs(at_mean - toy.convs[0].bias.detach().double().numpy()).max() <= step.max()
