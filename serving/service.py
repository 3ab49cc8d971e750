"""BentoML services: `AgeGroup`, the HTTP API, in front of `Models`, which batches ONNX Runtime inference.

    bentoml serve                      # from the repo root; bentofile.yaml names serving.service:AgeGroup
    curl -F image=@face.jpg -F gender=1 -F race=0 http://localhost:3000/predict
    curl http://localhost:3000/model   # the shipped model's version and metadata

Uploads pass serving/guard.py first, so every client mistake is one JSON 4xx: {"error": "..."}.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Annotated

import aiohttp
import bentoml
import numpy as np
from PIL.Image import Image
from pydantic import Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route as HttpRoute

from serving.guard import Route, UploadGuard, error_response
from serving.image import InputError, prepare_image
from serving.lifecycle import exit_with_parent
from serving.runtime import GENDER_NAMES, MODEL_DIR, RACE_NAMES, OnnxModel, describe, model_summary, read_metadata

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
        exit_with_parent()
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


Gender = Annotated[int, Field(ge=0, le=len(GENDER_NAMES) - 1, description="0 male, 1 female")]
Race = Annotated[int, Field(ge=0, le=len(RACE_NAMES) - 1, description="0 White, 1 Black, 2 Asian, 3 Indian, 4 Others")]
UPLOAD_ROUTES = {"/predict": Route("image", {"gender": (0, len(GENDER_NAMES) - 1), "race": (0, len(RACE_NAMES) - 1)}),
                 "/classify_image": Route("image", {})}
READY_PROBE_S = 2.0  # /readyz re-asks Models at most this often and answers from the last result meanwhile


async def model_info(_request) -> JSONResponse:
    """GET /model: the shipped model's version (sha256 of the graph) and what it was trained and validated as."""
    return JSONResponse(model_summary(AGE_MODEL))


# GET routes beside BentoML's (its APIs are POST); mounted so that they match only these paths.
info_app = Starlette(routes=[HttpRoute("/model", model_info, methods=["GET"])])


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(workers=1, traffic={"timeout": 60, "max_concurrency": 512}, runner_probe={"enabled": False})
class AgeGroup:
    """POST a face photo with gender and race; get its age group and the five probabilities."""

    models = bentoml.depends(Models)

    def __init__(self) -> None:
        exit_with_parent()
        self.age_meta = read_metadata(AGE_MODEL)
        self.version = model_summary(AGE_MODEL)["version"]
        self.stl10_meta = read_metadata(STL10_MODEL) if STL10_MODEL.exists() else None
        self.models_ready, self.probed_at, self.probe = False, 0.0, None
        if self.stl10_meta is None:
            log.info("no STL-10 model at %s: /classify_image answers 404 until one is exported", STL10_MODEL)

    async def __is_ready__(self) -> bool:
        """Ready once Models has answered a probe. Probes run in the background at most every READY_PROBE_S,
        so /readyz answers at once from the last result, however busy the server is."""
        if time.monotonic() - self.probed_at > READY_PROBE_S and (self.probe is None or self.probe.done()):
            self.probed_at = time.monotonic()
            self.probe = asyncio.create_task(self.probe_models())
        return self.models_ready

    async def probe_models(self) -> None:
        try:
            self.models_ready = bool(await self.models.is_ready(5))
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
            self.models_ready = False

    @bentoml.api(route="/predict")
    async def predict(self, image: Image, gender: Gender, race: Race) -> dict:
        """The age group (10-19 ... 50-60) of the face in `image`; gender 0 male, 1 female; race 0-4.

        Errors: 4xx with {"error": "what is wrong"}; 503 with the same shape while the model is unavailable."""
        try:
            pixels = await asyncio.to_thread(prepare_image, image, input_size(self.age_meta))
        except InputError as exc:
            return error_response(400, str(exc))
        result = await call_models(self.models.to_async.predict_age,
                                   [{"image": pixels, "gender": gender, "race": race}])
        if isinstance(result, JSONResponse):
            return result
        answer = describe(self.age_meta["class_names"], result[0]["probabilities"], result[0]["label"], "age_group")
        return JSONResponse({**answer, "model_version": self.version}, headers={"X-Model-Version": self.version})

    @bentoml.api(route="/classify_image")
    async def classify_image(self, image: Image) -> dict:
        """The STL-10 class of `image` (airplane, bird, ... truck), when an STL-10 model is shipped."""
        if self.stl10_meta is None:
            return error_response(404, f"no STL-10 model is shipped: export one to {STL10_MODEL}")
        try:
            pixels = await asyncio.to_thread(prepare_image, image, input_size(self.stl10_meta))
        except InputError as exc:
            return error_response(400, str(exc))
        probabilities = await call_models(self.models.to_async.predict_stl10, pixels[None])
        if isinstance(probabilities, JSONResponse):
            return probabilities
        return describe(self.stl10_meta["class_names"], probabilities[0], int(np.argmax(probabilities[0])))


AgeGroup.add_asgi_middleware(UploadGuard, routes=UPLOAD_ROUTES)


def input_size(meta: dict) -> tuple[int, int]:
    """(width, height) as Pillow takes it, from the JSON's [height, width]."""
    height, width = meta["input_size"]
    return width, height


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
                return error_response(503, "the model service is unavailable; try again shortly")
