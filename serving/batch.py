"""Score a face CSV (Image, Gender, Race) into a submission CSV (Id, Category) with the shipped model.

    agegroup-score faces/testdata.csv submission.csv                # find and align each face, as /predict
    agegroup-score test.csv out.csv --aligned --ages --probabilities # crops scored whole; age columns added
    agegroup-score big.parquet out.parquet --ray 10.0.0.5:6379       # on a Ray cluster (the ray extra)

A row whose image holds no face gets Category `no_face` (and empty probability and age columns).
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
from serving.face import FaceFinder, NoFace, prepare_face
from serving.image import InputError
from serving.runtime import MODEL_DIR, OnnxModel, read_metadata
from serving.table import DataError, read_face_table, rows

NO_FACE = "no_face"  # the Category of a row whose image holds no face


def score_table(model: OnnxModel, table: pd.DataFrame, chunk_size: int = 256, workers: int = 4,
                progress: bool = True, finder: FaceFinder | None = None) -> dict[str, np.ndarray]:
    """Every graph output for every row, in order, plus `found` (N,) bool; decoding overlaps inference.

    With a finder, each image's largest face is found and aligned first (serving/face.py, as /predict does);
    rows without a face are not scored: found is False, and their outputs are NaN (label -1). Raises DataError
    naming every row whose image cannot be decoded (all rows are still decoded, so the message lists them all).
    """
    paths = table["path"].tolist()
    size = (model.width, model.height)
    chunks = [range(i, min(i + chunk_size, len(paths))) for i in range(0, len(paths), chunk_size)]
    results: list[dict[str, np.ndarray]] = []
    found = np.ones(len(paths), dtype=bool)
    bad = {}

    def decode(i: int):
        try:
            return prepare_face(paths[i], size, finder).pixels
        except NoFace:
            found[i] = False
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
                results.append(score_chunk(model, images, table.iloc[chunk.start:chunk.stop]))
            bar.update(len(chunk))
    if bad:
        raise undecodable(bad, paths)
    return {**{name: np.concatenate([r[name] for r in results]) for name in results[0]}, "found": found}


def undecodable(bad: dict[int, str], paths: list[str]) -> DataError:
    """The error for rows whose image could not be decoded ({row index: reason}): how many, where, the first."""
    first = min(bad)
    return DataError(f"{len(bad)} image(s) could not be decoded, at {rows(sorted(bad))} "
                     f"(first: {paths[first]}: {bad[first]})")


def score_chunk(model: OnnxModel, images: list, rows_: pd.DataFrame) -> dict[str, np.ndarray]:
    """The graph's outputs for one chunk; rows without an image (no face) get NaN, or -1 as a label."""
    scored = [i for i, image in enumerate(images) if image is not None]
    outputs = model.predict_all(np.stack([images[i] for i in scored]), rows_["Gender"].to_numpy()[scored],
                                rows_["Race"].to_numpy()[scored]) if scored else None
    full = {}
    for name in model.output_names:
        shape = (len(images),) + model.session_output_shape(name)
        filled = np.full(shape, -1 if name == "label" else np.nan, np.int64 if name == "label" else np.float64)
        if outputs is not None:
            filled[scored] = outputs[name]
        full[name] = filled
    return full


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
    """Write the CSV (Parquet for a .parquet `out`) to a temporary file beside `out`, then rename it into place.

    The new file gets the mode a plain open() would give it: the old file's mode, or 0666 less the umask."""
    out.parent.mkdir(parents=True, exist_ok=True)
    mode = out.stat().st_mode & 0o777 if out.exists() else 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        if out.suffix == ".parquet":  # for big jobs: typed columns, compressed (pyarrow, from the ray extra)
            os.close(fd)
            frame.to_parquet(tmp, index=False)
        else:
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
              progress: bool = True, aligned: bool = False, with_ages: bool = False,
              ray_address: str | None = None, ray_actors: int = 0) -> pd.DataFrame:
    """Validate the table and the output path, score every row and write the submission; returns what was
    written. `aligned`: the images are face crops, scored whole; otherwise each face is found and aligned first.
    `ray_address`: score on a Ray cluster instead ("local": a Ray instance started on this machine;
    serving/ray_batch.py), with `ray_actors` model actors (0: one per two CPUs of the cluster)."""
    out = output_path(out, (csv_path,))
    table = read_face_table(csv_path, images_root, uris=ray_address is not None)
    model_path = Path(model_path or MODEL_DIR / "age_ensemble.onnx")
    if ray_address is not None:
        from serving.ray_batch import score_table_on_ray

        metadata = read_metadata(model_path)
        check_template(model_path, metadata, aligned)
        scored = score_table_on_ray(model_path, table, ray_address, aligned=aligned, batch_size=chunk_size,
                                    actors=ray_actors, progress=progress)
        class_names = metadata["class_names"]
    else:
        model = OnnxModel(model_path)
        template = check_template(model_path, model.metadata, aligned)
        scored = score_table(model, table, chunk_size, workers, progress, None if aligned else FaceFinder(template))
        class_names = model.class_names
    submission = submission_frame(table, scored, class_names, with_probabilities, with_ages, model_path)
    write_atomically(submission, out)
    return submission


