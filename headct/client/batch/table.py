"""`headct batch`'s output file: its rows as a Parquet (or CSV) table, written atomically and read back.

A Parquet table keeps the nested columns (findings, warnings, the input's shape and spacing, the
embedding) as Arrow lists; a CSV output holds them as JSON text. Either way the table also gets a
``<finding>_probability`` / ``<finding>_positive`` pair per finding, derived from ``findings`` and dropped
again when the table is read back (`read_output`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from headct.client.batch.rows import COLUMNS, FIELDS, Row

# Held as JSON text in a CSV output.
_NESTED: Final = frozenset({"findings", "warnings", "input_shape", "input_spacing_mm", "embedding"})
_INTEGERS: Final = frozenset({"problem_status", "attempts"})


def _embedding_type(rows: list[Row], embedding_dim: int | None) -> pa.DataType | None:
    """A fixed-size list when every embedding has one length (the model's `embedding_dim`); a plain list
    if runs of different models left different lengths; None (no column) when there is none."""
    lengths = {len(row["embedding"]) for row in rows if row.get("embedding") is not None}
    if not lengths and embedding_dim is None:
        return None
    if len(lengths) > 1:
        return pa.list_(pa.float32())
    return pa.list_(pa.float32(), lengths.pop() if lengths else embedding_dim)


def _finding_columns(rows: list[Row]) -> dict[str, pa.Array]:
    """``<finding>_probability`` / ``<finding>_positive`` per finding, in the model's order: what most
    analyses read, without unnesting ``findings``."""
    names = list(dict.fromkeys(f["name"] for row in rows for f in row.get("findings") or ()))
    by_row = [{f["name"]: f for f in row.get("findings") or ()} for row in rows]
    columns = {}
    for name in names:
        columns[f"{name}_probability"] = pa.array(
            [found[name]["probability"] if name in found else None for found in by_row], pa.float64()
        )
        columns[f"{name}_positive"] = pa.array(
            [found[name]["positive"] if name in found else None for found in by_row], pa.bool_()
        )
    return columns


def rows_to_table(rows: list[Row], *, as_text: bool = False, embedding_dim: int | None = None) -> pa.Table:
    """The output table; `as_text` holds the nested columns as JSON text (for CSV). A row without an
    embedding (refused, failed) holds a vector of nulls, not a null: pyarrow before 26 cannot read a
    null entry of a fixed-size list back from Parquet (apache/arrow#35692), and 26 needs numpy 2."""
    typed = [*FIELDS]
    embedding = _embedding_type(rows, embedding_dim)
    if embedding is not None:
        typed.append(pa.field("embedding", embedding))
    columns: dict[str, pa.Array] = {}
    for field in typed:
        values = [row.get(field.name) for row in rows]
        if field.name == "embedding" and not as_text and pa.types.is_fixed_size_list(field.type):
            values = [[None] * field.type.list_size if v is None else v for v in values]
        if as_text and field.name in _NESTED:
            columns[field.name] = pa.array(
                [None if v is None else json.dumps(v) for v in values], pa.string()
            )
        else:
            columns[field.name] = pa.array(values, field.type)
        if field.name == "problem_detail":
            columns |= _finding_columns(rows)
    return pa.table(columns)


def output_format(output: Path) -> str:
    return "csv" if output.name.lower().endswith(".csv") else "parquet"


def write_output(rows: Iterable[Row], output: Path, fmt: str, embedding_dim: int | None = None) -> None:
    """Sorted by scan id, into a temporary file that is fsynced and renamed over `output`: a reader, or a
    kill halfway, sees the old table or the new one, never half of one."""
    ordered = sorted(rows, key=lambda row: row["scan_id"])
    table = rows_to_table(ordered, as_text=fmt == "csv", embedding_dim=embedding_dim)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        if fmt == "csv":
            pa_csv.write_csv(table, partial)
        else:
            pq.write_table(table, partial)
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)


def _decode_text(row: Row) -> Row:
    """A row read back: JSON text (CSV) decoded, a vector of nulls (see `rows_to_table`) as None."""
    if row.get("embedding") is not None and all(v is None for v in row["embedding"]):
        row["embedding"] = None
    for name in _NESTED & row.keys():
        if isinstance(row[name], str):
            row[name] = json.loads(row[name])
    for name in _INTEGERS & row.keys():
        if isinstance(row[name], str):
            row[name] = int(row[name])
    return row


def read_output(output: Path, fmt: str) -> list[Row]:
    """The rows of an earlier run's output (its ``<finding>_*`` columns are derived and dropped)."""
    if not output.exists():
        return []
    if fmt == "csv":
        options = pa_csv.ConvertOptions(
            column_types=dict.fromkeys(COLUMNS, pa.string()), null_values=[""], strings_can_be_null=True
        )
        table = pa_csv.read_csv(
            output, parse_options=pa_csv.ParseOptions(newlines_in_values=True), convert_options=options
        )
    else:
        table = pq.read_table(output)
    kept = table.select([name for name in COLUMNS if name in table.column_names])
    return [_decode_text(dict.fromkeys(COLUMNS) | row) for row in kept.to_pylist()]
