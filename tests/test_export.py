import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training import export
from training.export import (
    AgeGraph,
    check_parity,
    example_age_inputs,
    export_age_ensemble,
    export_graph,
    load_age_ensemble,
    round_to_half,
    store_half,
)
from training.models import AgeEnsemble, build_member


def test_graph_contract(tiny_export):
    model = onnx.load(str(tiny_export / "age_ensemble.onnx"))
    onnx.checker.check_model(model)
    elem = onnx.TensorProto
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    outputs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(inputs) == ["image", "gender", "race"]
    assert list(outputs) == ["probabilities", "label", "age", "age_range"]  # the contract's two come first
    assert inputs["image"].elem_type == elem.UINT8
    assert inputs["gender"].elem_type == inputs["race"].elem_type == elem.INT64
    assert outputs["probabilities"].elem_type == elem.FLOAT and outputs["label"].elem_type == elem.INT64
    assert outputs["age"].elem_type == outputs["age_range"].elem_type == elem.FLOAT
    meta = json.loads((tiny_export / "age_ensemble.json").read_text())
    h, w = meta["input_size"]
    dims = [d.dim_param or d.dim_value for d in inputs["image"].shape.dim]
    assert dims[1:] == [h, w, 3] and isinstance(dims[0], str)  # N is dynamic
    assert meta["class_names"] == ["10-19", "20-29", "30-39", "40-49", "50-60"]
    for key in ("members", "ensemble_val_accuracy", "normalization", "preset", "epochs", "training_wall_time_s",
                "data_sha256", "opset", "versions", "created", "face_template"):
        assert key in meta
    assert abs(sum(m["weight"] for m in meta["members"]) - 1) < 1e-6
    assert all(m["starting_weights"]["name"] == "random initialisation" for m in meta["members"])
    assert len(meta["face_template"]["points"]) == 5 and meta["face_template"]["size"] == [200, 200]


@pytest.mark.parametrize("n", [1, 5, 17])
def test_onnx_matches_pytorch(tiny_run, tiny_export, n):
    ensemble, summary = load_age_ensemble(tiny_run)
    graph = AgeGraph(ensemble).eval()
    inputs = example_age_inputs(n, summary["input_size"], seed=123)
    session = ort.InferenceSession(str(tiny_export / "age_ensemble.onnx"), providers=["CPUExecutionProvider"])
    probs, labels, age, age_range = session.run(None, {k: v.numpy() for k, v in zip(["image", "gender", "race"],
                                                                                    inputs)})
    with torch.no_grad():
        expected, expected_labels, expected_age, expected_range = graph(*inputs)
    assert age.shape == (n,) and age_range.shape == (n, 2)
    assert np.abs(age - expected_age.numpy()).max() <= 1e-3
    assert np.array_equal(age_range, expected_range.numpy())
    low, high = age_range[:, 0], age_range[:, 1]
    assert ((10 <= low) & (low <= age) & (age <= high) & (high <= 60)).all()
    assert probs.shape == (n, 5) and probs.dtype == np.float32 and labels.dtype == np.int64
    assert np.abs(probs - expected.numpy()).max() <= 1e-4
    assert np.array_equal(labels, expected_labels.numpy())
    assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_failed_parity_writes_nothing(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "PARITY_TOLERANCE", -1.0)
    with pytest.raises(export.ExportError, match="parity failed"):
        export_age_ensemble(tiny_run, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_parity_check_catches_a_wrong_graph(tiny_run, tiny_export):
    ensemble, summary = load_age_ensemble(tiny_run)
    with torch.no_grad():
        ensemble.members[0].head[-1].bias[0] += 5.0  # PyTorch side no longer matches the file
    with pytest.raises(export.ExportError):
        check_parity(AgeGraph(ensemble).eval(), tiny_export / "age_ensemble.onnx",
                     lambda n: example_age_inputs(n, summary["input_size"]), ["image", "gender", "race"])


@pytest.mark.parametrize("tta_flip", [False, True])
def test_export_parity_with_and_without_flip_averaging(tiny_run, tmp_path, tta_flip):
    ensemble, summary = load_age_ensemble(tiny_run)
    ensemble.tta_flip = tta_flip
    graph, size = AgeGraph(ensemble).eval(), summary["input_size"]
    names = ["image", "gender", "race"]
    export.export_graph(graph, example_age_inputs(2, size), names, tmp_path / "m.onnx")
    report = check_parity(graph, tmp_path / "m.onnx", lambda n: example_age_inputs(n, size), names)
    assert all(r["max_abs_diff"] <= 1e-4 and r["labels_equal"] for r in report.values())


def test_half_rounding_folds_batchnorms_and_keeps_the_function(tmp_path):
    """dlib members' BatchNorms fold into their convolutions, every weight becomes a float16 value, and the
    probabilities move by far less than a decision needs; the file then stores those weights in float16 and
    onnxruntime computes exactly what it computed from the float32 file."""
    torch.manual_seed(0)
    members = [build_member("face-age-frz", 150).eval(), build_member("vgg-age", 150).eval()]
    for member in members:  # non-trivial BatchNorm statistics, as after training
        for name, buffer in member.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.5, 0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    ensemble = AgeEnsemble(members, [0.6, 0.4]).eval()
    graph, names = AgeGraph(ensemble).eval(), ["image", "gender", "race"]
    inputs = example_age_inputs(4, 150, seed=7)
    with torch.no_grad():
        before = graph(*inputs)[0]
        round_to_half(ensemble)
        after = graph(*inputs)[0]
    assert (after - before).abs().max() < 1e-2
    for member in ensemble.members:
        stats = [b for name, b in member.named_buffers() if name.endswith(("running_mean", "running_var"))]
        assert all(torch.equal(t, t.half().float()) for t in [*member.parameters(), *stats])
    for _, norm in ensemble.members[0].features.conv_norm_pairs():
        assert norm.eps == 0 and bool((norm.running_var == 1).all()) and bool((norm.weight == 1).all())
    path = tmp_path / "half.onnx"
    export_graph(graph, example_age_inputs(2, 150), names, path, export.AGE_OUTPUTS)
    feeds = {k: v.numpy() for k, v in zip(names, inputs)}
    full = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    size = path.stat().st_size
    assert store_half(path) > 0
    assert path.stat().st_size < 0.6 * size
    halved = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(full, halved):
        assert np.array_equal(a, b)
    big = [i for i in onnx.load(str(path)).graph.initializer if np.prod(i.dims) >= export.HALF_MIN_SIZE]
    assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big)


def test_half_export_of_a_run(tiny_run, tmp_path):
    """--half: the JSON says so, large weights are float16 in the file, and parity holds against the rounded model."""
    meta = export_age_ensemble(tiny_run, tmp_path, half=True)
    assert meta["weights"].startswith("float16") and all(r["max_abs_diff"] <= 1e-4 for r in meta["parity"].values())
    ensemble, summary = load_age_ensemble(tiny_run)
    round_to_half(ensemble)
    inputs = example_age_inputs(5, summary["input_size"], seed=3)
    session = ort.InferenceSession(str(tmp_path / "age_ensemble.onnx"), providers=["CPUExecutionProvider"])
    probs = session.run(None, {k: v.numpy() for k, v in zip(["image", "gender", "race"], inputs)})[0]
    with torch.no_grad():
        expected = AgeGraph(ensemble).eval()(*inputs)[0].numpy()
    assert np.abs(probs - expected).max() <= 1e-5
