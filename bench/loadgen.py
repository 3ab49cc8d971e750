"""HTTP load for bench/serving.py, run as its own process: POST a face to /predict from N clients at once.

    python bench/loadgen.py http://127.0.0.1:3000 32 200    # url, concurrent clients, total requests
Prints one JSON line: throughput, latency percentiles, failures, and the slowest /readyz probe during the
load. Bounded: stops after the requests.
"""

from __future__ import annotations

import asyncio
import io
import json
import sys
import time

import httpx
import numpy as np
from PIL import Image


def face_jpeg(seed: int = 0) -> bytes:
    """A 200x200 JPEG like the data set's (synthetic, so the benchmark needs no face data)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 200, 200)[None, :, None] + rng.normal(0, 20, (200, 200, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def load(url: str, image: bytes, concurrency: int, requests: int) -> dict:
    """`requests` POSTs from `concurrency` clients at once; throughput and latency percentiles."""
    latencies: list[float] = []
    failures = 0
    queue = iter(range(requests))
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            nonlocal failures
            for _ in queue:
                t = time.perf_counter()
                r = await client.post(url + "/predict", files={"image": ("face.jpg", image, "image/jpeg")},
                                      data={"gender": "1", "race": "0"})
                latencies.append(time.perf_counter() - t)
                failures += r.status_code != 200

        probes: list[float] = []
        done = asyncio.Event()

        async def probe():  # /readyz every 0.2 s on its own connection while the load runs
            async with httpx.AsyncClient(timeout=30) as prober:
                while not done.is_set():
                    t = time.perf_counter()
                    r = await prober.get(url + "/readyz")
                    probes.append(time.perf_counter() - t if r.status_code == 200 else float("inf"))
                    await asyncio.sleep(0.2)

        start = time.perf_counter()
        prober = asyncio.create_task(probe())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        done.set()
        await prober
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests, "failures": failures, "rps": requests / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "readyz_probes": len(probes),
            "readyz_max_ms": float(max(probes, default=0.0)) * 1000}


def main(argv: list[str] | None = None) -> None:
    url, concurrency, requests = (sys.argv[1:] if argv is None else argv)[:3]
    print(json.dumps(asyncio.run(load(url, face_jpeg(), int(concurrency), int(requests)))))


if __name__ == "__main__":
    main()
