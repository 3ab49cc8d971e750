"""Where the served path spends its CPU: py-spy samples of every server process under load, by stage.

    .venv/bin/python bench/profile_serving.py --clients 32 --requests 1200     # prints a table, writes JSON

Starts `bentoml serve` from the repo root, warms it up, then runs bench/loadgen.py against it while
py-spy (pip install py-spy; not a dependency) samples every Python process of the server. Each sample of a
thread at work is put in the stage of its innermost recognised frame (STAGES); samples of threads waiting
in epoll, in uvloop or on a queue are left out. CPU seconds per process come from
psutil over the same window, so every stage is also given in core-ms per request. Run it on an idle
machine (check `uptime`): the load generator shares the cores and is counted apart.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hardening import bench_module  # noqa: E402

serving_bench = bench_module("serving")  # bench/serving.py: `serving` is the product's package
REPO, RESULTS = serving_bench.REPO, serving_bench.RESULTS
load_in_subprocess, start_server, stop_server = (serving_bench.load_in_subprocess, serving_bench.start_server,
                                                 serving_bench.stop_server)

# (stage, substrings of a frame); a sample goes to the stage of its innermost frame that matches one
# (stages are tried in this order for each frame).
STAGES = (
    ("onnxruntime compute", ("onnxruntime",)),
    ("JPEG decode + resize", ("PIL/", "serving/image.py")),
    ("multipart parsing", ("multipart", "formparsers")),
    ("upload guard (own code)", ("serving/guard.py",)),
    ("hop to Models (client, serialization)", ("aiohttp", "serde.py", "pickle", "_bentoml_impl/client")),
    ("batching (dispatcher, containers)", ("dispatcher.py", "container.py", "serving/batching.py")),
    ("thread hand-off (to_thread, executor)", ("concurrent/futures", "asyncio/threads.py")),
    ("input/output models (pydantic)", ("pydantic", "io_models.py")),
    ("metrics, tracing, logging", ("prometheus", "opentelemetry", "logging", "metrics", "access.py")),
    ("BentoML request handling", ("_bentoml_impl", "_bentoml_sdk", "bentoml/_internal")),
    ("HTTP server (uvicorn, starlette)", ("uvicorn", "h11", "httptools", "starlette")),
    ("service code", ("serving/service.py", "serving/runtime.py")),
    ("event loop", ("asyncio", "uvloop", "selectors")),
)


def server_processes(root: psutil.Process) -> dict[str, psutil.Process]:
    """The server's Python worker processes, named by the service they run (the supervisor too)."""
    named = {"supervisor": root}
    for child in root.children(recursive=True):
        cmdline = " ".join(child.cmdline())
        if "python" not in cmdline:
            continue
        name = next((part.split(":")[-1] for part in child.cmdline() if "serving.service:" in part),
                    f"pid {child.pid}")
        if "--service-name" in child.cmdline():
            name = child.cmdline()[child.cmdline().index("--service-name") + 1]
        named[f"{name} ({child.pid})"] = child
    return named


# Leaf frames of a thread that waits (py-spy counts a thread blocked in Python-called C code as active).
# uvloop waits in C under its run(), so a sample whose innermost Python frame is Runner.run is idle too.
WAITING = ("EpollSelector.select", "_worker (concurrent/futures/thread.py", "Condition.wait", "Queue.get",
           "Event.wait", "Thread.join", "Runner.run (asyncio/runners.py")


def stage_of(stack: str) -> str:
    if any(stack.rsplit(";", 1)[-1].startswith(leaf) for leaf in WAITING):
        return "waiting (idle thread)"
    for frame in reversed(stack.split(";")):
        for stage, needles in STAGES:
            if any(needle in frame for needle in needles):
                return stage
    return "other Python"


def read_samples(path: Path) -> collections.Counter:
    """py-spy --format raw: one 'frame;frame;... count' line per distinct stack."""
    counts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[stage_of(stack)] += int(count)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the load")
    parser.add_argument("--requests", type=int, default=1200, help="requests in the profiled window")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--label", default="current", help="name of this profile in the JSON")
    parser.add_argument("--out", type=Path, default=RESULTS / "profile-serving.json", help="JSON to merge into")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        raise SystemExit("bench/profile_serving.py: py-spy is not installed (pip install py-spy)")
    print(f"load average before: {psutil.getloadavg()[0]:.2f}")
    server, url = start_server({}, RESULTS / "serve-profile.log")
    tmp = REPO / "runs" / "profile"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        load_in_subprocess(url, 8, 80)  # warm-up
        processes = server_processes(psutil.Process(server.pid))
        before = {name: p.cpu_times() for name, p in processes.items()}
        spies = {name: subprocess.Popen([py_spy, "record", "--pid", str(p.pid), "--rate", str(args.rate), "--format",
                                         "raw", "--nonblocking", "--output", str(tmp / f"{p.pid}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for name, p in processes.items() if name != "supervisor"}
        time.sleep(1.0)
        start = time.perf_counter()
        load = load_in_subprocess(url, args.clients, args.requests)
        wall = time.perf_counter() - start
        after = {name: p.cpu_times() for name, p in processes.items()}
        for spy in spies.values():
            spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
        for spy in spies.values():
            spy.wait(timeout=60)
    finally:
        stop_server(server)
    report = {"label": args.label, "load": load, "wall_s": wall, "processes": {}}
    print(f"\n{args.clients} clients: {load['rps']:.1f} req/s, p50 {load['p50_ms']:.1f} ms, "
          f"p99 {load['p99_ms']:.1f} ms, {load['failures']} failures")
    print(f"\n{'process / stage':<46}{'share':>8}{'core-ms/req':>13}")
    for name, p in processes.items():
        cpu = (after[name].user + after[name].system) - (before[name].user + before[name].system)
        core_ms = cpu * 1000 / args.requests  # a little of the warm-up pause is in it; it is idle time
        entry = {"cpu_s": cpu, "core_ms_per_request": core_ms, "stages": {}}
        print(f"{name:<46}{'':>8}{core_ms:>13.2f}")
        if name in spies and (tmp / f"{p.pid}.txt").exists():
            counts = read_samples(tmp / f"{p.pid}.txt")
            waiting = counts.pop("waiting (idle thread)", 0)
            total = sum(counts.values()) or 1  # shares of the samples that did work
            entry["waiting_samples_share"] = waiting / (total + waiting)
            for stage, n in counts.most_common():
                entry["stages"][stage] = {"share": n / total, "core_ms_per_request": core_ms * n / total}
                print(f"  {stage:<44}{n / total:>8.1%}{core_ms * n / total:>13.2f}")
        report["processes"][name] = entry
    total_ms = sum(e["core_ms_per_request"] for e in report["processes"].values())
    report["core_ms_per_request"] = total_ms
    print(f"{'all server processes':<46}{'':>8}{total_ms:>13.2f}  (2 cores = {2000 / total_ms:.0f} req/s at most)")
    log = json.loads(args.out.read_text()) if args.out.exists() else {}
    log[args.label] = report
    args.out.write_text(json.dumps(log, indent=2) + "\n")


if __name__ == "__main__":
    main()
