"""HTTP load for bench/serving.py, run as its own process: POST a face to /predict from N clients at once.

    python bench/loadgen.py http://127.0.0.1:3000 32 200 [testdata.csv [detect]]  # url, clients, requests, faces
Requests say aligned=true (the faces are crops: the model's own cost), or with `detect` leave it out so that
the server finds and aligns each face first. Prints one JSON line: throughput, latency percentiles, failures,
the slowest /readyz probe during the
load, and this client's own CPU per request. Bounded: stops after the requests.

The client shares the cores with the server, so it is made cheap: aiohttp (C HTTP parser) and request
bodies encoded once, before the clock starts. Faces are the first 64 images of a face CSV when one is
given (real JPEGs), otherwise one synthetic 200x200 JPEG.
"""

from __future__ import annotations

import asyncio
import io
import json
import resource
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image

BOUNDARY = "agegroup-loadgen-boundary"


def face_jpeg(seed: int = 0) -> bytes:
    """A 200x200 JPEG like the data set's (synthetic, so the benchmark needs no face data)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 200, 200)[None, :, None] + rng.normal(0, 20, (200, 200, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def multipart(image: bytes, gender: int, race: int, aligned: bool = True) -> bytes:
    """A /predict body, encoded once so that the client spends no time on it per request."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="face.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    values = (("gender", gender), ("race", race)) + ((("aligned", "true"),) if aligned else ())
    fields = "".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                     for k, v in values)
    return head + image + b"\r\n" + fields.encode() + f"--{BOUNDARY}--\r\n".encode()


def request_bodies(csv: str | None, aligned: bool = True) -> list[bytes]:
    if not csv or not Path(csv).exists():
        return [multipart(face_jpeg(), 1, 0, aligned)]
    import pandas as pd

    table = pd.read_csv(csv).head(64)
    return [multipart((Path(csv).parent / row.Image).read_bytes(), int(row.Gender), int(row.Race), aligned)
            for row in table.itertuples()]


async def load(url: str, bodies: list[bytes], concurrency: int, requests: int) -> dict:
    """`requests` POSTs from `concurrency` clients at once; throughput and latency percentiles."""
    latencies: list[float] = []
    failures = 0
    queue = iter(range(requests))
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as client:
        async def worker():
            nonlocal failures
            for i in queue:
                t = time.perf_counter()
                async with client.post(url + "/predict", data=bodies[i % len(bodies)], headers=headers) as r:
                    await r.read()
                latencies.append(time.perf_counter() - t)
                failures += r.status != 200

        probes: list[float] = []
        done = asyncio.Event()

        async def probe():  # /readyz every 0.2 s on its own connection while the load runs
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as prober:
                while not done.is_set():
                    t = time.perf_counter()
                    async with prober.get(url + "/readyz") as r:
                        await r.read()
                    probes.append(time.perf_counter() - t if r.status == 200 else float("inf"))
                    await asyncio.sleep(0.2)

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        prober = asyncio.create_task(probe())
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        done.set()
        await prober
    ms = np.array(latencies) * 1000
    client_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    return {"concurrency": concurrency, "requests": requests, "failures": failures, "rps": requests / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "readyz_probes": len(probes),
            "readyz_max_ms": float(max(probes, default=0.0)) * 1000,
            "client_core_ms_per_request": client_cpu * 1000 / requests}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    url, concurrency, requests = args[:3]
    bodies = request_bodies(args[3] if len(args) > 3 else None, aligned=not (len(args) > 4 and args[4] == "detect"))
    print(json.dumps(asyncio.run(load(url, bodies, int(concurrency), int(requests)))))


if __name__ == "__main__":
    main()
