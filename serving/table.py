"""Read and validate a face CSV (Image, Gender, Race[, Label]); shared by batch scoring and training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from serving.runtime import GENDER_NAMES, RACE_NAMES

FACE_COLUMNS = ("Image", "Gender", "Race")


class DataError(RuntimeError):
    """A data folder or file that cannot be used; the message names the file, the rows and the problem."""


def read_face_table(csv_path: str | Path, images_root: str | Path | None = None,
                    labels: int = 0, limit: int = 0, ages: tuple[int, int] | None = None,
                    uris: bool = False) -> pd.DataFrame:
    """Columns, integer ranges and image files, all checked; adds a `path` column of absolute image paths.

    A `.parquet` table is read like a CSV (pyarrow). `labels` > 0 also requires a Label column with values
    0..labels-1; `ages` = (lowest, highest) an Age column in years. Images are relative to `images_root`
    (default: the table's folder); with `uris`, an Image may also be a URI (s3://bucket/a.jpg, file:///...),
    checked through pyarrow's file systems.
    """
    path = Path(csv_path)
    root = Path(images_root) if images_root is not None else path.parent
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            if "Image" in table:
                table["Image"] = table["Image"].astype("string").astype(object)  # missing values stay NA
        else:
            table = pd.read_csv(path, dtype={"Image": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).strip()})") from None
    except ImportError as exc:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install -e '.[ray]'): {exc}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet table ({str(exc).strip()})") from None
    required = FACE_COLUMNS + (("Label",) if labels else ()) + (("Age",) if ages else ())
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, table.columns))}")
    if limit:
        table = table.head(limit).copy()
    if table.empty:
        raise DataError(f"{path}: no rows")
    ranges = {"Gender": (0, len(GENDER_NAMES) - 1), "Race": (0, len(RACE_NAMES) - 1)}
    ranges |= ({"Label": (0, labels - 1)} if labels else {}) | ({"Age": ages} if ages else {})
    for column, (low, high) in ranges.items():
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.index[values.isna() | (values % 1 != 0) | (values < low) | (values > high)]
        if len(bad):
            raise DataError(f"{path}: column {column} must be an integer {low}-{high}; bad at {rows(bad)}")
        table[column] = values.astype(np.int64)
    if table["Image"].isna().any():
        raise DataError(f"{path}: empty Image value at {rows(table.index[table['Image'].isna()])}")
    remote = table["Image"].str.contains("://", regex=False) if uris else pd.Series(False, index=table.index)
    files = [p if r else root / p for p, r in zip(table["Image"], remote)]
    exists = [f.is_file() if isinstance(f, Path) else True for f in files]
    if remote.any():
        from serving.uri import uris_exist

        for i, ok in zip(table.index[remote], uris_exist([f for f, r in zip(files, remote) if r])):
            exists[table.index.get_loc(i)] = ok
    absent = table.index[[not e for e in exists]]
    if len(absent):
        raise DataError(f"{path}: image file not found at {rows(absent)} (first: {files[absent[0]]})")
    table["path"] = [str(f) for f in files]
    return table


def rows(index, shown: int = 10) -> str:
    """Data rows for an error message, numbered as a spreadsheet shows them (header = line 1)."""
    lines = [int(i) + 2 for i in index]
    more = f" and {len(lines) - shown} more" if len(lines) > shown else ""
    return "line " + ", ".join(map(str, lines[:shown])) + more
