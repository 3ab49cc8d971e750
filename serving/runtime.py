"""ONNX Runtime session for an exported model: provider choice, metadata, input checks and predict (no torch).

    python -m serving.runtime exported/age_ensemble.onnx   # prints the provider and the metadata summary
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.image import prepare_image

log = logging.getLogger("bentoml.agegroup")  # under bentoml's handlers when served

MODEL_DIR = Path(os.environ.get("AGEGROUP_MODEL_DIR", Path(__file__).resolve().parent.parent / "exported"))
GENDER_NAMES = ("male", "female")
RACE_NAMES = ("White", "Black", "Asian", "Indian", "Others")


def gpu_present() -> bool:
    """An NVIDIA driver is loaded on this machine (checked without touching CUDA libraries)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def choose_providers(device: str | None = None) -> list[str]:
    """CUDA then CPU when a GPU is really there and onnxruntime has CUDA; otherwise CPU alone.

    `device` (or $AGEGROUP_DEVICE) is "auto", "cpu" or "cuda". Asking onnxruntime-gpu for CUDA on a
    machine without a GPU logs a failed library load, so CUDA is only requested when a driver exists.
    """
    device = (device or os.environ.get("AGEGROUP_DEVICE", "auto")).lower()
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    cuda_built = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" or (device == "auto" and cuda_built and gpu_present()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass(frozen=True)
class Layout:
    """How `bentoml serve` shares the cores: worker processes, and per worker the onnxruntime threads of one
    batch, the batches run at once, and the threads of a request that is alone in its worker."""

    workers: int
    threads: int
    concurrent_batches: int
    alone_threads: int


