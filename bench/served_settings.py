"""The served path under settings of its environment: /predict (aligned crops) at 1 client (a lone request's
batch of one), 4 and 32 clients, for each setting, against the same graph in-process (batch 1 and 32, 2 threads),
in one run. Prints a table; writes bench/results/served_settings.json.

    .venv/bin/python bench/served_settings.py --setting spin-off=AGEGROUP_SPIN=0 \\
        --setting spin-alone=AGEGROUP_SPIN=alone --setting spin-all=AGEGROUP_SPIN=1
    .venv/bin/python bench/served_settings.py --setting cap8=AGEGROUP_MAX_BATCH_SIZE=8 \\
        --setting cap16=AGEGROUP_MAX_BATCH_SIZE=16 --out bench/results/batch_cap.json

A setting is NAME=VAR=VALUE[,VAR=VALUE...]: environment variables of the server (serving/README.md lists them).
Each round serves every setting once, in turn, so drifts of a noisy machine fall on all of them; each figure is the
best of its rounds (the lowest p50, the highest req/s). Run it on an idle machine: it prints the load average it
started at.
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
from bench.serving import RESULTS, images_per_s, measured_load, random_batch, warm_server  # noqa: E402
from serving.runtime import MODEL_DIR, OnnxModel  # noqa: E402

LONE_REQUESTS = 200


def served(model: Path, name: str, env: dict, clients: list[int], requests: int) -> dict:
    """One server with `env`: a lone client's figures, then each load of `clients`."""
    with warm_server({"AGEGROUP_MODEL_DIR": str(model.resolve().parent), **env},
                     RESULTS / f"serve-setting-{name}.log") as (proc, url):
        rows = {"1": measured_load(proc, url, 1, LONE_REQUESTS)}
        for n in clients:
            rows[str(n)] = measured_load(proc, url, n, requests)
        return rows


def parse_setting(text: str) -> tuple[str, dict]:
    """NAME=VAR=VALUE[,VAR=VALUE...] -> (NAME, {VAR: VALUE})."""
    name, _, assignments = text.partition("=")
    env = dict(a.split("=", 1) for a in assignments.split(",") if "=" in a)
    if not name or not env or len(env) != len(assignments.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=VAR=VALUE[,VAR=VALUE...]")
    return name, env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "age_ensemble.onnx")
    parser.add_argument("--setting", type=parse_setting, action="append", required=True, metavar="NAME=VAR=VALUE",
                        help="a setting to serve with: its name and its server environment (repeat for each)")
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 32], help="loads after the lone client")
    parser.add_argument("--requests", type=int, default=1000, help="requests of each load")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "served_settings.json")
    args = parser.parse_args(argv)
    settings = dict(args.setting)
    load = os.getloadavg()[0]
    print(f"load average at start {load:.2f}; {cpu_name()}, {os.cpu_count()} cores; {args.model}", flush=True)
    model = OnnxModel(args.model, device="cpu", threads=2)
    in_process = {n: [] for n in (1, 32)}
    runs = {name: [] for name in settings}
    for r in range(args.rounds):
        for n in in_process:
            batch = random_batch(n, model.height, model.width)
            in_process[n].append(images_per_s(lambda: model.predict(*batch), n, seconds=5.0))
        print(f"round {r + 1}: in-process, 2 threads: batch 1 {in_process[1][-1]:.1f}, batch 32 "
              f"{in_process[32][-1]:.1f} img/s", flush=True)
        for name, env in settings.items():
            runs[name].append(served(args.model, name, env, args.clients, args.requests))
            rows = runs[name][-1]
            print(f"round {r + 1}: {name}: 1 client p50 {rows['1']['p50_ms']:.1f} ms; "
                  + "; ".join(f"{n} clients {rows[str(n)]['rps']:.1f} req/s" for n in args.clients), flush=True)
    batch1_ms, best32 = 1000 / max(in_process[1]), max(in_process[32])
    print(f"\nin-process, 2 threads: batch 1 {batch1_ms:.2f} ms, batch 32 {best32:.1f} img/s (best of {args.rounds})")
    print("| setting | environment | 1 client p50 ms | minus in-process batch 1 | server core-ms a lone request | "
          + " | ".join(f"{n} clients req/s" for n in args.clients) + f" | {max(args.clients)} clients / in-process "
          "| failures |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(args.clients) + "---:|---:|")
    table = []
    for name, rows in runs.items():
        lone = min((r["1"] for r in rows), key=lambda row: row["p50_ms"])
        loads = {n: max((r[str(n)] for r in rows), key=lambda row: row["rps"]) for n in args.clients}
        top = loads[max(args.clients)]
        table.append({"setting": name, "env": settings[name], "lone_p50_ms": lone["p50_ms"],
                      "lone_p50_by_round": [r["1"]["p50_ms"] for r in rows],
                      "lone_minus_in_process_batch1_ms": lone["p50_ms"] - batch1_ms,
                      "lone_server_core_ms_per_request": lone["server_core_ms_per_request"],
                      "rps": {str(n): loads[n]["rps"] for n in args.clients},
                      "rps_by_round": {str(n): [r[str(n)]["rps"] for r in rows] for n in args.clients},
                      "p50_ms": {str(n): loads[n]["p50_ms"] for n in args.clients},
                      "served_over_in_process": top["rps"] / best32,
                      "failures": sum(r[k]["failures"] for r in rows for k in r)})
        t = table[-1]
        print(f"| {name} | {','.join(f'{k}={v}' for k, v in settings[name].items())} | {t['lone_p50_ms']:.1f} | "
              f"{t['lone_minus_in_process_batch1_ms']:+.1f} | {t['lone_server_core_ms_per_request']:.1f} | "
              + " | ".join(f"{loads[n]['rps']:.1f}" for n in args.clients)
              + f" | {t['served_over_in_process']:.2f} | {t['failures']} |")
    report = {"load_average_at_start": load, "cpu": cpu_name(), "cores": os.cpu_count(), "model": str(args.model),
              "clients": args.clients, "requests": args.requests, "rounds": args.rounds,
              "in_process_images_per_s": {str(n): v for n, v in in_process.items()}, "settings": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
