"""The served path's batch cap: /predict req/s at 32 clients (aligned crops) for several $AGEGROUP_MAX_BATCH_SIZE
values, against the same graph in-process (batch 32, 2 threads), in one run. Prints a table; writes
bench/results/batch_cap.json.

    .venv/bin/python bench/batch_cap.py --caps 8 12 16 --rounds 2

The service runs two 1-thread batches side by side (serving/runtime.py). With 32 clients and a cap of 16, every
request in flight is inside one of the two batches, so a core waits while a finished batch's clients send their
next requests; a lower cap leaves requests queued for the next batch. Each round serves every cap once, in turn,
so drifts of a noisy machine fall on all of them; each figure is the best of its rounds. Run it on an idle machine:
it prints the load average it started at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.quantization import cpu_name  # noqa: E402
from bench.serving import RESULTS, images_per_s, measured_load, random_batch, start_server, stop_server  # noqa: E402
from serving.runtime import MODEL_DIR, OnnxModel  # noqa: E402


def served(model: Path, cap: int, clients: int, requests: int) -> dict:
    env = {"AGEGROUP_MODEL_DIR": str(model.resolve().parent), "AGEGROUP_MAX_BATCH_SIZE": str(cap)}
    proc, url = start_server(env, RESULTS / f"serve-cap-{cap}.log")
    try:
        measured_load(proc, url, 4, 40)  # warm-up
        return measured_load(proc, url, clients, requests)
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "age_ensemble.onnx")
    parser.add_argument("--caps", type=int, nargs="+", default=[8, 12, 16])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_cap.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"load average at start {load:.2f}; {cpu_name()}, {os.cpu_count()} cores; {args.model}", flush=True)
    model = OnnxModel(args.model, device="cpu", threads=2)
    batch = random_batch(32, model.height, model.width)
    in_process, runs = [], {cap: [] for cap in args.caps}
    for r in range(args.rounds):
        in_process.append(images_per_s(lambda: model.predict(*batch), 32, seconds=5.0))
        print(f"round {r + 1}: in-process batch 32, 2 threads: {in_process[-1]:.1f} img/s", flush=True)
        for cap in args.caps:
            runs[cap].append(served(args.model, cap, args.clients, args.requests))
            row = runs[cap][-1]
            print(f"round {r + 1}: cap {cap}: {row['rps']:.1f} req/s, p50 {row['p50_ms']:.0f} ms, "
                  f"{row['failures']} failures", flush=True)
    best = max(in_process)
    print(f"\n| batch cap | served req/s at {args.clients} clients (best of {args.rounds}) | each round | "
          f"served / in-process | p50 ms | p99 ms | server core-ms a request | failures |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    table = []
    for cap, rows in runs.items():
        top = max(rows, key=lambda row: row["rps"])
        table.append({"cap": cap, "rps": top["rps"], "rps_by_round": [row["rps"] for row in rows],
                      "served_over_in_process": top["rps"] / best, "p50_ms": top["p50_ms"], "p99_ms": top["p99_ms"],
                      "server_core_ms_per_request": top["server_core_ms_per_request"],
                      "failures": sum(row["failures"] for row in rows)})
        t = table[-1]
        print(f"| {cap} | {t['rps']:.1f} | {', '.join(f'{x:.1f}' for x in t['rps_by_round'])} | "
              f"{t['served_over_in_process']:.2f} | {t['p50_ms']:.0f} | {t['p99_ms']:.0f} | "
              f"{t['server_core_ms_per_request']:.1f} | {t['failures']} |")
    print(f"in-process batch 32, 2 threads: {best:.1f} img/s (best of {args.rounds}: "
          f"{', '.join(f'{x:.1f}' for x in in_process)})")
    report = {"load_average_at_start": load, "cpu": cpu_name(), "cores": os.cpu_count(), "model": str(args.model),
              "clients": args.clients, "requests": args.requests, "in_process_images_per_s": in_process,
              "caps": table}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
