"""Export a trained model as one self-contained ONNX graph plus JSON metadata, checked against PyTorch.

    agegroup-export age --run-dir runs/face --out-dir exported --int8
    agegroup-export quantize --model runs/face/float/age_ensemble.onnx --data-dir ../shared/data/faces
    agegroup-export stl10 --checkpoint runs/stl10/stl10_mlp.pt --out-dir /tmp/stl10-export
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from serving.cli import ArgumentParser, fail
from serving.table import DataError
from training.config import AGE_GROUPS, GENDERS, RACES, STL10_CLASSES
from training.models import AgeEnsemble, Stl10MLP, age_summary, build_member
from training.quantize import QuantizationError, QuantSettings, int8_graph, split_faces

OPSET = 17
PARITY_TOLERANCE = 1e-4  # max |prob_onnx - prob_torch| allowed at export
PARITY_BATCHES = (1, 5)
AGE_PARITY_YEARS = 1e-2  # max |age_onnx - age_torch|; a range end may move by a year at a quantile's edge only
# when the cumulative probability sits within float error of 0.1 or 0.9, which random inputs never hit


class ExportError(RuntimeError):
    """The graph failed a check; nothing was written."""


AGE_OUTPUTS = ["probabilities", "label", "age", "age_range"]


class AgeGraph(nn.Module):
    """What the ONNX file computes: uint8 NHWC image + gender + race -> ensemble probabilities and label, the
    median age in years and its 10th-90th percentile range."""

    def __init__(self, ensemble: AgeEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, image: torch.Tensor, gender: torch.Tensor, race: torch.Tensor):
        x = image.permute(0, 3, 1, 2).to(torch.float32)  # (N, H, W, 3) uint8 -> (N, 3, H, W) float 0..255
        probabilities, ages = self.ensemble.predict(x, gender, race)  # (N, 5) rows sum to 1; (N, 51)
        age, age_range = age_summary(ages)  # (N,), (N, 2)
        return probabilities, probabilities.argmax(dim=1), age, age_range


class ImageGraph(nn.Module):
    """What the ONNX file computes for an image-only classifier: uint8 NHWC -> softmax and label."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, image: torch.Tensor):
        probabilities = self.classifier(image.permute(0, 3, 1, 2).to(torch.float32)).softmax(dim=1)
        return probabilities, probabilities.argmax(dim=1)


def load_age_ensemble(run_dir: str | Path) -> tuple[AgeEnsemble, dict]:
    """Rebuild the fitted ensemble from a training run folder (ensemble.pt + member checkpoints)."""
    run_dir = Path(run_dir)
    if not (run_dir / "ensemble.pt").is_file():
        raise ExportError(f"{run_dir}/ensemble.pt not found: train first (agegroup-train age --out-dir {run_dir})")
    summary = torch.load(run_dir / "ensemble.pt", weights_only=False)
    members = []
    for entry in summary["members"]:
        checkpoint = torch.load(run_dir / entry["checkpoint"], weights_only=False)
        model = build_member(entry["member"], summary["input_size"], summary["mean"], summary["std"])
        model.load_state_dict(checkpoint["state_dict"])
        members.append(model)
    ensemble = AgeEnsemble(members, [m["weight"] for m in summary["members"]], summary.get("tta_flip", False))
    return ensemble.eval(), summary


