"""The BentoML service `AgeGroup`: the HTTP API, with adaptive batching of onnxruntime inference in the same process.

    bentoml serve                      # from the repo root; bentofile.yaml names serving.service:AgeGroup
    curl -F image=@face.jpg -F gender=1 -F race=0 http://localhost:3000/predict
    curl http://localhost:3000/model   # the shipped model's version and metadata

Uploads pass serving/guard.py first, so every client mistake is one JSON 4xx: {"error": "..."}. Concurrent
requests are grouped into one onnxruntime run by BentoML's adaptive batching (serving/batching.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Annotated

import bentoml
import numpy as np
from bentoml._internal.context import server_context
from PIL.Image import Image
from prometheus_client import Histogram
from pydantic import Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route as HttpRoute

from serving.batching import AdaptiveBatcher, Overloaded
from serving.face import FaceFinder, Framed, NoFace, prepare_face
from serving.guard import Route, UploadGuard, error_response
from serving.image import InputError, prepare_image
from serving.lifecycle import exit_with_parent
from serving.runtime import (
    GENDER_NAMES,
    MODEL_DIR,
    RACE_NAMES,
    OnnxModel,
    describe,
    model_summary,
    serving_layout,
    spinning,
)

log = logging.getLogger("bentoml.agegroup")  # under bentoml's handlers when served

AGE_MODEL = MODEL_DIR / "age_ensemble.onnx"
STL10_MODEL = MODEL_DIR / "stl10_mlp.onnx"
# Two 1-thread batches run side by side (LAYOUT): a batch that takes every waiting request leaves the other core
# without work until it ends. bench/serving.py on 2 cores, 32 clients: 66-81 req/s (p50 540-670 ms) with batches
# of up to 32, 82-84 req/s (p50 380 ms) with 8 or 16; onnxruntime's own throughput is flat from batch 8 up.
MAX_BATCH_SIZE = int(os.environ.get("AGEGROUP_MAX_BATCH_SIZE", 16))
# BentoML's dispatcher answers 503 to a request it expects to miss this bound (queue + inference); 5 s sheds
# load only far past saturation (bench/serving.py: p99 well under 1 s at 64 clients).
MAX_LATENCY_MS = int(os.environ.get("AGEGROUP_MAX_LATENCY_MS", 5000))
BATCHING = os.environ.get("AGEGROUP_BATCHING", "1") != "0"  # 0: one onnxruntime run per request (for benchmarks)
LAYOUT = serving_layout()  # on 2 cores: 1 worker, two 1-thread batches at once; see serving/runtime.py
# Images up to this many pixels are decoded on the event loop (about 1 ms for a 200x200 JPEG, less than a hop
# to a thread and back); larger ones in a thread, so that a big upload never stalls the other requests.
INLINE_DECODE_PIXELS = 512 * 512


Gender = Annotated[int, Field(ge=0, le=len(GENDER_NAMES) - 1, description="0 male, 1 female")]
Race = Annotated[int, Field(ge=0, le=len(RACE_NAMES) - 1, description="0 White, 1 Black, 2 Asian, 3 Indian, 4 Others")]
Aligned = Annotated[bool, Field(description="true: the image is already a face crop framed like the training "
                                            "crops; skip detection and score it whole")]
UPLOAD_ROUTES = {"/predict": Route("image", {"gender": (0, len(GENDER_NAMES) - 1), "race": (0, len(RACE_NAMES) - 1)},
                                   optional_bools=("aligned",)),
                 "/classify_image": Route("image", {})}


async def model_info(_request) -> JSONResponse:
    """GET /model: the shipped model's version (sha256 of the graph) and what it was trained and validated as."""
    return JSONResponse(model_summary(AGE_MODEL))


# GET routes beside BentoML's (its APIs are POST); mounted so that they match only these paths.
info_app = Starlette(routes=[HttpRoute("/model", model_info, methods=["GET"])])


def batch_size_metric(max_batch_size: int) -> Histogram:
    """BentoML's own adaptive-batching histogram (bentoml_service_adaptive_batch_size), same name and labels,
    now observed here. Made in the worker, after BentoML has set up multiprocess metrics."""
    buckets = [2.0 ** i for i in range(max(1, max_batch_size).bit_length() + 1)] + [float("inf")]
    return Histogram("adaptive_batch_size", "Service adaptive batch size", namespace="bentoml_service",
                     labelnames=["runner_name", "worker_index", "method_name", "service_version", "service_name"],
                     buckets=buckets)


