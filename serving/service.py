"""BentoML services: `AgeGroup`, the HTTP API, in front of `Models`, which batches ONNX Runtime inference.

    bentoml serve                      # from the repo root; bentofile.yaml names serving.service:AgeGroup
    curl -F image=@face.jpg -F gender=1 -F race=0 http://localhost:3000/predict
"""

from __future__ import annotations

import asyncio
import logging
import os
from http import HTTPStatus
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument, NotFound, ServiceUnavailable

from serving.image import MAX_UPLOAD_BYTES, InputError, prepare_image
from serving.runtime import MODEL_DIR, OnnxModel, check_demographics, describe, read_metadata

log = logging.getLogger("bentoml.agegroup")  # under bentoml's handlers when served

AGE_MODEL = MODEL_DIR / "age_ensemble.onnx"
STL10_MODEL = MODEL_DIR / "stl10_mlp.onnx"
# bench/serving.py on 2 cores: onnxruntime throughput is flat from batch 8 up (~115 images/s), so 32 adds no
# speed but also little latency; larger batches only lengthen the wait of the first request in them.
MAX_BATCH_SIZE = int(os.environ.get("AGEGROUP_MAX_BATCH_SIZE", 32))
# BentoML answers 503 to a request it expects to miss this bound (queue + inference); bench/serving.py saw p99
# 4.0 s at 64 concurrent clients on 2 cores with no request refused, so 5 s sheds load only past that.
MAX_LATENCY_MS = int(os.environ.get("AGEGROUP_MAX_LATENCY_MS", 5000))
BATCHING = os.environ.get("AGEGROUP_BATCHING", "1") != "0"  # 0: one onnxruntime run per request (for benchmarks)


@bentoml.service(workers=1, traffic={"timeout": 60, "max_concurrency": 512})
class Models:
    """The ONNX sessions; concurrent requests are grouped into one onnxruntime run per method."""

    def __init__(self) -> None:
        self.age = OnnxModel(AGE_MODEL)
        self.stl10 = OnnxModel(STL10_MODEL) if STL10_MODEL.exists() else None

    @bentoml.api(batchable=BATCHING, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict_age(self, faces: list[dict]) -> list[dict]:
        """faces: [{"image": uint8 (H, W, 3), "gender": int, "race": int}] -> probabilities and label each."""
        images = np.stack([f["image"] for f in faces])  # (B, H, W, 3)
        gender, race = (np.array([f[k] for f in faces], dtype=np.int64) for k in ("gender", "race"))
        probabilities, labels = self.age.predict(images, gender, race)
        return [{"probabilities": p, "label": int(y)} for p, y in zip(probabilities, labels)]

    @bentoml.api(batchable=BATCHING, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def predict_stl10(self, images: np.ndarray) -> np.ndarray:
        """(B, 96, 96, 3) uint8 -> (B, 10) probabilities."""
        probabilities, _ = self.stl10.predict(images)
        return probabilities


@bentoml.service(workers=1, traffic={"timeout": 60, "max_concurrency": 512})
class AgeGroup:
    """POST a face photo with gender and race; get its age group and the five probabilities."""

    models = bentoml.depends(Models)

    def __init__(self) -> None:
        self.age_meta = read_metadata(AGE_MODEL)
        self.stl10_meta = read_metadata(STL10_MODEL) if STL10_MODEL.exists() else None
        if self.stl10_meta is None:
            log.info("no STL-10 model at %s: /classify_image answers 404 until one is exported", STL10_MODEL)

    @bentoml.api(route="/predict")
    async def predict(self, image: Path, gender: int, race: int) -> dict:
        """The age group (10-19 ... 50-60) of the face in `image`; gender 0 male, 1 female; race 0-4."""
        try:
            gender, race = check_demographics(gender, race)
            pixels = await asyncio.to_thread(decode_upload, image, self.age_meta["input_size"])
        except InputError as exc:
            raise InvalidArgument(str(exc)) from None
        [result] = await call_models(self.models.to_async.predict_age,
                                     [{"image": pixels, "gender": gender, "race": race}])
        return describe(self.age_meta["class_names"], result["probabilities"], result["label"], "age_group")

    @bentoml.api(route="/classify_image")
    async def classify_image(self, image: Path) -> dict:
        """The STL-10 class of `image` (airplane, bird, ... truck), when an STL-10 model is shipped."""
        if self.stl10_meta is None:
            raise NotFound(f"no STL-10 model is shipped: export one to {STL10_MODEL}")
        try:
            pixels = await asyncio.to_thread(decode_upload, image, self.stl10_meta["input_size"])
        except InputError as exc:
            raise InvalidArgument(str(exc)) from None
        probabilities = await call_models(self.models.to_async.predict_stl10, pixels[None])
        return describe(self.stl10_meta["class_names"], probabilities[0], int(np.argmax(probabilities[0])))


async def call_models(method, *args, attempts: int = 3):
    """Call a `Models` method, retrying a dropped connection (inference is idempotent, so a retry is safe).

    BentoML 1.4's internal client reuses pooled connections the dependency has already closed, and
    closes its session every 100 requests under in-flight ones (bentoml/BentoML#4971, #5540).
    """
    for attempt in range(1, attempts + 1):
        try:
            return await method(*args)
        except (aiohttp.ClientConnectionError, RuntimeError) as exc:
            if isinstance(exc, RuntimeError) and "closed" not in str(exc):
                raise
            if attempt == attempts:
                log.warning("model service unreachable after %d attempts: %s", attempts, exc)
                raise ServiceUnavailable("the model service is unavailable; try again shortly") from None


def decode_upload(path: Path, input_size: list[int]) -> np.ndarray:
    """An uploaded file to the model's uint8 (H, W, 3); refuses oversize uploads with HTTP 413."""
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        raise BentoMLException(f"the upload is {size} bytes; the limit is {MAX_UPLOAD_BYTES} bytes",
                               error_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    height, width = input_size
    return prepare_image(path.read_bytes(), (width, height))
