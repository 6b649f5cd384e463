"""Writing the metadata CSVs of a preprocessing output root, and merging a run's rows into them under a lock."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from utils.distributed import exclusive_lock
from utils.files import atomic_write_text
from utils.metadata import CARDIAC_COLUMNS, EXTRA_COLUMNS, REFERENCE_COLUMNS, is_missing

#: Column order of the fastMRI metadata CSVs we write.
FASTMRI_CSV_COLUMNS = REFERENCE_COLUMNS + EXTRA_COLUMNS
#: Column order of the cardiac metadata CSVs: ``file_index`` (= slice * num_frames + frame) names the ``.npy`` file.
CARDIAC_CSV_COLUMNS = REFERENCE_COLUMNS + EXTRA_COLUMNS + CARDIAC_COLUMNS + ["file_index"]


def _cell(value: Any) -> str:
    """CSV text of a value: ``None``/NaN -> empty; lists joined by ``", "``; integral floats without ``.0``."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if value is None or is_missing(value):
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):  # never an "inf" cell: the row would poison the stats and the embedder
            return ""
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def _csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def write_metadata_csv(path: str | Path, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write rows (``None`` -> empty cell; lists joined by ``", "``; integral floats without ``.0``) atomically."""
    atomic_write_text(path, _csv_text(rows, columns))


class MergeCounts(NamedTuple):
    """Rows of a metadata CSV after :func:`merge_metadata_csv`.

    Attributes:
        added: new rows (no row of that file and slice before).
        replaced: rows of this run that replace a row of the same file and slice.
        kept: rows of other files, left as they were.
        dropped: old rows of a re-processed file that this run did not produce again (e.g. a slice now skipped as bad).
    """

    added: int
    replaced: int
    kept: int
    dropped: int

    def format(self) -> str:
        text = f"{self.added} added, {self.replaced} replaced, {self.kept} kept"
        return text + (f", {self.dropped} dropped" if self.dropped else "")


def _row_key(row: dict[str, Any], index_column: str) -> tuple[str, float]:
    """``(filename, index)`` of a CSV row; the index as a number so that 10 sorts after 9."""
    raw = row.get(index_column)
    try:
        index = float(raw)
    except (TypeError, ValueError):
        index = math.inf
    return str(row.get("filename", "")), index


def merge_metadata_csv(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> MergeCounts:
    """Merge this run's rows into the metadata CSV at ``path`` (created if absent), atomically and under a lock.

    The CSV of an output root is the union of every file processed into it: the rows of the files in ``rows`` replace
    every old row of those files; the rows of other files are kept as they are (cell for cell). Rows are sorted by
    file, then slice (``file_index`` for cardiac CSVs). Columns of the old CSV that ``columns`` lacks are kept at the
    end. A lock file ``.{name}.lock`` next to the CSV serialises runs that merge into the same file.

    Raises:
        ValueError: the existing CSV cannot be read (it is left untouched).
    """
    import pandas as pd

    path = Path(path)
    index_column = "file_index" if "file_index" in columns else "slice"
    new_rows = [{c: _cell(row.get(c)) for c in columns} for row in rows]
    run_files = {r["filename"] for r in new_rows}
    new_keys = {_row_key(r, index_column) for r in new_rows}
    with exclusive_lock(path.with_name(f".{path.name}.lock")):
        old_rows: list[dict[str, str]] = []
        out_columns = list(columns)
        if path.is_file():
            try:
                old = pd.read_csv(path, dtype=str, keep_default_na=False)
            except (ValueError, OSError) as err:  # pandas' EmptyDataError/ParserError are ValueErrors
                raise ValueError(f"existing metadata CSV {path} cannot be read ({err}); move it away to rebuild it "
                                 "from this run only") from err
            if not old.empty and "filename" not in old.columns:
                raise ValueError(f"existing metadata CSV {path} has no 'filename' column; move it away")
            out_columns += [c for c in old.columns if c not in out_columns]
            old_rows = old.to_dict(orient="records")
        kept = [r for r in old_rows if str(r.get("filename", "")) not in run_files]
        redone = [r for r in old_rows if str(r.get("filename", "")) in run_files]
        replaced = sum(_row_key(r, index_column) in new_keys for r in redone)
        merged = sorted(kept + new_rows, key=lambda r: _row_key(r, index_column))
        atomic_write_text(path, _csv_text(merged, out_columns))
    return MergeCounts(len(new_rows) - replaced, replaced, len(kept), len(redone) - replaced)