@bentoml.asgi_app(info_app, path="/")
@bentoml.service(workers=LAYOUT.workers, traffic={"timeout": 60, "max_concurrency": 512})
class AgeGroup:
    """POST a face photo with gender and race; get its age group and the five probabilities."""

    def __init__(self) -> None:
        exit_with_parent()
        self.age = OnnxModel(AGE_MODEL, threads=LAYOUT.threads)
        # A request alone in this worker (light load) runs on all of the worker's cores, so its latency is the
        # model's best; under load, each batch keeps to LAYOUT.threads and batches run side by side.
        self.age_alone = (OnnxModel(AGE_MODEL, threads=LAYOUT.alone_threads, quiet=True,  # same file: logged once
                                    spin=spinning(alone=True))
                          if LAYOUT.alone_threads > LAYOUT.threads else self.age)
        self.in_flight = 0  # /predict requests this worker is decoding, batching or computing
        self.version = model_summary(AGE_MODEL)["version"]
        template = self.age.metadata.get("face_template")
        self.finder = FaceFinder(template) if template else None
        if self.finder is None:
            log.warning("%s has no face template: every image is scored whole, as an aligned crop", AGE_MODEL.name)
        self.stl10 = OnnxModel(STL10_MODEL, threads=LAYOUT.threads) if STL10_MODEL.exists() else None
        if self.stl10 is None:
            log.info("no STL-10 model at %s: /classify_image answers 404 until one is exported", STL10_MODEL)
        sizes = batch_size_metric(MAX_BATCH_SIZE)

        def batcher(method: str, run_batch) -> AdaptiveBatcher:
            observe = sizes.labels(runner_name="AgeGroup", worker_index=server_context.worker_index,
                                   method_name=method, service_version=server_context.bento_version,
                                   service_name=server_context.bento_name).observe
            return AdaptiveBatcher(method, run_batch, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS,
                                   enabled=BATCHING, on_batch=observe,
                                   concurrent=LAYOUT.concurrent_batches)

        self.age_batcher = batcher("predict_age", self.predict_age_batch)
        self.stl10_batcher = batcher("predict_stl10", self.predict_stl10_batch)

    def predict_age_batch(self, faces: list[dict]) -> list[dict]:
        """faces: [{"image": uint8 (H, W, 3), "gender": int, "race": int}] -> each one's graph outputs by name."""
        images = np.stack([f["image"] for f in faces])  # (B, H, W, 3)
        gender, race = (np.array([f[k] for f in faces], dtype=np.int64) for k in ("gender", "race"))
        # All cores only for a request alone in the worker: a larger batch that took every waiting request can
        # still overlap the next batch, and three threads on two cores would leave a straggler in both.
        model = self.age_alone if len(faces) == 1 and self.in_flight <= 1 else self.age
        outputs = model.predict_all(images, gender, race)
        return [{name: values[i] for name, values in outputs.items()} for i in range(len(faces))]

    async def frame(self, image: Image, aligned: bool) -> Framed:
        """The model's input for an upload: the largest face found and aligned (in a thread: dlib releases the
        GIL), or with `aligned` the whole image as a crop."""
        size = (self.age.width, self.age.height)
        if aligned or self.finder is None:
            return Framed(await decode(image, size), None, None)
        return await asyncio.to_thread(prepare_face, image, size, self.finder)

    def predict_stl10_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """[(96, 96, 3) uint8] -> [(10,) probabilities]."""
        probabilities, _ = self.stl10.predict(np.stack(images))
        return list(probabilities)

    @bentoml.api(route="/predict")
    async def predict(self, image: Image, gender: Gender, race: Race, aligned: Aligned = False) -> dict:
        """The age group (10-19 ... 50-60), age in years and its 10th-90th percentile range of the face in `image`;
        gender 0 male, 1 female; race 0-4. The largest face in the photo is found, aligned and scored
        (`face`: its box [x, y, width, height] in the upload's pixels and the detector's score; `faces_found`);
        `aligned=true` skips detection for images that are already face crops.

        Errors: 4xx with {"error": "what is wrong"} (422 when no face is found); 503 with the same shape while
        the server is overloaded."""
        self.in_flight += 1
        try:
            framed = await self.frame(image, aligned)
            out = await self.age_batcher({"image": framed.pixels, "gender": gender, "race": race})
        except InputError as exc:
            log.info("POST /predict refused with 400: %s", exc)
            return error_response(400, str(exc))
        except NoFace as exc:
            log.info("POST /predict refused with 422: %s", exc)
            return error_response(422, str(exc))
        except Overloaded as exc:
            return error_response(503, str(exc))
        finally:
            self.in_flight -= 1
        answer = describe(self.age.class_names, out["probabilities"], out["label"], "age_group", out.get("age"),
                          out.get("age_range"))
        answer.update(face=framed.face.to_json() if framed.face else None, faces_found=framed.faces_found,
                      aligned=framed.face is None, model_version=self.version)
        return JSONResponse(answer, headers={"X-Model-Version": self.version})

    @bentoml.api(route="/classify_image")
    async def classify_image(self, image: Image) -> dict:
        """The STL-10 class of `image` (airplane, bird, ... truck), when an STL-10 model is shipped."""
        if self.stl10 is None:
            return error_response(404, f"no STL-10 model is shipped: export one to {STL10_MODEL}")
        try:
            pixels = await decode(image, (self.stl10.width, self.stl10.height))
            probabilities = await self.stl10_batcher(pixels)
        except InputError as exc:
            return error_response(400, str(exc))
        except Overloaded as exc:
            return error_response(503, str(exc))
        return describe(self.stl10.class_names, probabilities, int(np.argmax(probabilities)))


AgeGroup.add_asgi_middleware(UploadGuard, routes=UPLOAD_ROUTES)



async def decode(image: Image, size: tuple[int, int]) -> np.ndarray:
    """serving/image.py's prepare_image: small images on the event loop, large ones in a thread."""
    if image.size[0] * image.size[1] <= INLINE_DECODE_PIXELS:
        return prepare_image(image, size)
    return await asyncio.to_thread(prepare_image, image, size)
