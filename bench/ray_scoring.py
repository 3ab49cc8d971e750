"""Batch scoring on Ray against the local scorer, on this one machine: rows/s at N rows made by repeating the
test images, the outputs compared, and the cost of each stage (image reading and decoding, face finding and
alignment, the model) measured alone, which is what a bigger cluster has to spread. Prints a table; writes
bench/results/ray_scoring.json.

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/ray_scoring.py --rows 10000'

(a network namespace of its own: Ray binds the machine's external interface otherwise). Run it on an idle
machine; it prints the load average it started at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving.batch import score_csv  # noqa: E402
from serving.face import FaceFinder, prepare_face  # noqa: E402
from serving.image import prepare_image  # noqa: E402
from serving.runtime import MODEL_DIR, OnnxModel  # noqa: E402

RESULTS = REPO / "bench" / "results"


def stage_costs(table: pd.DataFrame, model: OnnxModel, n: int = 200) -> dict:
    """Core-ms per image of each stage, one thread, on the first n rows."""
    paths = table["path"].tolist()[:n]
    size = (model.width, model.height)
    finder = FaceFinder(model.metadata["face_template"], copies=1)
    start = time.perf_counter()
    raw = [Path(p).read_bytes() for p in paths]
    read = time.perf_counter() - start
    start = time.perf_counter()
    crops = [prepare_image(b, size) for b in raw]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    framed = [prepare_face(b, size, finder) for b in raw]
    detect = time.perf_counter() - start - decode  # decoding is part of prepare_face too
    single = OnnxModel(model.path, device="cpu", threads=1, quiet=True)
    batch = np.stack(crops[:32]), table["Gender"].to_numpy()[:32], table["Race"].to_numpy()[:32]
    single.predict(*batch)
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < 3:
        single.predict(*batch)
        runs += 1
    infer = (time.perf_counter() - start) / (runs * 32)
    del framed
    return {"read_ms": 1000 * read / n, "decode_ms": 1000 * decode / n, "detect_align_ms": 1000 * detect / n,
            "model_ms_batch32_1thread": 1000 * infer}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=REPO.parent / "shared" / "data" / "faces" / "testdata.csv")
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "age_ensemble.onnx")
    parser.add_argument("--rows", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_scoring.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.2f} ({os.cpu_count()} cores)", flush=True)
    base = pd.read_csv(args.csv)
    base["Image"] = [str((args.csv.parent / p).resolve()) for p in base["Image"]]
    table = base.iloc[np.arange(args.rows) % len(base)].reset_index(drop=True)
    model = OnnxModel(args.model, device="cpu", quiet=True)
    costs = stage_costs(table.assign(path=table["Image"]), model)
    print("per image, one core: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "rows.csv"
        table.to_csv(csv, index=False)
        outputs = {}
        for name, ray_address in (("local", None), ("ray", "local")):
            start = time.perf_counter()
            outputs[name] = score_csv(csv, Path(tmp) / f"{name}.csv", model_path=args.model, with_probabilities=True,
                                      progress=False, ray_address=ray_address)
            seconds = time.perf_counter() - start
            results[name] = {"rows": args.rows, "seconds": seconds, "rows_per_s": args.rows / seconds}
            print(f"{name}: {args.rows} rows in {seconds:.1f} s = {args.rows / seconds:.1f} rows/s", flush=True)
    same = (outputs["local"]["Category"].astype(str) == outputs["ray"]["Category"].astype(str)).all()
    columns = [c for c in outputs["local"].columns if c.startswith("p_")]
    local, ray = (outputs[k][columns].to_numpy(float) for k in ("local", "ray"))
    delta = float(np.nanmax(np.abs(local - ray)))
    ratio = results["ray"]["rows_per_s"] / results["local"]["rows_per_s"]
    print("| scorer | rows | seconds | rows/s |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['rows']} | {r['seconds']:.1f} | {r['rows_per_s']:.1f} |")
    print(f"Ray / local rows/s: {ratio:.2f}; labels equal: {bool(same)}; max |dprob| {delta:.1e}")
    args.out.write_text(json.dumps({"load_average_at_start": load, "cores": os.cpu_count(), "stage_costs": costs,
                                    "results": results, "ray_over_local": ratio, "labels_equal": bool(same),
                                    "max_abs_diff_prob": delta}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
