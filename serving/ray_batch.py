"""Batch scoring on Ray Data: `agegroup-score in.csv out.csv --ray [ADDRESS]` (the ray extra).

Rows flow as a Ray Dataset: image reading, face finding and alignment run as CPU tasks (`frame_batch`), the
ONNX graph in a pool of actors that each hold one onnxruntime session (`Scorer`, GPU actors where the cluster
has GPUs). Both call the same functions as the local scorer (serving.face.prepare_face, OnnxModel.predict_all),
so the rows are the local scorer's rows. The driver validates the table first, ships the model's files to the
actors through the object store (nodes need no copy of exported/), and puts the results back in input order.

    agegroup-score faces/testdata.csv out.csv --ray                  # a Ray instance started on this machine
    agegroup-score s3://.../big.parquet out.parquet --ray auto       # the cluster this machine belongs to
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from serving.batch import score_chunk, undecodable
from serving.face import FaceFinder, NoFace, prepare_face
from serving.image import InputError
from serving.runtime import OnnxModel
from serving.table import DataError

FRAME_CPUS = 0.5  # a framing task's CPU share: on one-CPU nodes, whole CPUs for both stages starved one and hung
SCORER_CPUS = 0.5  # a model actor's CPU share (its onnxruntime session runs one thread)


@functools.lru_cache(maxsize=4)
def cached_finder(template_json: str) -> FaceFinder:
    """One detector and landmark model per worker process (0.6 s to load), reused by every task it runs."""
    return FaceFinder(json.loads(template_json), copies=1)


def image_source(path: str) -> str | bytes:
    """A local path as it is; a URI's bytes, read through pyarrow's file systems."""
    if "://" in path:
        from serving.uri import read_uri

        return read_uri(path)
    return path


def frame_batch(batch: dict[str, np.ndarray], size: tuple[int, int], template_json: str | None) -> dict:
    """CPU task: each row's image read and framed for the model (its largest face aligned, or the whole crop).
    Rows without a face, or whose image cannot be decoded, carry an empty image and say why."""
    finder = cached_finder(template_json) if template_json else None
    images, found, errors = [], [], []
    for path in batch["path"]:
        pixels, ok, error = np.zeros((size[1], size[0], 3), np.uint8), False, ""
        try:
            pixels, ok = prepare_face(image_source(str(path)), size, finder).pixels, True
        except NoFace:
            pass
        except (InputError, OSError) as exc:
            error = str(exc) or type(exc).__name__
        images.append(pixels)
        found.append(ok)
        errors.append(error)
    return {"row": batch["row"], "gender": batch["gender"], "race": batch["race"], "image": np.stack(images),
            "found": np.array(found), "error": np.array(errors, dtype=object)}


class Scorer:
    """Model actor: the graph loaded once (its files from the object store), then each batch's framed images
    scored with serving.batch.score_chunk, as the local scorer scores them."""

    def __init__(self, files, device: str):
        import ray

        files = ray.get(files) if isinstance(files, ray.ObjectRef) else files  # {name: bytes}, shared by the pool
        self.folder = tempfile.mkdtemp(prefix="agegroup-model-")
        for name, content in files.items():
            Path(self.folder, name).write_bytes(content)
        self.model = OnnxModel(Path(self.folder) / "age_ensemble.onnx", device=device, threads=1, quiet=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        found = batch["found"].astype(bool)
        images = [image if ok else None for image, ok in zip(batch["image"], found)]
        demographics = pd.DataFrame({"Gender": batch["gender"], "Race": batch["race"]})
        return {"row": batch["row"], "found": found, "error": batch["error"], "node": np.full(len(found), node_id()),
                **score_chunk(self.model, images, demographics)}


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def connect(address: str) -> None:
    """Join the cluster at `address` ("local": start a Ray instance on this machine), quietly."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=None if address == "local" else address, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise DataError(f"cannot reach the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None


def score_table_on_ray(model_path: Path, table: pd.DataFrame, address: str = "local", aligned: bool = False,
                       batch_size: int = 256, actors: int = 0, progress: bool = True) -> dict[str, np.ndarray]:
    """Every graph output for every row, in input order, plus `found` (N,) bool and `node` (N,) the Ray node
    that scored each row: what serving.batch.score_table returns, computed on the cluster. Raises DataError
    naming every row whose image cannot be decoded, as the local scorer does."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise DataError("scoring on Ray needs the ray extra: pip install -e '.[ray]'") from None
    connect(address)
    metadata = json.loads(model_path.with_suffix(".json").read_text())
    size = tuple(metadata["input_size"][::-1])  # (width, height), as Pillow takes it
    template = None if aligned else json.dumps(metadata["face_template"])
    files = {"age_ensemble.onnx": model_path.read_bytes(), "age_ensemble.json": model_path.with_suffix(".json")
             .read_bytes()}
    gpus = ray.cluster_resources().get("GPU", 0)
    pool = actors or max(1, int(ray.cluster_resources().get("CPU", 1) / SCORER_CPUS / 2))
    ray.data.DataContext.get_current().enable_progress_bars = progress
    frame = pd.DataFrame({"row": np.arange(len(table)), "path": table["path"].to_numpy(),
                          "gender": table["Gender"].to_numpy(np.int64), "race": table["Race"].to_numpy(np.int64)})
    chunk = max(1, min(batch_size, -(-len(frame) // (2 * pool))))  # at least two batches per actor
    blocks = [frame.iloc[i:i + chunk] for i in range(0, len(frame), chunk)]  # (from_pandas' own split fails
    # on numpy 2.4: np.array_split of a DataFrame returns arrays)
    dataset = (ray.data.from_pandas(blocks)
               .map_batches(frame_batch, batch_size=chunk, batch_format="numpy", num_cpus=FRAME_CPUS,
                            fn_kwargs={"size": size, "template_json": template})
               .map_batches(Scorer, batch_size=chunk, batch_format="numpy", compute=ray.data.ActorPoolStrategy(
                            size=pool), num_cpus=0 if gpus else SCORER_CPUS, num_gpus=1 if gpus else 0,
                            fn_constructor_kwargs={"files": ray.put(files), "device": "cuda" if gpus else "cpu"}))
    parts = list(dataset.iter_batches(batch_format="numpy", batch_size=None))
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
    if len(merged.get("row", ())) != len(table):
        raise DataError(f"Ray returned {len(merged.get('row', ()))} rows for {len(table)}: nothing written")
    order = np.argsort(merged.pop("row"), kind="stable")
    result = {k: v[order] for k, v in merged.items()}
    bad = {i: str(e) for i, e in enumerate(result.pop("error")) if e}
    if bad:
        raise undecodable(bad, table["path"].tolist())
    return result