def conv_norm_pairs(features: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every convolution of a backbone with the BatchNorm right after it: the backbone's own list where it keeps
    one (dlib's), else consecutive pairs inside its Sequentials (the VGG and ResNet blocks)."""
    if hasattr(features, "conv_norm_pairs"):
        return features.conv_norm_pairs()
    pairs = []
    for sequence in features.modules():
        if isinstance(sequence, nn.Sequential):
            layers = list(sequence)
            pairs += [(a, b) for a, b in zip(layers, layers[1:])
                      if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d)]
    return pairs


def round_to_half(ensemble: AgeEnsemble) -> None:
    """Make every weight of the ensemble a float16 value, the function otherwise unchanged, so that the ONNX file
    can store them in half the bytes and still compute exactly what PyTorch computes (in float32).

    A BatchNorm that follows a convolution is first folded into it (the exporter would fold it anyway, into
    weights that are no longer float16 values) and left as an identity (scale 1, shift 0, mean 0, variance 1,
    eps 0); then parameters and BatchNorm statistics are rounded to the nearest float16."""
    with torch.no_grad():
        for member in ensemble.members:
            for conv, norm in conv_norm_pairs(member.features):
                weight, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
                    conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
                conv.weight.copy_(weight)
                if conv.bias is None:
                    conv.bias = nn.Parameter(bias, requires_grad=False)
                else:
                    conv.bias.copy_(bias)
                norm.weight.fill_(1.0), norm.bias.zero_(), norm.running_mean.zero_(), norm.running_var.fill_(1.0)
                norm.eps = 0.0
            for tensor in [*member.parameters(), *(b for name, b in member.named_buffers()
                                                   if name.endswith(("running_mean", "running_var")))]:
                tensor.copy_(tensor.half().float())


HALF_MIN_SIZE = 1024  # smaller initializers stay float32: their bytes do not matter


def store_half(path: Path) -> int:
    """Rewrite the ONNX file at `path` with every large float32 initializer that is exactly a float16 value stored
    as float16, behind a Cast back to float32 (onnxruntime folds the casts when it loads the graph, so it runs
    in float32 as before). Returns the number of initializers rewritten."""
    model = onnx.load(str(path))
    casts = []
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        values = onnx.numpy_helper.to_array(init)
        half = values.astype(np.float16)
        if values.size < HALF_MIN_SIZE or not np.array_equal(half.astype(np.float32), values):
            continue
        name = init.name
        init.CopyFrom(onnx.numpy_helper.from_array(half, f"{name}.fp16"))
        casts.append(onnx.helper.make_node("Cast", [f"{name}.fp16"], [name], name=f"{name}.cast",
                                           to=onnx.TensorProto.FLOAT))
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return len(casts)


def example_age_inputs(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random but valid graph inputs: uint8 images, gender 0-1, race 0-4."""
    g = torch.Generator().manual_seed(seed + n)
    return (torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g),
            torch.randint(0, len(GENDERS), (n,), generator=g), torch.randint(0, len(RACES), (n,), generator=g))


def export_graph(graph: nn.Module, inputs: tuple, input_names: list[str], path: Path,
                 output_names: list[str] = AGE_OUTPUTS[:2]) -> None:
    """torch -> ONNX with a dynamic batch dimension on every input and output, then onnx.checker."""
    names = input_names + output_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(graph.eval(), inputs, str(path), input_names=input_names,
                          output_names=output_names, opset_version=OPSET, dynamo=False,
                          dynamic_axes={name: {0: "N"} for name in names}, do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def check_parity(graph: nn.Module, path: Path, make_inputs, input_names: list[str]) -> dict:
    """onnxruntime (CPU) vs PyTorch eval at N = 1 and 5: max |delta prob| and whether labels agree."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report = {}
    for n in PARITY_BATCHES:
        inputs = make_inputs(n)
        with torch.no_grad():
            probs_t, label_t, *extra_t = (t.numpy() for t in graph(*inputs))
        probs_o, label_o, *extra_o = session.run(None, {k: v.numpy() for k, v in zip(input_names, inputs)})
        delta = float(np.abs(probs_o - probs_t).max())
        same = bool((label_o == label_t).all())
        report[f"N={n}"] = {"max_abs_diff": delta, "labels_equal": same,
                            "row_sum_max_error": float(np.abs(probs_o.sum(1) - 1).max())}
        if extra_t:  # age in years and its range: years, so a looser bound than probabilities
            age_delta = max(float(np.abs(o - t).max()) for o, t in zip(extra_o, extra_t))
            report[f"N={n}"]["age_max_abs_diff_years"] = age_delta
            if age_delta > AGE_PARITY_YEARS:
                raise ExportError(f"ONNX/PyTorch parity failed at N={n}: age differs by {age_delta:.3f} years")
        if delta > PARITY_TOLERANCE or not same or label_o.dtype != np.int64 or probs_o.dtype != np.float32:
            raise ExportError(f"ONNX/PyTorch parity failed at N={n}: max |dprob| {delta:.2e} "
                              f"(limit {PARITY_TOLERANCE:.0e}), labels equal: {same}")
    return report


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}


def publish(files: dict[str, bytes | Path], out_dir: Path) -> None:
    """Move finished files into out_dir with atomic renames, the JSON last, so a reader never sees half."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        tmp = out_dir / f".{name}.tmp"
        if isinstance(content, Path):
            shutil.copyfile(content, tmp)
        else:
            tmp.write_bytes(content)
        os.replace(tmp, out_dir / name)


def export_age_ensemble(run_dir: str | Path, out_dir: str | Path, half: bool = False,
                        int8: QuantSettings | None = None, data_dir: str | Path | None = None) -> dict:
    """Export the whole weighted softmax ensemble of a run as out_dir/age_ensemble.{onnx,json}; with `half`,
    its weights rounded to and stored as float16 (round_to_half, store_half): half the file; with `int8`, the
    float graph quantized (training.quantize), calibrated on the run's training faces from `data_dir` (default:
    the run's own) and held to the float graph on its validation faces."""
    ensemble, summary = load_age_ensemble(run_dir)
    if half:
        round_to_half(ensemble)  # the parity check below then compares exactly these weights
    template_path = Path(run_dir) / "face_template.json"
    if not template_path.is_file():
        raise ExportError(f"{template_path} not found: fit it with agegroup-train template --out-dir {run_dir}")
    template = json.loads(template_path.read_text())
    graph, size = AgeGraph(ensemble).eval(), summary["input_size"]
    names = ["image", "gender", "race"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "age_ensemble.onnx"
        export_graph(graph, example_age_inputs(2, size), names, path, AGE_OUTPUTS)
        halved = store_half(path) if half else 0
        parity = check_parity(graph, path, lambda n: example_age_inputs(n, size), names)
        config = summary["config"]
        metadata = {
            "model": "age_ensemble",
            "inputs": {"image": f"uint8 [N, {size}, {size}, 3] RGB", "gender": "int64 [N] 0 male, 1 female",
                       "race": "int64 [N] 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others"},
            "outputs": {"probabilities": "float32 [N, 5] weighted average of member softmaxes",
                        "label": "int64 [N] argmax of probabilities",
                        "age": "float32 [N] median age in years of the exact-age members' weighted mix",
                        "age_range": "float32 [N, 2] 10th and 90th percentile of that age distribution"},
            "input_size": [size, size],
            "resize": "Pillow bilinear from the RGB image, after EXIF orientation",
            "class_names": list(AGE_GROUPS),
            "normalization": {"mean": list(summary["mean"]), "std": list(summary["std"]),
                              "units": "0-255 pixel values, per RGB channel, from the training split"},
            "members": [{"name": m["name"], "config": m["member"], "weight": m["weight"],
                         "input_size": model.input_size,  # what it sees: the graph's input, or shrunk in the graph
                         "val_accuracy": m["val_accuracy"], "val_macro_f1": m["val_macro_f1"],
                         "train_seconds": round(m["train_seconds"], 1),
                         "starting_weights": m.get("starting_weights", {"name": "random initialisation"})}
                        for m, model in zip(summary["members"], ensemble.members)],
            "left_out_members": summary.get("dropped_members", []),
            "face_template": template,
            "ensemble_val_accuracy": summary["ensemble"]["accuracy"],
            "ensemble_val_macro_f1": summary["ensemble"]["macro_f1"],
            "uniform_weights_val_accuracy": summary["uniform"]["accuracy"],
            # equal weights where they classified the validation (or out-of-fold) faces better than fitted ones
            "ensemble_weights": summary.get("weights", "fitted"),
            "test_time_augmentation": "mean over the image and its horizontal mirror" if ensemble.tta_flip
            else "none",
            "fitted_without_flip_val_accuracy": summary.get("fitted_without_flip", summary["ensemble"])["accuracy"],
            "fitted_with_flip_val_accuracy": (summary.get("fitted_with_flip") or {}).get("accuracy"),
            "validation": {"fraction": config["val_fraction"], "seed": config["split_seed"],
                           "size": len(summary["val_index"]), "stratified_by": "Label",
                           **({"folds": config["folds"], "fold": config["fold"]} if config.get("folds", 0) > 1
                              else {}),
                           # trained on every face: the figures above are its fold runs' answers, out of fold
                           **({"out_of_fold": {"faces": len(summary["val_targets"]),
                                               "folds": summary["out_of_fold"][0]["folds"],
                                               "runs": [r["run"] for r in summary["out_of_fold"]],
                                               # the fold runs' member fits: the recipe's cost beside this run's
                                               "train_seconds": round(sum(r.get("train_seconds", 0.0)
                                                                          for r in summary["out_of_fold"]), 1)}}
                              if "out_of_fold" in summary else {})},
            "preset": summary["preset"], "epochs": summary["epochs"], "training": config,
            "training_wall_time_s": round(summary["train_seconds"], 1),
            "data_sha256": summary["data_sha256"],
            "weights": (f"float16 values (rounded at export; {halved} tensors stored as float16, cast to float32 "
                        "inside the graph), computed in float32; validation accuracy above is the float32 run's"
                        if half else "float32"),
            "precision": "float16-stored" if half else "float32",
            "opset": OPSET, "versions": versions(), "parity": parity,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if int8:
            path = quantize_into(path, metadata, Path(data_dir or config["data_dir"]), int8, Path(tmp))
        publish({"age_ensemble.onnx": path,
                 "age_ensemble.json": (json.dumps(metadata, indent=2) + "\n").encode()}, Path(out_dir))
    return metadata


def quantize_into(float_path: Path, metadata: dict, data_dir: Path, settings: QuantSettings, tmp: Path) -> Path:
    """The int8 graph of the float graph at float_path, written in tmp; `metadata` (the float graph's JSON) is
    updated to describe it: precision, quantization settings, calibration and the comparison with the float
    graph on the validation faces, whose int8 accuracy becomes the ensemble's."""
    if metadata.get("precision") == "int8":
        raise ExportError("the graph is int8 already: quantize its float graph (agegroup-export age --int8)")
    if not (Path(data_dir) / "data.csv").is_file():
        raise ExportError(f"{data_dir}/data.csv not found: int8 calibration needs the training faces (--data-dir)")
    split = metadata["validation"]
    try:
        calibration, validation = split_faces(Path(data_dir), metadata["input_size"][0], split["fraction"],
                                              split["seed"], settings.images, settings.seed, metadata["data_sha256"],
                                              split.get("folds", 0), split.get("fold", 0))
        out = tmp / "age_ensemble.int8.onnx"
        section = int8_graph(float_path, out, calibration, validation, settings)
    except (QuantizationError, DataError, ValueError) as exc:  # the int8 graph strayed; data.csv unusable
        raise ExportError(str(exc)) from None
    metadata.update({"precision": "int8", "weights": "int8 convolution weights (QDQ); heads, softmaxes and age in "
                     "float32", "float_ensemble_val_accuracy": metadata["ensemble_val_accuracy"]})
    if split["size"]:  # held-out faces: the int8 graph's own accuracy there is the ensemble's
        measured = section["vs_float_on_validation"]
        metadata.update({"ensemble_val_accuracy": measured["int8"]["accuracy"],
                         "ensemble_val_macro_f1": measured["int8"]["macro_f1"]})
    else:  # trained on every face: the figures stay out of fold, and the graphs met on faces seen in training
        section["vs_float_on_training_faces"] = section.pop("vs_float_on_validation")
    metadata.update({"quantization": section, "versions": versions(),
                     "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return out


def quantize_export(model: str | Path, data_dir: str | Path, out_dir: str | Path,
                    settings: QuantSettings = QuantSettings()) -> dict:
    """Quantize an exported float graph (model + its JSON beside it) into out_dir/age_ensemble.{onnx,json}."""
    model = Path(model)
    meta_path = model.with_suffix(".json")
    if not model.is_file() or not meta_path.is_file():
        raise ExportError(f"{model} and {meta_path.name} beside it are needed (an agegroup-export age output)")
    metadata = json.loads(meta_path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        path = quantize_into(model, metadata, Path(data_dir), settings, Path(tmp))
        publish({"age_ensemble.onnx": path,
                 "age_ensemble.json": (json.dumps(metadata, indent=2) + "\n").encode()}, Path(out_dir))
    return metadata


def export_stl10(checkpoint: str | Path, out_dir: str | Path) -> dict:
    """Export a trained Stl10MLP checkpoint as out_dir/stl10_mlp.{onnx,json}."""
    saved = torch.load(checkpoint, weights_only=False)
    model = Stl10MLP(tuple(saved["hidden"]), saved["dropout"], len(STL10_CLASSES), mean=saved["mean"],
                     std=saved["std"])
    model.load_state_dict(saved["state_dict"])
    graph = ImageGraph(model).eval()

    def make_inputs(n: int):
        g = torch.Generator().manual_seed(n)
        return (torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, generator=g),)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "stl10_mlp.onnx"
        export_graph(graph, make_inputs(2), ["image"], path)
        parity = check_parity(graph, path, make_inputs, ["image"])
        metadata = {
            "model": "stl10_mlp", "input_size": [96, 96], "class_names": list(STL10_CLASSES),
            "inputs": {"image": "uint8 [N, 96, 96, 3] RGB"},
            "outputs": {"probabilities": "float32 [N, 10] softmax", "label": "int64 [N] argmax"},
            "normalization": {"mean": list(saved["mean"]), "std": list(saved["std"])},
            "hidden": saved["hidden"], "dropout": saved["dropout"], "metrics": saved["metrics"],
            "training": saved["config"], "opset": OPSET, "versions": versions(), "parity": parity,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        publish({"stl10_mlp.onnx": path, "stl10_mlp.json": (json.dumps(metadata, indent=2) + "\n").encode()},
                Path(out_dir))
    return metadata


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="agegroup-export", description=__doc__.split("\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True, parser_class=ArgumentParser)
    age = tasks.add_parser("age", help="export a trained ensemble run as age_ensemble.onnx + .json")
    age.add_argument("--run-dir", type=Path, required=True, help="the training run folder (holds ensemble.pt)")
    age.add_argument("--out-dir", type=Path, default=Path("exported"), help="where the files go (default: exported)")
    age.add_argument("--half", action="store_true",
                     help="store the weights as float16 (rounded first; computed in float32): half the file")
    age.add_argument("--int8", action="store_true",
                     help="quantize the graph to int8 (what is shipped): a quarter of the file, faster on CPU")
    age.add_argument("--data-dir", type=Path, help="the face folder, for int8 calibration (default: the run's)")
    add_quant_options(age)
    quant = tasks.add_parser("quantize", help="quantize an exported float age graph to int8")
    quant.add_argument("--model", type=Path, required=True, help="the float age_ensemble.onnx (its .json beside it)")
    quant.add_argument("--data-dir", type=Path, required=True, help="the face folder the model was trained on")
    quant.add_argument("--out-dir", type=Path, default=Path("exported"), help="where the files go (default: exported)")
    add_quant_options(quant)
    stl = tasks.add_parser("stl10", help="export a trained STL-10 MLP checkpoint as stl10_mlp.onnx + .json")
    stl.add_argument("--checkpoint", type=Path, required=True, help="the stl10_mlp.pt a training run wrote")
    stl.add_argument("--out-dir", type=Path, required=True, help="where the files go")
    args = parser.parse_args(argv)
    try:
        if args.task in ("age", "quantize"):
            if args.calibration_images < 1:
                parser.error("--calibration-images must be at least 1")
            settings = QuantSettings(method=args.calibration_method, images=args.calibration_images,
                                     reduce_range=not args.full_range)
            if args.task == "age" and args.half and args.int8:
                parser.error("--half and --int8 are two precisions: choose one")
            if args.task == "age":
                meta = export_age_ensemble(args.run_dir, args.out_dir, half=args.half,
                                           int8=settings if args.int8 else None, data_dir=args.data_dir)
            else:
                meta = quantize_export(args.model, args.data_dir, args.out_dir, settings)
            print(f"ensemble val accuracy {meta['ensemble_val_accuracy']:.4f}", end="; ")
            if "quantization" in meta:
                quantization = meta["quantization"]
                vs = quantization.get("vs_float_on_validation") or quantization["vs_float_on_training_faces"]
                print(f"float {meta['float_ensemble_val_accuracy']:.4f}, labels kept {vs['label_agreement']:.1%}",
                      end="; ")
        else:
            if not args.checkpoint.is_file():
                raise ExportError(f"{args.checkpoint}: no such checkpoint")
            meta = export_stl10(args.checkpoint, args.out_dir)
    except ExportError as exc:
        fail("agegroup-export", str(exc))
    name = meta["model"]
    size_mb = (args.out_dir / f"{name}.onnx").stat().st_size / 1e6
    print(f"wrote {args.out_dir / name}.onnx ({size_mb:.2f} MB) and .json; float parity "
          + ", ".join(f"{k} max|dprob| {v['max_abs_diff']:.1e}" for k, v in meta["parity"].items()))


def add_quant_options(parser) -> None:
    defaults = QuantSettings()
    parser.add_argument("--calibration-images", type=int, default=defaults.images, metavar="N",
                        help=f"training faces that calibrate the int8 ranges (default {defaults.images})")
    parser.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default=defaults.method,
                        help=f"how activation ranges are chosen (default {defaults.method})")
    parser.add_argument("--full-range", action="store_true",
                        help="8-bit weights instead of 7-bit, the first convolutions' excepted (only on CPUs "
                        "with VNNI: elsewhere products saturate)")


if __name__ == "__main__":
    main()
