"""STL-10 test accuracy of an exported MLP on the official test split, beside the course report's 48.89 %.

    .venv/bin/python bench/stl10.py --data-dir /data/stl10 [--model exported/stl10_mlp.onnx]

Prints a table; writes bench/results/stl10.json. Exits with a clear message when data or model is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from serving.runtime import MODEL_DIR, OnnxModel  # noqa: E402

REPORT_TEST_ACCURACY = 0.4889  # the course report's MLP on the official STL-10 test split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder holding stl10_binary/")
    parser.add_argument("--model", type=Path, default=MODEL_DIR / "stl10_mlp.onnx", help="exported MLP")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "stl10.json")
    args = parser.parse_args(argv)
    from sklearn.metrics import accuracy_score, f1_score

    from training.data import DataError, read_stl10

    try:
        images, labels = read_stl10(args.data_dir, "test")
    except DataError as exc:
        raise SystemExit(f"bench/stl10.py: no STL-10 test data: {exc}") from None
    if not args.model.is_file():
        raise SystemExit(f"bench/stl10.py: {args.model} not found: train and export the MLP first (see README)")
    model = OnnxModel(args.model, device="cpu")
    predictions = np.concatenate([model.predict(images[i:i + 500])[1] for i in range(0, len(images), 500)])
    result = {"model": str(args.model), "test_images": int(len(labels)),
              "accuracy": float(accuracy_score(labels, predictions)),
              "macro_f1": float(f1_score(labels, predictions, average="macro")),
              "report_accuracy": REPORT_TEST_ACCURACY}
    print(f"{'model':<28}{'accuracy':>10}{'macro-F1':>10}")
    print(f"{'agegroup Stl10MLP':<28}{result['accuracy']:>10.4f}{result['macro_f1']:>10.4f}")
    print(f"{'course report MLP':<28}{REPORT_TEST_ACCURACY:>10.4f}{'':>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
