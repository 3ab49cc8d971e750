"""Entry points of agegroup-train and agegroup-export that work in a serving-only install too: without the
`train` extra they say so in one line (exit 2) instead of ending in a ModuleNotFoundError traceback.

    agegroup-train --help
"""

from __future__ import annotations

import importlib
import sys

TRAIN_EXTRA = ("torch", "onnx", "sklearn", "matplotlib")  # what training.train and training.export import


def needs_training_extra(prog: str) -> None:
    """Exit with one line when a package of the `train` extra is missing."""
    for name in TRAIN_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            print(f"{prog}: error: the `train` extra is not installed ({name} is missing): "
                  "pip install -e '.[train]'", file=sys.stderr)
            raise SystemExit(2) from None


def train(argv: list[str] | None = None) -> None:
    needs_training_extra("agegroup-train")
    from training.train import main

    main(argv)


def export(argv: list[str] | None = None) -> None:
    needs_training_extra("agegroup-export")
    from training.export import main

    main(argv)
