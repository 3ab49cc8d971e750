"""A real two-node Ray cluster on this machine, run inside a network namespace of its own (only loopback), for
tests/test_ray.py: a head and a second node of one CPU each, a scoring job sent to it by address, and (with
--kill-worker) a model actor's worker process killed while the job runs. Writes its report as JSON to REPORT (not
to stdout: Ray's raylet can print there after the job, e.g. on retrying a killed actor's task).

    unshare -n python tests/ray_cluster.py TEMP_DIR TABLE MODEL OUT REPORT [--kill-worker] [--aligned]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # loopback only: no token


def ray(*args: str) -> None:
    subprocess.run([RAY, *args], check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                   timeout=120)


def kill_a_scorer(killed: list, done: threading.Event) -> None:
    """Kill the first worker process that holds a Scorer actor (its title names it), once it has one. It looks
    until the job ends: on a busy machine the actors can take minutes to start."""
    while not done.is_set() and not killed:
        for p in psutil.process_iter(["pid", "cmdline"]):
            if "Scorer" in " ".join(p.info["cmdline"] or []):
                time.sleep(0.5)  # let it take a batch first
                try:
                    p.kill()
                except psutil.NoSuchProcess:  # gone meanwhile: look for another
                    continue
                killed.append(p.info["pid"])
                return
        time.sleep(0.05)


def main() -> None:
    temp_dir, table, model, out, report = sys.argv[1:6]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ.update(ENV)  # the driver below joins the same cluster
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats"]
    ray("start", "--head", "--port", "6399", "--include-dashboard", "false", *common)
    ray("start", "--address", "127.0.0.1:6399", *common)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ray as ray_api

    from serving.batch import score_csv
    from serving.table import DataError

    ray_api.init(address="127.0.0.1:6399", logging_level="ERROR", log_to_driver=False)
    deadline = time.time() + 60
    while len([n for n in ray_api.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
        time.sleep(0.5)
    nodes = [n["NodeID"] for n in ray_api.nodes() if n["Alive"]]
    killed: list = []
    done = threading.Event()
    if "--kill-worker" in sys.argv:
        threading.Thread(target=kill_a_scorer, args=(killed, done), daemon=True).start()
    import serving.ray_batch as ray_batch

    scored_nodes: list = []
    original = ray_batch.score_table_on_ray

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        scored_nodes.extend(sorted(set(result["node"].tolist())))
        return result

    ray_batch.score_table_on_ray = spy
    error = None
    try:
        score_csv(Path(table), Path(out), model_path=Path(model), with_probabilities=True, with_ages=True,
                  progress=False, ray_address="127.0.0.1:6399", ray_actors=2, chunk_size=8,
                  aligned="--aligned" in sys.argv)
    except DataError as exc:
        error = str(exc)
    done.set()
    Path(report).write_text(json.dumps({"nodes": nodes, "scored_on": scored_nodes, "killed": killed, "error": error}))


if __name__ == "__main__":
    main()
