"""A user's labelled structures, read from the file formats materials people keep them in.

Every reader yields one `Row` per structure, in file order; ids come from the user's id key or
are row numbers (`row-000001`), so they are stable across reruns. A row that cannot be used
(unreadable structure, missing or non-finite target) stops the load with one line naming it,
or, with `skip_bad_rows`, is listed in `Loaded.skipped` and left out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from matxfer.config import SourceConfig
from matxfer.errors import UserError
from matxfer.storage import sha256_file

FORMATS_BY_SUFFIX = {".xyz": "extxyz", ".extxyz": "extxyz", ".db": "ase-db", ".csv": "csv",
                     ".parquet": "parquet", ".json": "dataframe-json", ".gz": "dataframe-json"}


@dataclass
class Row:
    """One labelled structure: `structure` an ase.Atoms or a pymatgen Structure; `target` the
    raw label (checked by `load_source`); `extra` other keys the split may need."""

    id: str
    structure: Any
    target: Any
    extra: dict = field(default_factory=dict)


@dataclass
class Loaded:
    """The usable rows of a source as a frame (index `id`; columns `structure`, `target`),
    and the rows left out with their reasons."""

    frame: pd.DataFrame
    skipped: list[tuple[str, str]]


class BadRow(ValueError):
    """One row cannot be used; the message says why."""


def source_format(src: SourceConfig) -> str:
    if src.format != "auto":
        return src.format
    path = Path(src.path)
    suffix = path.suffix.lower()
    if suffix == ".gz" and not path.name.lower().endswith(".json.gz"):
        return "ase"
    return FORMATS_BY_SUFFIX.get(suffix, "ase")


def source_files(src: SourceConfig) -> list[Path]:
    """Every file the data comes from: the source, and for a table each structure file."""
    path = Path(src.path)
    if source_format(src) not in ("csv", "parquet"):
        return [path]
    table = read_table(src)
    return [path] + [path.parent / str(f) for f in table[src.structure_column]]


def source_sha256(src: SourceConfig) -> str:
    """Content hash of the data (the table and the structure files it names), 16 hex digits;
    the settings that pick the target and ids are part of it."""
    digest = hashlib.sha256(repr((src.target, src.id_key, src.structure_column,
                                  source_format(src))).encode())
    if not Path(src.path).is_file():
        raise UserError(f"data.source.path {src.path!r} does not exist")
    for path in source_files(src):
        try:  # one digest per file: content moved across a file boundary changes the hash
            digest.update(sha256_file(Path(path)).encode())
        except OSError as err:
            raise UserError(f"data.source {src.path!r}: cannot read {str(path)!r} "
                            f"({err.strerror})") from None
    return digest.hexdigest()[:16]


def read_table(src: SourceConfig) -> pd.DataFrame:
    path = Path(src.path)
    try:
        table = (pd.read_parquet(path) if source_format(src) == "parquet"
                 else pd.read_csv(path))
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"cannot read {str(path)!r}: {str(err).splitlines()[0]}") from None
    for column in (src.target, src.structure_column, src.id_key):
        if column and column not in table.columns:
            raise UserError(f"{str(path)!r} has no column {column!r}; columns: "
                            f"{', '.join(map(str, table.columns))}")
    return table


def _row_id(i: int, value: Any) -> str:
    return f"row-{i + 1:06d}" if value is None else str(value)


def _ase_rows(src: SourceConfig, wanted: tuple[str, ...]) -> Iterator[Row]:
    from ase.io import iread

    fmt = "extxyz" if source_format(src) == "extxyz" else None
    try:
        for i, atoms in enumerate(iread(src.path, index=":", format=fmt)):
            values = {**(atoms.calc.results if atoms.calc is not None else {}), **atoms.info}
            yield Row(_row_id(i, values.get(src.id_key) if src.id_key else None), atoms,
                      values.get(src.target, _MISSING), {k: values.get(k) for k in wanted})
    except (OSError, ValueError, KeyError, IndexError, StopIteration) as err:
        raise UserError(f"cannot read {src.path!r}: {err}") from None


def _db_rows(src: SourceConfig, wanted: tuple[str, ...]) -> Iterator[Row]:
    from ase.db import connect

    with connect(src.path) as db:
        for i, row in enumerate(db.select()):
            values = {**row.get("data", {}), **row.key_value_pairs}
            yield Row(_row_id(i, values.get(src.id_key) if src.id_key else None),
                      row.toatoms(), values.get(src.target, _MISSING),
                      {k: values.get(k) for k in wanted})


def _table_rows(src: SourceConfig, wanted: tuple[str, ...]) -> Iterator[Row]:
    from ase.io import read

    table = read_table(src)
    base = Path(src.path).parent
    for i, record in enumerate(table.to_dict("records")):
        rid = _row_id(i, record[src.id_key] if src.id_key else None)
        file = base / str(record[src.structure_column])
        try:
            atoms = read(file)
        except Exception as err:  # ase raises many kinds for a bad file
            atoms = BadRow(f"structure file {str(file)!r} is missing or unreadable "
                           f"({type(err).__name__})")
        yield Row(rid, atoms, record[src.target], {k: record.get(k) for k in wanted})


def _frame_rows(src: SourceConfig, wanted: tuple[str, ...]) -> Iterator[Row]:
    from matminer.utils.io import load_dataframe_from_json

    try:
        frame = load_dataframe_from_json(src.path, pbar=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {src.path!r}: {err}") from None
    for column in (src.target, src.structure_column, src.id_key):
        if column and column not in frame.columns:
            raise UserError(f"{src.path!r} has no column {column!r}; columns: "
                            f"{', '.join(map(str, frame.columns))}")
    for i, record in enumerate(frame.to_dict("records")):
        yield Row(_row_id(i, record[src.id_key] if src.id_key else None),
                  record[src.structure_column], record[src.target],
                  {k: record.get(k) for k in wanted})


_MISSING = object()
READERS = {"extxyz": _ase_rows, "ase": _ase_rows, "ase-db": _db_rows, "csv": _table_rows,
           "parquet": _table_rows, "dataframe-json": _frame_rows}


def checked_target(row: Row, src: SourceConfig) -> float:
    """The row's target as a float; BadRow when missing, non-numeric or non-finite (what a
    study's own settings refuse, a class label or log_target, is `loading.row_problems`')."""
    if row.target is _MISSING:
        raise BadRow(f"no target {src.target!r}")
    try:
        value = float(row.target)
    except (TypeError, ValueError):
        raise BadRow(f"target {row.target!r} is not a number") from None
    if not math.isfinite(value):
        raise BadRow(f"target {value} is not finite")
    return value


def bad_row(src: SourceConfig, row_id: str, why: str) -> UserError:
    """The one line that stops a study on a bad row (without skip_bad_rows)."""
    return UserError(f"{src.path}: row {row_id}: {why} (data.source.skip_bad_rows: true "
                     "trains on the other rows)")


def usable_rows(src: SourceConfig, skipped: list) -> Iterator[Row]:
    """The source's rows one at a time, in file order, each with its checked float target:
    a bad row raises UserError naming it, or with `skip_bad_rows` goes to `skipped` as (id,
    why). Nothing else is held, so a large file streams."""
    if not Path(src.path).is_file():
        raise UserError(f"data.source.path {src.path!r} does not exist")
    seen: set[str] = set()
    for row in READERS[source_format(src)](src, ()):
        try:
            if isinstance(row.structure, BadRow):
                raise row.structure
            row.target = checked_target(row, src)
        except BadRow as err:
            if not src.skip_bad_rows:
                raise bad_row(src, row.id, str(err)) from None
            skipped.append((row.id, str(err)))
            continue
        if row.id in seen:
            raise UserError(f"{src.path}: id {row.id!r} appears twice (data.source.id_key "
                            f"{src.id_key!r} must be unique)")
        seen.add(row.id)
        yield row
    if not seen:
        raise UserError(f"{src.path}: no usable rows (target {src.target!r})")


def fold_labels(src: SourceConfig, column: str) -> dict[str, object]:
    """{id: fold label} of every row of the source, None where a row has none (no such key,
    an empty cell): a missing label is never a fold of its own."""
    labels = {}
    for row in READERS[source_format(src)](src, (column,)):
        value = row.extra.get(column)
        blank = value is None or value is pd.NA or (isinstance(value, float)
                                                     and math.isnan(value))
        labels[row.id] = None if blank else value
    return labels


def load_source(src: SourceConfig) -> Loaded:
    """Every usable row as a frame (index `id`; `structure`, `target`); for a small dataset
    or a dataset card (graphs stream through `usable_rows`)."""
    skipped: list = []
    rows = list(usable_rows(src, skipped))
    columns = {"structure": [r.structure for r in rows], "target": [r.target for r in rows]}
    return Loaded(pd.DataFrame(columns, index=pd.Index([r.id for r in rows], name="id")),
                  skipped)
