"""Score a face CSV (Image, Gender, Race) into a submission CSV (Id, Category) with the shipped model.

    agegroup-score ../shared/data/faces/testdata.csv submission.csv
    agegroup-score test.csv out.csv --images-root /data/faces --probabilities
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from serving.cli import ArgumentParser, fail
from serving.image import InputError
from serving.runtime import MODEL_DIR, OnnxModel
from serving.table import DataError, read_face_table, rows


def score_table(model: OnnxModel, table: pd.DataFrame, chunk_size: int = 256, workers: int = 4,
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, C) and labels (N,) for every row, in order; decoding overlaps inference.

    Raises DataError naming every row whose image cannot be decoded (all rows are still decoded, so the
    message lists them all).
    """
    paths = table["path"].tolist()
    chunks = [range(i, min(i + chunk_size, len(paths))) for i in range(0, len(paths), chunk_size)]
    probabilities, labels, bad = [], [], {}

    def decode(i: int):
        try:
            return model.prepare(paths[i])
        except InputError as exc:
            bad[i] = str(exc)
            return None

    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(paths), unit="img", disable=not progress) as bar:
        pending = [pool.submit(lambda c=c: [decode(i) for i in c]) for c in chunks[:2]]
        for n, chunk in enumerate(chunks):
            images = pending[n].result()  # chunk n decoded while chunk n-1 was scored
            if n + 2 < len(chunks):
                pending.append(pool.submit(lambda c=chunks[n + 2]: [decode(i) for i in c]))
            if not bad:
                p, y = model.predict(np.stack(images), table["Gender"].to_numpy()[chunk.start:chunk.stop],
                                     table["Race"].to_numpy()[chunk.start:chunk.stop])
                probabilities.append(p)
                labels.append(y)
            bar.update(len(chunk))
    if bad:
        first = min(bad)
        raise DataError(f"{len(bad)} image(s) could not be decoded, at {rows(sorted(bad))} "
                        f"(first: {paths[first]}: {bad[first]})")
    return np.concatenate(probabilities), np.concatenate(labels)


def output_path(out: Path, inputs: tuple[Path, ...]) -> Path:
    """The regular file to write for `out`, checked before any work: a symlink is written through (its target
    is replaced, the link stays); an input, a directory, a device or a path under a file is refused."""
    target = out.resolve()  # follows symlinks, so a link to an input is caught too
    if any(target == p.resolve() for p in inputs if p.exists()):
        raise DataError(f"{out}: is the input CSV; choose another output file")
    if target.exists() and not target.is_file():
        kind = "a directory" if target.is_dir() else "not a regular file"
        raise DataError(f"{out}: is {kind}; the output must be a regular file")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DataError(f"{out}: {parent} is not a directory")
            break
    return target


def write_atomically(frame: pd.DataFrame, out: Path) -> None:
    """Write the CSV to a temporary file beside `out`, then rename it into place.

    The new file gets the mode a plain open() would give it: the old file's mode, or 0666 less the umask."""
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = out.stat().st_mode & 0o777 if out.exists() else 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            frame.to_csv(handle, index=False)
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def score_csv(csv_path: Path, out: Path, images_root: Path | None = None, model_path: Path | None = None,
              with_probabilities: bool = False, chunk_size: int = 256, workers: int = 4,
              progress: bool = True) -> pd.DataFrame:
    """Validate the CSV and the output path, score every row and write the submission; returns what was written."""
    out = output_path(out, (csv_path,))
    table = read_face_table(csv_path, images_root)
    model = OnnxModel(model_path or MODEL_DIR / "age_ensemble.onnx")
    probabilities, labels = score_table(model, table, chunk_size, workers, progress)
    submission = pd.DataFrame({"Id": table["Image"], "Category": labels})
    if with_probabilities:
        for k, name in enumerate(model.class_names):
            submission[f"p_{name}"] = probabilities[:, k].round(6)
    write_atomically(submission, out)
    return submission


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="agegroup-score", description=__doc__.split("\n")[0])
    parser.add_argument("csv", type=Path, help="input CSV with columns Image, Gender, Race")
    parser.add_argument("out", type=Path, help="submission CSV to write (columns Id, Category)")
    parser.add_argument("--images-root", type=Path, default=None,
                        help="folder the Image paths are relative to (default: the CSV's folder)")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"exported .onnx file (default: {MODEL_DIR / 'age_ensemble.onnx'})")
    parser.add_argument("--probabilities", action="store_true", help="add one p_<age group> column per class")
    parser.add_argument("--chunk-size", type=int, default=256, help="images per onnxruntime run (default: 256)")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding threads (default: 4)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.chunk_size < 1 or args.workers < 1:
        parser.error("--chunk-size and --workers must be at least 1")
    model_path = args.model or MODEL_DIR / "age_ensemble.onnx"
    if not model_path.is_file() or not model_path.with_suffix(".json").is_file():
        fail("agegroup-score", f"{model_path} (and its .json) not found: export a model first", 2)
    start = time.perf_counter()
    try:
        written = score_csv(args.csv, args.out, args.images_root, model_path, args.probabilities,
                            args.chunk_size, args.workers, progress=not args.no_progress)
    except DataError as exc:
        fail("agegroup-score", str(exc), 1)
    except OSError as exc:
        fail("agegroup-score", f"{exc.filename or args.out}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        fail("agegroup-score", f"interrupted; {args.out} was not written", 130)
    print(f"wrote {len(written)} rows to {args.out} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
