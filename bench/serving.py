"""Serving speed: the running service under load (batching on vs off), ONNX Runtime vs PyTorch in-process,
and batch scoring of a CSV. Prints tables, writes bench/results/serving.json and serving.png.

    .venv/bin/python bench/serving.py --run-dir runs/cpu --csv ../shared/data/faces/testdata.csv

Timings are compared as ratios within one run: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving.runtime import MODEL_DIR, OnnxModel, serving_layout  # noqa: E402

RESULTS = REPO / "bench" / "results"
CONCURRENCY = (1, 8, 32, 64)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def start_server(env_extra: dict, log_path: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", **env_extra}
    bentoml = Path(sys.executable).with_name("bentoml")
    proc = subprocess.Popen([str(bentoml), "serve", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, env=env,
                            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"bench/serving.py: server did not start; see {log_path}")


@contextlib.contextmanager
def warm_server(env_extra: dict, log_path: Path, detect: bool = False):
    """(proc, url) of a server started with `env_extra` and warmed up by 40 requests of 4 clients; stopped on
    leaving the block."""
    proc, url = start_server(env_extra, log_path)
    try:
        load_in_subprocess(url, 4, 40, detect=detect)
        yield proc, url
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


FACES = REPO.parent / "shared" / "data" / "faces" / "testdata.csv"  # real JPEGs for the load, when present


def load_in_subprocess(url: str, concurrency: int, requests: int, faces: Path = FACES, detect: bool = False) -> dict:
    """Run the load from a second process, so the client's CPU use is not counted as the server's."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / "loadgen.py"), url, str(concurrency), str(requests),
                          str(faces), "detect" if detect else "aligned"], capture_output=True, text=True,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `bentoml serve` and every process under it."""
    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def measured_load(proc: subprocess.Popen, url: str, concurrency: int, requests: int, detect: bool = False) -> dict:
    """The load's figures plus the server's CPU per request (core-ms) over the same window."""
    before = server_cpu_seconds(proc.pid)
    row = load_in_subprocess(url, concurrency, requests, detect=detect)
    row["server_core_ms_per_request"] = (server_cpu_seconds(proc.pid) - before) * 1000 / requests
    return row


def null_model(model_path: Path, folder: Path) -> Path:
    """A graph with the shipped contract and almost no compute (uniform probabilities), for the serving
    stack's own ceiling: HTTP, multipart, decode and batching with no model cost. Never shipped."""
    import onnx
    from onnx import TensorProto, helper

    meta = json.loads(model_path.with_suffix(".json").read_text())
    height, width = meta["input_size"]
    classes = len(meta["class_names"])
    nodes = [
        helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["image_f"], ["mean"], axes=[1, 2, 3], keepdims=0),  # touches every pixel
        helper.make_node("Cast", ["gender"], ["gender_f"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["race"], ["race_f"], to=TensorProto.FLOAT),
        helper.make_node("Sum", ["mean", "gender_f", "race_f"], ["total"]),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Unsqueeze", ["nothing", "axis1"], ["column"]),
        helper.make_node("Add", ["column", "uniform"], ["probabilities"]),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "null_model",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", height, width, 3]),
         helper.make_tensor_value_info("gender", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("race", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
         helper.make_tensor("uniform", TensorProto.FLOAT, [1, classes], [1.0 / classes] * classes)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "age_ensemble.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    (folder / "age_ensemble.json").write_text(json.dumps({**meta, "model": "null (bench only)", "members": []}))
    return path


# name -> (environment, concurrency levels). Requests send aligned=true (the faces are crops) except in
# "detect", where the server finds and aligns every face first (serving/face.py), as it does by default.
SERVICE_MODES = {
    "batching": ({"AGEGROUP_BATCHING": "1"}, CONCURRENCY),
    "no batching": ({"AGEGROUP_BATCHING": "0"}, CONCURRENCY),
    "null model": ({"AGEGROUP_BATCHING": "1"}, CONCURRENCY),
    "detect": ({"AGEGROUP_BATCHING": "1"}, (1, 32)),
}


def bench_service(model_path: Path, requests_per_client: int, modes=tuple(SERVICE_MODES)) -> dict:
    """Each mode's server under each load level; workers and threads are the service's own defaults unless
    $AGEGROUP_WORKERS / $AGEGROUP_THREADS are set for this script."""
    results = {}
    for mode in modes:
        env, levels = SERVICE_MODES[mode]
        served = null_model(model_path, RESULTS.parent.parent / "runs" / "null-model") if mode == "null model" \
            else model_path
        env = {**env, "AGEGROUP_MODEL_DIR": str(served.resolve().parent)}
        with warm_server(env, RESULTS / f"serve-{mode.replace(' ', '-')}.log", detect=mode == "detect") as (proc, url):
            results[mode] = []
            for c in levels:
                results[mode].append(measured_load(proc, url, c, max(40, c * requests_per_client), mode == "detect"))
                print(f"  {mode}, {c} clients: {json.dumps(results[mode][-1])}", flush=True)
    return results


def random_batch(n: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n random uint8 images with random gender and race, the same for a given n."""
    rng = np.random.default_rng(n)
    return (rng.integers(0, 255, (n, height, width, 3), dtype=np.uint8), rng.integers(0, 2, n),
            rng.integers(0, 5, n))


def images_per_s(run, n: int, seconds: float = 3.0) -> float:
    """Images per second of `run()`, one batch of n per call: one warm-up call, then at least `seconds`."""
    run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        run()
        count += 1
    return n * count / (time.perf_counter() - start)


def onnx_images_per_s(model: OnnxModel, n: int) -> float:
    """Images per second of `model` at batch size n."""
    batch = random_batch(n, model.height, model.width)
    return images_per_s(lambda: model.predict(*batch), n)


def bench_in_process(run_dir: Path, model_path: Path, threads: int) -> list[dict]:
    """Images per second of the same ensemble in ONNX Runtime and in PyTorch eager, per batch size."""
    import torch

    from training.export import AgeGraph, load_age_ensemble

    torch.set_num_threads(threads)
    graph = AgeGraph(load_age_ensemble(run_dir)[0]).eval()
    model = OnnxModel(model_path, device="cpu", threads=threads)
    rows = []
    for n in BATCH_SIZES:
        tensors = tuple(torch.from_numpy(a) for a in random_batch(n, model.height, model.width))

        def torch_run():
            with torch.inference_mode():
                graph(*tensors)

        row = {"batch_size": n, "onnxruntime_images_per_s": onnx_images_per_s(model, n),
               "pytorch_images_per_s": images_per_s(torch_run, n)}
        row["ratio"] = row["onnxruntime_images_per_s"] / row["pytorch_images_per_s"]
        rows.append(row)
    return rows


def bench_batch_scoring(csv: Path, model_path: Path, tmp: Path) -> dict:
    from serving.batch import score_csv

    start = time.perf_counter()
    written = score_csv(csv, tmp, model_path=model_path, progress=False)
    seconds = time.perf_counter() - start
    return {"csv": str(csv), "rows": len(written), "seconds": seconds, "rows_per_s": len(written) / seconds}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mode, rows in results.get("service", {}).items():
        c = [r["concurrency"] for r in rows]
        axes[0].plot(c, [r["rps"] for r in rows], marker="o", label=mode)
        axes[1].plot(c, [r["p99_ms"] for r in rows], marker="o", label=mode)
    rows = results.get("in_process", [])
    if rows:
        axes[0].axhline(max(r["onnxruntime_images_per_s"] for r in rows), color="grey", linestyle="--",
                        label="in-process best (img/s)")
    axes[0].set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="service throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="service p99 latency")
    rows = results.get("in_process", [])
    for engine in ("onnxruntime", "pytorch"):
        axes[2].plot([r["batch_size"] for r in rows], [r[f"{engine}_images_per_s"] for r in rows], marker="o",
                     label=engine)
    axes[2].set(xscale="log", xlabel="batch size", ylabel="images/s", title="in-process ensemble")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "cpu",
                        help="training run of the shipped model, for the PyTorch side (skipped if absent)")
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "age_ensemble.onnx", help="exported model")
    parser.add_argument("--csv", type=Path, default=FACES,
                        help="CSV to batch-score (skipped if absent)")
    parser.add_argument("--requests-per-client", type=int, default=6, help="load per concurrency level")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="onnxruntime/torch threads in-process")
    parser.add_argument("--skip-service", action="store_true", help="in-process and CSV only")
    parser.add_argument("--modes", nargs="*", choices=list(SERVICE_MODES), default=list(SERVICE_MODES),
                        help="service configurations to load (the ratios need batching, no batching and null model)")
    parser.add_argument("--skip-in-process", action="store_true", help="service only (no ratios)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json", help="JSON to write (the .png beside it)")
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"load average before the run: {load:.2f}" + ("  (busy machine: timings are not comparable)"
                                                         if load > 0.5 else ""))
    results: dict = {"cpu_count": os.cpu_count(), "threads": args.threads, "model": str(args.model),
                     "load_average_at_start": load}

    if (args.run_dir / "ensemble.pt").exists() and not args.skip_in_process:
        results["in_process"] = bench_in_process(args.run_dir, args.model, args.threads)
        per_worker = serving_layout().threads
        session = OnnxModel(args.model, device="cpu", threads=per_worker)
        results["in_process_service_threads"] = {"threads": per_worker, **{
            f"batch_{n}_images_per_s": onnx_images_per_s(session, n) for n in (1, 32)}}
        print(f"\nin-process, {args.threads} threads (images/s)")
        print(f"{'batch':>6}{'onnxruntime':>13}{'pytorch':>10}{'ratio':>8}")
        for r in results["in_process"]:
            print(f"{r['batch_size']:>6}{r['onnxruntime_images_per_s']:>13.1f}{r['pytorch_images_per_s']:>10.1f}"
                  f"{r['ratio']:>8.2f}")
        same = results["in_process_service_threads"]
        print(f"onnxruntime with the service's {same['threads']} thread(s) per batch: batch 1 "
              f"{same['batch_1_images_per_s']:.1f}, batch 32 {same['batch_32_images_per_s']:.1f} images/s")
    if not args.skip_service:
        results["service"] = bench_service(args.model, args.requests_per_client, args.modes)
        results["service_settings"] = {k: os.environ.get(k, "service default") for k in
                                       ("AGEGROUP_WORKERS", "AGEGROUP_THREADS", "AGEGROUP_MAX_BATCH_SIZE")}
        print("\nservice over HTTP on loopback (load from a second process)")
        print(f"{'mode':<13}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'fail':>6}"
              f"{'readyz max ms':>15}{'core-ms/req':>13}")
        for mode, rows in results["service"].items():
            for r in rows:
                print(f"{mode:<13}{r['concurrency']:>8}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p95_ms']:>9.1f}"
                      f"{r['p99_ms']:>9.1f}{r['failures']:>6}{r['readyz_max_ms']:>15.0f}"
                      f"{r['server_core_ms_per_request']:>13.2f}")
        if {"batching", "no batching", "null model"} - set(args.modes):
            print("(not every service mode ran: no ratios)")
        else:
            on, off = results["service"]["batching"], results["service"]["no batching"]
            results["batching_gain"] = {r["concurrency"]: r["rps"] / o["rps"] for r, o in zip(on, off)}
            print("batching gain (req/s on / off): "
                  + ", ".join(f"{c} clients x{g:.2f}" for c, g in results["batching_gain"].items()))
        if "in_process" in results and "batching_gain" in results:
            same = results["in_process_service_threads"]
            best = max(r["onnxruntime_images_per_s"] for r in results["in_process"])
            batch1 = next(r["onnxruntime_images_per_s"] for r in results["in_process"] if r["batch_size"] == 1)
            by_clients = {r["concurrency"]: r for r in on}
            ceiling = max(r["rps"] for r in results["service"]["null model"])
            results["ratios"] = {
                "null_model_ceiling_over_in_process_best": ceiling / best,
                "batching_gain_at_32_over_in_process_32_over_1": results["batching_gain"][32] / (next(
                    r["onnxruntime_images_per_s"] for r in results["in_process"] if r["batch_size"] == 32) / batch1),
                "served_32_over_in_process_best": by_clients[32]["rps"] / best,
                "served_64_over_served_32": by_clients[64]["rps"] / by_clients[32]["rps"],
                "p99_over_p50_at_32": by_clients[32]["p99_ms"] / by_clients[32]["p50_ms"],
                "p50_1_client_minus_in_process_batch1_ms": by_clients[1]["p50_ms"] - 1000 / batch1,
                "p50_1_client_minus_in_process_batch1_service_threads_ms": by_clients[1]["p50_ms"] - 1000 / same[
                    "batch_1_images_per_s"],
                "batching_gain_at_32_over_service_threads_32_over_1": results["batching_gain"][32] / (
                    same["batch_32_images_per_s"] / same["batch_1_images_per_s"]),
            }
            results["null_model"] = {"ceiling_rps": ceiling, "core_ms_per_request": min(
                r["server_core_ms_per_request"] for r in results["service"]["null model"] if r["concurrency"] >= 8)}
            print(f"null-model ceiling {ceiling:.0f} req/s ({results['null_model']['core_ms_per_request']:.2f} "
                  f"server core-ms per request); in-process best {best:.0f} img/s, batch 1 {batch1:.0f} img/s")
            print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in results["ratios"].items()))
    if args.csv.exists():
        results["batch_scoring"] = bench_batch_scoring(args.csv, args.model, RESULTS / "submission-bench.csv")
        (RESULTS / "submission-bench.csv").unlink()
        b = results["batch_scoring"]
        print(f"\nbatch scoring {b['rows']} rows: {b['seconds']:.1f} s ({b['rows_per_s']:.0f} rows/s)")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