def serving_layout() -> Layout:
    """$AGEGROUP_WORKERS (default 1) and $AGEGROUP_THREADS per batch (default 1); the cores left over run
    batches side by side, and a lone request gets all of its worker's cores.

    Measured with bench/serving.py on 2 cores: one worker running two 1-thread batches at once serves
    115-122 requests/s at 32 clients, run after run. Two workers reach ~140 only when the kernel happens to spread the
    keep-alive connections evenly; it often does not (33/0 and 25/8 were seen), and the idle worker's core
    is then lost. A 1-thread run is also more efficient than a 2-thread one (10 vs 12 core-ms per image).
    """
    cores = os.cpu_count() or 1
    workers = int(os.environ.get("AGEGROUP_WORKERS", 0)) or 1
    threads = int(os.environ.get("AGEGROUP_THREADS", 0)) or 1
    per_worker = max(1, cores // workers)
    return Layout(workers, threads, max(1, per_worker // threads), max(threads, per_worker))


def spinning(alone: bool = False) -> bool:
    """Whether a session's idle intra-op threads spin-wait for work ($AGEGROUP_SPIN): "alone" (the default) only
    in the session of a request alone in its worker, "1" in every session, "0" in none.

    A spinning thread answers the next parallel section at once, where a sleeping one must be woken (tens of
    microseconds on a virtual machine, a graph has hundreds of sections); but it burns a core that the HTTP
    worker, parsing and decoding the next requests, shares. A lone request leaves that core idle anyway: on 2
    cores (bench/served_settings.py) its p50 fell from 13.4 to 9.8 ms, with no loss at 4 or 32 clients. The
    1-thread sessions of loaded batches have no intra-op threads to spin."""
    value = os.environ.get("AGEGROUP_SPIN", "alone")
    if value not in ("0", "1", "alone"):
        raise ValueError(f"AGEGROUP_SPIN must be 0, 1 or alone, not {value!r}")
    return value == "1" or (value == "alone" and alone)


def session_options(threads: int | None = None, spin: bool = False) -> ort.SessionOptions:
    """Full graph optimisation; intra-op threads from $AGEGROUP_THREADS or every core; idle intra-op threads
    spin-wait only with `spin`."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or int(os.environ.get("AGEGROUP_THREADS", 0)) or (os.cpu_count() or 1)
    options.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    # "0": idle intra-op threads sleep, leaving the cores to the HTTP worker (see spinning)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


class OnnxModel:
    """One exported model (.onnx + .json): prepares images and predicts probabilities and labels."""

    def __init__(self, onnx_path: str | Path, device: str | None = None, threads: int | None = None,
                 quiet: bool = False, spin: bool | None = None):
        self.path = Path(onnx_path)
        self.metadata = read_metadata(self.path)
        self.class_names: list[str] = list(self.metadata["class_names"])
        self.height, self.width = self.metadata["input_size"]
        providers = choose_providers(device)
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed
        options = session_options(threads, spinning() if spin is None else spin)
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if providers[0] != self.provider:
            log.warning("%s: CUDA was asked for but could not be used; running on %s", self.path.name, self.provider)
        (log.debug if quiet else log.info)("%s loaded on %s (input %dx%d, %d classes)", self.path.name,
                                           self.provider, self.height, self.width, len(self.class_names))

    @property
    def needs_demographics(self) -> bool:
        return "gender" in self.input_names

    def prepare(self, source: bytes | str | Path) -> np.ndarray:
        """Decode one image to the model's uint8 (H, W, 3); raises InputError on bad input."""
        return prepare_image(source, (self.width, self.height))

    def predict(self, images: np.ndarray, gender=None, race=None) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) uint8 [+ gender, race] -> probabilities (N, C) float32 and labels (N,) int64."""
        probabilities, labels = self.session.run(["probabilities", "label"], self.feed(images, gender, race))
        return probabilities, labels

    def feed(self, images: np.ndarray, gender=None, race=None) -> dict[str, np.ndarray]:
        """The graph's inputs, in the types it takes."""
        feed = {"image": np.ascontiguousarray(images, dtype=np.uint8)}
        if self.needs_demographics:
            feed["gender"] = np.asarray(gender, dtype=np.int64)
            feed["race"] = np.asarray(race, dtype=np.int64)
        return feed

    def session_output_shape(self, name: str) -> tuple[int, ...]:
        """An output's shape without its batch dimension, e.g. (5,) for probabilities, () for label."""
        output = next(o for o in self.session.get_outputs() if o.name == name)
        return tuple(int(d) for d in output.shape[1:])

    def predict_all(self, images: np.ndarray, gender=None, race=None) -> dict[str, np.ndarray]:
        """Like predict, but every output of the graph by name (the age graph adds `age` and `age_range`)."""
        return dict(zip(self.output_names, self.session.run(self.output_names, self.feed(images, gender, race))))


def describe(class_names: list[str], probabilities, label: int, key: str = "class", age=None,
             age_range=None) -> dict:
    """One prediction as JSON: the class name under `key`, its label and every probability by name; with a graph
    that has them, the age in years and its 10th-90th percentile range."""
    answer = {key: class_names[int(label)], "label": int(label),
              "probabilities": {name: round(float(p), 6) for name, p in zip(class_names, probabilities)}}
    if age is not None:
        answer["age"] = round(float(age), 1)
        answer["age_range"] = [int(round(float(a))) for a in age_range]
    return answer


def read_metadata(onnx_path: str | Path) -> dict:
    """The JSON written beside an exported .onnx file."""
    return json.loads(Path(onnx_path).with_suffix(".json").read_text())


@functools.lru_cache(maxsize=None)
def model_summary(onnx_path: Path) -> dict:
    """What GET /model shows: version (sha256 of the .onnx), input size, classes, members and weights,
    validation accuracy and creation time. Computed once per process and path."""
    meta = read_metadata(onnx_path)
    return {
        "version": "sha256:" + hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest(),
        "file": Path(onnx_path).name, "input_size": meta["input_size"], "class_names": meta["class_names"],
        "members": [{k: m.get(k) for k in ("name", "weight", "val_accuracy")} for m in meta.get("members", [])],
        "test_time_augmentation": meta.get("test_time_augmentation"),
        "val_accuracy": meta.get("ensemble_val_accuracy"), "val_macro_f1": meta.get("ensemble_val_macro_f1"),
        "validated_on": validation_summary(meta.get("validation")),
        "preset": meta.get("preset"), "created": meta.get("created"),
        "precision": meta.get("precision", "float32"),  # int8: the JSON's quantization section says how
        "outputs": list(meta.get("outputs", {})),
        "face_detection": face_detection_summary(meta.get("face_template")),
    }


def validation_summary(validation: dict | None) -> str | None:
    """Which faces the accuracy figures of /model were measured on: a held-out split, or out of fold for a
    model trained on every face."""
    if not validation:
        return None
    oof = validation.get("out_of_fold")
    if oof:
        return f"out of fold: {oof['faces']} faces, each answered by the {oof['folds']}-fold run that held it out"
    return f"{validation['size']} held-out faces"


def face_detection_summary(template: dict | None) -> dict:
    """What /model says about finding faces: the detector, the landmarks and the template's crop size."""
    if not template:
        return {"available": False, "note": "this model has no face template: send aligned crops (aligned=true)"}
    return {"available": True, "detector": template["detector"], "landmarks": template["landmarks"],
            "license": template["license"], "template_size": template["size"],
            "default": "detect; aligned=true scores the whole image as a crop",
            "several_faces": "the largest face is scored; faces_found says how many there were"}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = sys.argv[1:] if argv is None else argv
    model = OnnxModel(argv[0] if argv else MODEL_DIR / "age_ensemble.onnx")
    meta = model.metadata
    print(f"provider {model.provider}; inputs {model.input_names}; input_size {meta['input_size']}; "
          f"classes {model.class_names}; val accuracy {meta.get('ensemble_val_accuracy', 'n/a')}")


if __name__ == "__main__":
    main()
