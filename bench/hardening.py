"""Robustness figures of the served API: a soak, slow uploaders, worst-case uploads' memory, kill -9 of the server.

    .venv/bin/python bench/hardening.py            # serves exported/ on a free port; prints a table
Writes bench/results/hardening.json. Run it on an otherwise idle machine (it checks the load average).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from loadgen import face_jpeg  # noqa: E402


def bench_module(name: str):
    """A sibling bench script as a module (bench/serving.py would shadow the serving package by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_serving_bench = bench_module("serving")
start_server, stop_server = _serving_bench.start_server, _serving_bench.stop_server

RESULTS = REPO / "bench" / "results"


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        for child in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in child.read_text().split()]
    return total / 1e6


def slow_uploaders(url: str, count: int, good: int) -> dict:
    """`count` connections trickle a body; meanwhile `good` ordinary requests are timed from another client."""
    host, port = url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\n")
        sockets.append(sock)
    image, seconds, ok = face_jpeg(), [], 0
    with httpx.Client(timeout=30) as client:
        for _ in range(good):
            start = time.perf_counter()
            r = client.post(url + "/predict", files={"image": ("f.jpg", image, "image/jpeg")},
                            data={"gender": "0", "race": "1", "aligned": "true"})  # a synthetic crop, no face
            seconds.append(time.perf_counter() - start)
            ok += r.status_code == 200
    for sock in sockets:
        sock.close()
    fast = sum(s < 1.0 for s in seconds)
    return {"slow_connections": count, "good_requests": good, "succeeded": ok, "under_1s": fast,
            "share_ok_under_1s": min(ok, fast) / good, "max_s": max(seconds)}


def worst_case_memory(url: str, pid: int, concurrent: int = 16) -> dict:
    """Peak RSS of the server while `concurrent` clients each upload a 6000x6000 RGBA PNG (36 Mpx)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((6000, 6000, 4), np.uint8)).save(buffer, format="PNG")
    png, baseline, peak = buffer.getvalue(), tree_rss_mb(pid), 0.0

    def upload(_):
        return httpx.post(url + "/predict", files={"image": ("big.png", png, "image/png")},
                          data={"gender": "1", "race": "2", "aligned": "true"}, timeout=300).status_code

    with ThreadPoolExecutor(concurrent) as pool:
        futures = [pool.submit(upload, i) for i in range(concurrent)]
        while not all(f.done() for f in futures):
            peak = max(peak, tree_rss_mb(pid))
            time.sleep(0.1)
        codes = [f.result() for f in futures]
    time.sleep(2)
    return {"uploads": concurrent, "upload_bytes": len(png), "statuses": sorted(set(codes)),
            "baseline_mb": baseline, "peak_mb": peak, "after_mb": tree_rss_mb(pid)}


def soak(url: str, pid: int, rounds: int = 4, per_round: int = 5000, clients: int = 32) -> list[dict]:
    """rounds x per_round requests from `clients` clients (real faces when present): failures, speed and the
    server's memory after each round, to see that it levels off."""
    rows, baseline = [], tree_rss_mb(pid)
    for k in range(rounds):
        load = _serving_bench.load_in_subprocess(url, clients, per_round)
        rows.append({"requests_so_far": per_round * (k + 1), "failures": load["failures"], "rps": load["rps"],
                     "p99_ms": load["p99_ms"], "readyz_max_ms": load["readyz_max_ms"], "baseline_mb": baseline,
                     "rss_mb": tree_rss_mb(pid)})
    return rows


def kill_arbiter(proc) -> dict:
    """SIGKILL `bentoml serve` itself; how long its workers live on."""
    workers = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    start = time.perf_counter()
    while time.perf_counter() - start < 30 and any(Path(f"/proc/{w}").exists() and
                                                   Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"
                                                   for w in workers):
        time.sleep(0.05)
    return {"workers": len(workers), "seconds_until_gone": time.perf_counter() - start}


def main() -> None:
    load = os.getloadavg()[0]
    print(f"load average before the run: {load:.2f}" + ("  (busy machine)" if load > 0.5 else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    proc, url = start_server({}, RESULTS / "serve-hardening.log")
    try:
        results = {"load_average_at_start": load, "soak": soak(url, proc.pid),
                   "slow": slow_uploaders(url, 200, 100), "memory": worst_case_memory(url, proc.pid)}
        results["kill"] = kill_arbiter(proc)
    finally:
        if proc.poll() is None:
            stop_server(proc)
    s, m, k = results["slow"], results["memory"], results["kill"]
    rounds = results["soak"]
    print(f"soak, {rounds[-1]['requests_so_far']} requests at 32 clients: "
          f"{sum(r['failures'] for r in rounds)} failures, slowest /readyz "
          f"{max(r['readyz_max_ms'] for r in rounds):.0f} ms; RSS {rounds[0]['baseline_mb']:.0f} MB before, then "
          + ", ".join(f"{r['rss_mb']:.0f}" for r in rounds) + " MB after each round")
    print(f"200 slow uploaders: {s['succeeded']}/{s['good_requests']} good requests succeeded, "
          f"{s['share_ok_under_1s']:.0%} in under 1 s (slowest {s['max_s']:.2f} s)")
    print(f"16 x 6000x6000 RGBA PNG ({m['upload_bytes'] / 1e3:.0f} kB each), statuses {m['statuses']}: RSS "
          f"{m['baseline_mb']:.0f} MB before, peak {m['peak_mb']:.0f} MB, {m['after_mb']:.0f} MB after")
    print(f"kill -9 of bentoml serve: its {k['workers']} worker(s) gone after {k['seconds_until_gone']:.1f} s")
    (RESULTS / "hardening.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'hardening.json'}")


if __name__ == "__main__":
    main()
