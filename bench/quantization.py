"""int8 against float of the same members, in one run: speed in-process (batch 1 and 32, 1 and 2 threads, and
the service's layout: two 1-thread batches side by side),
validation accuracy, macro-F1, age MAE, label agreement, max |delta prob|, file size, and /predict served at
32 clients with each graph. Prints a table; writes bench/results/quantization.json.

    .venv/bin/python bench/quantization.py --float runs/face/float/age_ensemble.onnx \\
        --int8 exported/age_ensemble.onnx --data-dir ../shared/data/faces

Run it on an idle machine (it prints the load average it started at): the speeds are compared as ratios
within the run, each figure the best of three rounds that alternate between the graphs. The served figures are
the best of --served-rounds rounds that serve each graph in turn, each time right after timing that graph
in-process at batch 32 on 2 threads, which is what the served / in-process ratio divides by.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving import images_per_s, measured_load, null_model, warm_server  # noqa: E402
from serving.runtime import MODEL_DIR, OnnxModel  # noqa: E402
from serving.service import MAX_BATCH_SIZE  # noqa: E402
from training.quantize import compare_on_faces, split_faces  # noqa: E402

RESULTS = REPO / "bench" / "results"
BATCHES, THREADS, ROUNDS = (1, 32), (1, 2), 3
# The serving layout's compute (serving/runtime.py on 2 cores): two 1-thread batches of up to MAX_BATCH_SIZE at once.
SIDE_BY_SIDE = f"2 x 1 thread batch={MAX_BATCH_SIZE} side by side"


def cpu_name() -> str:
    """lscpu's model name with its family and model (a virtual machine's name alone, "AMD EPYC", hides the
    generation: family 23 model 1 is Zen 1, whose 128-bit AVX2 units make int8 no faster than float) and
    whether it has VNNI, which int8 convolutions need to be fast."""
    fields = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if ":" in line)
    name = fields.get("Model name", platform.processor()).strip()
    flags = fields.get("Flags", "").split()
    vnni = "VNNI" if {"avx512_vnni", "avx_vnni"} & set(flags) else "no VNNI"
    return f"{name} (family {fields.get('CPU family', '?').strip()}, model {fields.get('Model', '?').strip()}, {vnni})"


def in_process(paths: dict[str, Path], faces) -> dict:
    """Best-of-ROUNDS images/s of every graph at every (threads, batch), rounds alternating between graphs."""
    speeds = {name: {} for name in paths}
    for threads in THREADS:
        models = {name: OnnxModel(path, device="cpu", threads=threads) for name, path in paths.items()}
        for n in BATCHES:
            batch = (faces.images[:n], faces.gender[:n], faces.race[:n])
            for _ in range(ROUNDS):
                for name, model in models.items():
                    rate = images_per_s(lambda: model.predict(*batch), n, seconds=2.0)
                    key = f"threads={threads} batch={n}"
                    speeds[name][key] = max(speeds[name].get(key, 0.0), rate)
    pairs = {name: [OnnxModel(path, device="cpu", threads=1) for _ in range(2)] for name, path in paths.items()}
    batch = (faces.images[:MAX_BATCH_SIZE], faces.gender[:MAX_BATCH_SIZE], faces.race[:MAX_BATCH_SIZE])
    for _ in range(ROUNDS):
        for name, pair in pairs.items():
            rate = side_by_side([lambda model=model: model.predict(*batch) for model in pair], MAX_BATCH_SIZE)
            speeds[name][SIDE_BY_SIDE] = max(speeds[name].get(SIDE_BY_SIDE, 0.0), rate)
    return speeds


def side_by_side(runs: list, n: int, seconds: float = 2.0) -> float:
    """Images per second of the `runs` called at once, each in a thread of its own (onnxruntime releases the GIL),
    one batch of n per call: what the service's batches running side by side can compute at most."""
    rates = [0.0] * len(runs)

    def measure(i: int) -> None:
        rates[i] = images_per_s(runs[i], n, seconds)

    workers = [threading.Thread(target=measure, args=(i,)) for i in range(len(runs))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(rates)


def served(paths: dict[str, Path], faces, clients: int, requests: int, rounds: int) -> dict:
    """/predict at `clients` concurrent clients (aligned crops) with the service's defaults, per graph, `rounds`
    times in turn; each time the same graph's in-process batch 32 on 2 threads is timed just before it is served,
    so the served / in-process ratio divides figures taken a minute apart, not a whole run apart. And a lone client
    of a null graph (the contract, no compute): the serving stack's own latency and CPU."""
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        with warm_server({"AGEGROUP_MODEL_DIR": str(null_model(paths["int8"], Path(tmp)).parent)},
                         RESULTS / "serve-quantization-null.log") as (proc, url):
            rows["null"] = {"alone": measured_load(proc, url, 1, 200)}
    batch = (faces.images[:32], faces.gender[:32], faces.race[:32])
    models = {name: OnnxModel(path, device="cpu", threads=2) for name, path in paths.items()}  # loaded once
    runs = {name: [] for name in paths}
    for r in range(rounds):
        for name, path in paths.items():
            beside = images_per_s(lambda: models[name].predict(*batch), 32, seconds=5.0)
            with tempfile.TemporaryDirectory() as tmp:  # the service reads age_ensemble.onnx + .json of a folder
                for suffix in (".onnx", ".json"):
                    shutil.copyfile(path.with_suffix(suffix), Path(tmp) / f"age_ensemble{suffix}")
                log = RESULTS / f"serve-quantization-{name}.log"
                with warm_server({"AGEGROUP_MODEL_DIR": tmp}, log) as (proc, url):
                    row = measured_load(proc, url, clients, requests)
                    row["alone"] = measured_load(proc, url, 1, 100)  # a lone client: its batch of one
            row["in_process_batch32"] = beside
            runs[name].append(row)
            print(f"round {r + 1}: {name}: in-process batch 32 {beside:.1f} img/s, served {row['rps']:.1f} req/s "
                  f"({row['rps'] / beside:.2f}), lone client p50 {row['alone']['p50_ms']:.1f} ms", flush=True)
    for name, by_round in runs.items():  # the best of the rounds, as for the in-process figures
        rows[name] = {**max(by_round, key=lambda row: row["rps"]),
                      "alone": min((row["alone"] for row in by_round), key=lambda row: row["p50_ms"]),
                      "in_process_batch32": max(row["in_process_batch32"] for row in by_round),
                      "by_round": [{"rps": row["rps"], "in_process_batch32": row["in_process_batch32"],
                                    "lone_p50_ms": row["alone"]["p50_ms"]} for row in by_round]}
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float", dest="float_model", type=Path, required=True, help="the float graph")
    parser.add_argument("--int8", type=Path, default=MODEL_DIR / "age_ensemble.onnx", help="the int8 graph")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients for the served figure")
    parser.add_argument("--requests", type=int, default=640, help="requests for the served figure")
    parser.add_argument("--served-rounds", type=int, default=2, help="rounds of serving each graph in turn")
    parser.add_argument("--skip-service", action="store_true", help="in-process figures only")
    parser.add_argument("--before", type=Path, help="another graph (the one shipped before, say) timed in-process "
                        "in the same rounds: is the new one slower?")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantization.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f} ({os.cpu_count()} cores, {cpu_name()})", flush=True)
    paths = {"float": args.float_model, "int8": args.int8}
    meta = json.loads(args.int8.with_suffix(".json").read_text())
    split = meta["validation"]
    _, faces = split_faces(args.data_dir, meta["input_size"][0], split["fraction"], split["seed"], 0, 0,
                           meta["data_sha256"], split.get("folds", 0), split.get("fold", 0))
    seen = "" if split["size"] else " (seen in training: the model trained on all of data.csv)"
    quality = compare_on_faces(paths["float"], paths["int8"], faces)
    speeds = in_process({**paths, "before": args.before} if args.before else paths, faces)
    service = {} if args.skip_service else served(paths, faces, args.clients, args.requests, args.served_rounds)
    rows = []
    for name, path in paths.items():
        row = {"graph": name, "MB": path.stat().st_size / 1e6, **quality[name], **speeds[name]}
        if service:
            row[f"served req/s ({args.clients} clients)"] = service[name]["rps"]
            row["served p50 ms"] = service[name]["p50_ms"]
            row["1 client p50 ms"] = service[name]["alone"]["p50_ms"]
            row["1 client p50 - in-process batch 1 ms"] = (service[name]["alone"]["p50_ms"]
                                                           - 1000 / speeds[name]["threads=2 batch=1"])
            row["served / in-process b32 timed beside it"] = (service[name]["rps"]
                                                              / service[name]["in_process_batch32"])
            row["served / side by side"] = service[name]["rps"] / speeds[name][SIDE_BY_SIDE]
            row["1 client p50 - null graph's - in-process batch 1 ms"] = (
                row["1 client p50 - in-process batch 1 ms"] - service["null"]["alone"]["p50_ms"])
        rows.append(row)
    if args.before:
        rows.append({"graph": f"before ({args.before})", "MB": args.before.stat().st_size / 1e6, **speeds["before"]})
    ratios = {key: speeds["int8"][key] / speeds["float"][key] for key in speeds["float"]}
    before = {key: speeds["int8"][key] / speeds["before"][key] for key in speeds["before"]} if args.before else None
    if service:
        ratios["served"] = service["int8"]["rps"] / service["float"]["rps"]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) and v < 10 else f"{v:.1f}"
                                if isinstance(v, float) else str(v) for v in (row.get(c, "") for c in columns))
              + " |")
    print("int8 / float: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))
    if before:
        print("int8 / before: " + ", ".join(f"{k} x{v:.2f}" for k, v in before.items()))
    if service:
        floor = service["null"]["alone"]
        print(f"serving stack alone (null graph, 1 client): p50 {floor['p50_ms']:.1f} ms, server "
              f"{floor['server_core_ms_per_request']:.1f} core-ms and client {floor['client_core_ms_per_request']:.1f} "
              "core-ms a request")
    print(f"label agreement {quality['label_agreement']:.1%} of {quality['faces']} comparison faces{seen}; max |dprob| "
          f"{quality['max_abs_diff_prob']:.3f}; max |dage| {quality['max_abs_diff_age_years']:.2f} years")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"load_average_at_start": load, "cpu": cpu_name(), "cores": os.cpu_count(),
                                    "rows": rows, "int8_over_float": ratios, "agreement": quality,
                                    "int8_over_before": before,
                                    "service": service}, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
