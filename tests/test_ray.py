"""Scoring on Ray Data: a real two-node cluster (tests/ray_cluster.py) inside a network namespace of its own, the
job sent by address, its rows equal to the local scorer's; a model worker killed mid-job."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from serving.batch import score_csv

HELPER = Path(__file__).with_name("ray_cluster.py")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")
needs_netns = pytest.mark.skipif(shutil.which("unshare") is None or subprocess.run(
    ["unshare", "-n", "true"], capture_output=True).returncode != 0, reason="no network namespaces here")


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process of the cluster that uses `temp_dir` (Ray puts it on the command line of each)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if temp_dir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            found.append(p)
    return found


def run_cluster(table: Path, tiny_export: Path, out: Path, *extra: str) -> dict:
    """The helper in a fresh network namespace; the cluster's processes are killed by id afterwards, whatever
    happened."""
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    report = out.with_name(out.name + ".report.json")
    try:
        proc = subprocess.run(["unshare", "-n", sys.executable, str(HELPER), temp_dir, str(table),
                               str(tiny_export / "age_ensemble.onnx"), str(out), str(report), *extra],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(report.read_text())
    finally:
        for p in cluster_processes(temp_dir):
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(cluster_processes(temp_dir), timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def local_rows(table: Path, tiny_export: Path, out: Path) -> pd.DataFrame:
    return score_csv(table, out, model_path=tiny_export / "age_ensemble.onnx", with_probabilities=True,
                     with_ages=True, progress=False)


def assert_same_rows(ray_out: Path, local: pd.DataFrame) -> None:
    got = pd.read_csv(ray_out, dtype={"Category": str})
    want = local.astype({"Category": str})
    assert list(got.columns) == list(want.columns) and list(got["Id"]) == list(want["Id"])
    assert list(got["Category"]) == list(want["Category"])
    numeric = [c for c in got.columns if c.startswith(("p_", "age"))]
    assert np.nanmax(np.abs(got[numeric].to_numpy(float) - want[numeric].to_numpy(float))) <= 1e-6


@needs_ray
@needs_netns
def test_a_two_node_cluster_scores_like_the_local_scorer(face_dir, tiny_export, tmp_path):
    report = run_cluster(face_dir / "testdata.csv", tiny_export, tmp_path / "ray.csv")
    assert report["error"] is None and len(report["nodes"]) == 2
    assert sorted(report["scored_on"]) == sorted(report["nodes"]), report  # both nodes scored rows
    assert_same_rows(tmp_path / "ray.csv", local_rows(face_dir / "testdata.csv", tiny_export, tmp_path / "local.csv"))


@needs_ray
@needs_netns
def test_a_worker_killed_mid_job_loses_no_row(face_dir, tiny_export, tmp_path):
    table = pd.read_csv(face_dir / "testdata.csv")  # 23 rows can be scored within the killer's half second:
    table = pd.concat([table] * 20, ignore_index=True)  # 460 make a job that outlives it
    table["Image"] = [str(face_dir / p) for p in table["Image"]]
    table.to_csv(tmp_path / "long.csv", index=False)
    report = run_cluster(tmp_path / "long.csv", tiny_export, tmp_path / "ray.csv", "--kill-worker")
    assert report["killed"], "no model worker was found to kill"
    if report["error"] is None:  # Ray restarted the actor and retried its batch: every row, as local
        assert_same_rows(tmp_path / "ray.csv", local_rows(tmp_path / "long.csv", tiny_export, tmp_path / "local.csv"))
    else:  # or the job failed: one clear line, nothing written
        assert "\n" not in report["error"] and not (tmp_path / "ray.csv").exists()


@needs_ray
@needs_netns
def test_parquet_in_and_out_with_paths_and_uris(face_dir, tiny_export, tmp_path):
    table = pd.read_csv(face_dir / "testdata.csv").head(9)
    table["Image"] = [str(face_dir / p) if i % 2 else f"file://{face_dir / p}" for i, p in enumerate(table["Image"])]
    table.to_parquet(tmp_path / "in.parquet")  # absolute paths and file:// URIs side by side
    report = run_cluster(tmp_path / "in.parquet", tiny_export, tmp_path / "out.parquet", "--aligned")
    assert report["error"] is None
    back = pd.read_parquet(tmp_path / "out.parquet")
    assert list(back["Id"]) == list(table["Image"])
    local = score_csv(face_dir / "testdata.csv", tmp_path / "local.csv", model_path=tiny_export / "age_ensemble.onnx",
                      aligned=True, with_probabilities=True, with_ages=True, progress=False).head(9)
    assert list(back["Category"].astype(str)) == list(local["Category"].astype(str))
    assert np.abs(back["p_20-29"].to_numpy() - local["p_20-29"].to_numpy()).max() <= 1e-6