def check_template(model_path: Path, metadata: dict, aligned: bool) -> dict | None:
    """The model's face template; a DataError when faces are to be found and it has none."""
    template = metadata.get("face_template")
    if not aligned and not template:
        raise DataError(f"{model_path} has no face template, so faces cannot be found: pass --aligned for crops")
    return template


def submission_frame(table: pd.DataFrame, scored: dict[str, np.ndarray], class_names: list[str],
                     with_probabilities: bool, with_ages: bool, model_path: Path) -> pd.DataFrame:
    """Id, Category (the label, or no_face), and the optional age and probability columns."""
    found = scored["found"]
    category = pd.Series(scored["label"], dtype=object).where(found, NO_FACE)
    submission = pd.DataFrame({"Id": table["Image"].to_numpy(), "Category": category})
    if with_ages:
        if "age" not in scored:
            raise DataError(f"{model_path} has no age outputs (exported before they were added)")
        submission["age"] = scored["age"].round(1)
        submission["age_p10"], submission["age_p90"] = scored["age_range"][:, 0], scored["age_range"][:, 1]
    if with_probabilities:
        for k, name in enumerate(class_names):
            submission[f"p_{name}"] = scored["probabilities"][:, k].round(6)
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
    parser.add_argument("--ages", action="store_true",
                        help="add the age in years and its 10th-90th percentile range (age, age_p10, age_p90)")
    parser.add_argument("--aligned", action="store_true",
                        help="the images are already face crops: score them whole, without face detection")
    parser.add_argument("--chunk-size", type=int, default=256, help="images per onnxruntime run (default: 256)")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding threads (default: 4)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="score on a Ray cluster (needs the ray extra): its address (host:port or auto), or "
                             "nothing for a Ray instance on this machine; images may then be URIs (s3://...)")
    parser.add_argument("--ray-actors", type=int, default=0, metavar="N",
                        help="model actors on the cluster (default: one per two CPUs)")
    args = parser.parse_args(argv)
    if args.chunk_size < 1 or args.workers < 1:
        parser.error("--chunk-size and --workers must be at least 1")
    model_path = args.model or MODEL_DIR / "age_ensemble.onnx"
    if not model_path.is_file() or not model_path.with_suffix(".json").is_file():
        fail("agegroup-score", f"{model_path} (and its .json) not found: export a model first", 2)
    start = time.perf_counter()
    try:
        written = score_csv(args.csv, args.out, args.images_root, model_path, args.probabilities,
                            args.chunk_size, args.workers, progress=not args.no_progress, aligned=args.aligned,
                            with_ages=args.ages, ray_address=args.ray, ray_actors=args.ray_actors)
    except DataError as exc:
        fail("agegroup-score", str(exc), 1)
    except OSError as exc:
        fail("agegroup-score", f"{exc.filename or args.out}: {exc.strerror or exc}", 1)
    except KeyboardInterrupt:
        fail("agegroup-score", f"interrupted; {args.out} was not written", 130)
    no_face = int((written["Category"] == NO_FACE).sum())
    print(f"wrote {len(written)} rows to {args.out} in {time.perf_counter() - start:.1f}s"
          + (f"; {no_face} without a face (Category {NO_FACE})" if no_face else ""))


if __name__ == "__main__":
    main()
