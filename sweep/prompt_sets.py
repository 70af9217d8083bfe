"""Reading the rows of a ``[[prompt_sets]]`` table: a CSV, JSONL or Parquet file, or a hub dataset.

The one place data sets are read. It returns raw cells (text, or None for an empty or null
cell) keyed by our column names; the manifest validates each row as it does a [[prompts]]
table. A data file passes the prompt-file checks (``sweep.prompt_files``) with a larger cap,
and is streamed: CSV and JSONL a line at a time, Parquet a batch at a time, stopping at
``limit``. CSV cells stay strings (no type inference); JSON and Parquet values of another type
reach the validator as they are and are refused there, never coerced.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sweep.prompt_files import checked_file, too_big

PROMPT_SET_MAX_BYTES = 256 * 2**20
FORMATS = (".csv", ".jsonl", ".parquet")
# Our column names: those of a [[prompts]] table a row may carry (positions is the set's).
SET_COLUMNS = (
    "id",
    "text",
    "answer",
    "role",
    "control_of",
    "ablation_of",
    "suite",
    "template",
    "group",
)
REQUIRED_COLUMNS = ("id", "text", "answer")
_ARROW_BATCH_ROWS = 8192
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class RowError(ValueError):
    """A problem inside the data: ``where`` says which row, line and column."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where, self.message = where, message


@dataclass(frozen=True)
class SetRow:
    number: int  # 1-based, data rows only (no header, no blank lines)
    line: int | None  # CSV / JSONL: the line the row starts on
    cells: dict[str, Any]  # our column name -> the value as read; None: empty, null or absent


@dataclass(frozen=True)
class SetData:
    rows: list[SetRow]
    sha256: str  # a file's: of its bytes; a hub dataset's: of the rows read, as JSON lines


def row_where(number: int | None, line: int | None) -> str:
    """'row 17 (line 18)', 'row 17' or 'line 18'."""
    if number is None:
        return f"line {line}"
    return f"row {number}" if line is None else f"row {number} (line {line})"


def column_where(column: str, columns: Mapping[str, str]) -> str:
    """ "column 'question' (text)" for our column ``text`` read from the file's 'question'."""
    theirs = columns.get(column, column)
    return f"column {theirs!r}" if theirs == column else f"column {theirs!r} ({column})"


def _missing(column: str, columns: Mapping[str, str], found: list[str]) -> str:
    shown = ", ".join(repr(c) for c in found) if found else "none"
    theirs = columns[column]
    named = repr(theirs) if theirs == column else f"{theirs!r} (for {column}, mapped in columns)"
    return f"no column {named}; columns found: {shown}"


def _cells(values: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    # "" is an empty cell as in CSV: no answer, no role; the validator refuses an empty id/text.
    cells = {}
    for ours, theirs in columns.items():
        value = values.get(theirs)
        cells[ours] = None if value == "" else value
    return cells


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _text_lines(f: IO[bytes], file: Path) -> Iterator[str]:
    """The file's lines as str (with their line ends), a BOM dropped; counts bytes as it goes."""
    read = 0
    for number, raw in enumerate(f, start=1):
        read += len(raw)
        if read > PROMPT_SET_MAX_BYTES:  # it grew since it was checked
            raise ValueError(too_big(file, PROMPT_SET_MAX_BYTES))
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowError(
                f"line {number}", f"not UTF-8 text (byte {exc.start + 1} of the line)"
            ) from None
        yield line.removeprefix("\ufeff") if number == 1 else line


def _csv_rows(
    f: IO[bytes], file: Path, columns: Mapping[str, str], limit: int | None
) -> Iterator[SetRow]:
    reader = csv.reader(_text_lines(f, file), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise RowError("line 1", "the file is empty: expected a header line (id,text,answer)")
        index: dict[str, int] = {}
        for i, name in enumerate(header):
            if name in columns.values() and name in index:
                raise RowError("line 1", f"the header names column {name!r} twice")
            index.setdefault(name, i)
        for ours in REQUIRED_COLUMNS:
            if columns[ours] not in index:
                raise RowError("line 1", _missing(ours, columns, header))
        number, end = 0, reader.line_num
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:  # a blank line
                continue
            number += 1
            if limit is not None and number > limit:
                return
            if len(fields) != len(header):
                raise RowError(
                    row_where(number, start),
                    f"has {len(fields)} fields, the header has {len(header)}",
                )
            values = {name: fields[i] for name, i in index.items()}
            yield SetRow(number, start, _cells(values, columns))
    except csv.Error as exc:
        raise RowError(f"line {reader.line_num}", f"malformed CSV: {exc}") from None


def _jsonl_rows(
    f: IO[bytes], file: Path, columns: Mapping[str, str], limit: int | None
) -> Iterator[SetRow]:
    number = 0
    for line_no, line in enumerate(_text_lines(f, file), start=1):
        if not line.strip():
            continue
        number += 1
        if limit is not None and number > limit:
            return
        where = row_where(number, line_no)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RowError(where, f"malformed JSON: {exc.msg} at character {exc.colno}") from None
        if not isinstance(obj, dict):
            raise RowError(where, f"expected a JSON object {{...}}, got {type(obj).__name__}")
        for ours in REQUIRED_COLUMNS:
            if columns[ours] not in obj:
                hint = " (null for no answer)" if ours == "answer" else ""
                raise RowError(where, _missing(ours, columns, list(obj)) + hint)
        yield SetRow(number, line_no, _cells(obj, columns))


def _arrow_rows(
    batches: Iterable[Any], columns: Mapping[str, str], schema: Any, limit: int | None
) -> Iterator[SetRow]:
    """Rows of Arrow record batches or tables whose string columns are checked on the schema."""
    import pyarrow as pa

    def is_text(t: Any) -> bool:
        if pa.types.is_dictionary(t):
            t = t.value_type
        return pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t)

    found = list(schema.names)
    for ours in REQUIRED_COLUMNS:
        if columns[ours] not in found:
            raise RowError(column_where(ours, columns), _missing(ours, columns, found))
    wanted = [theirs for theirs in dict.fromkeys(columns.values()) if theirs in found]
    for theirs in wanted:
        t = schema.field(theirs).type
        if not is_text(t):
            ours = next(o for o, c in columns.items() if c == theirs)
            raise RowError(column_where(ours, columns), f"expected text (strings), found {t}")
    number = 0
    for batch in batches:
        values = {c: batch.column(c).to_pylist() for c in wanted}
        for i in range(batch.num_rows):
            number += 1
            if limit is not None and number > limit:
                return
            yield SetRow(number, None, _cells({c: v[i] for c, v in values.items()}, columns))


def read_set_file(
    file: Path, root: Path | None, columns: Mapping[str, str], limit: int | None
) -> SetData:
    """The rows of a CSV, JSONL or Parquet file (by its suffix), at most ``limit``.

    ``columns`` maps each of SET_COLUMNS to the file's column name. Raises ValueError for the file
    as a whole (missing, outside ``root``, too big, unknown format), RowError for its contents.
    """
    suffix = file.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{file}: unknown format {file.suffix or '(no suffix)'!r}; "
            f"name a file ending in {', '.join(FORMATS)}"
        )
    real = checked_file(file, root, PROMPT_SET_MAX_BYTES, what="prompt set")
    try:
        if suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                pf = pq.ParquetFile(real)
            except (pa.ArrowInvalid, OSError) as exc:
                raise ValueError(f"{file} is not a readable Parquet file: {exc}") from None
            names = set(pf.schema_arrow.names)
            read = [c for c in dict.fromkeys(columns.values()) if c in names]
            batches = pf.iter_batches(batch_size=_ARROW_BATCH_ROWS, columns=read)
            rows = list(_arrow_rows(batches, columns, pf.schema_arrow, limit))
        else:
            parse = _csv_rows if suffix == ".csv" else _jsonl_rows
            with open(real, "rb") as f:
                rows = list(parse(f, file, columns, limit))
        return SetData(rows, _sha256(real))
    except OSError as exc:
        raise ValueError(f"cannot read prompt set file {file}: {exc.strerror or exc}") from None


def hub_name(dataset: str, split: str, revision: str | None) -> str:
    """How errors name a hub dataset: "hub dataset 'org/name' (split 'train')"."""
    at = f", revision {revision!r}" if revision else ""
    return f"hub dataset {dataset!r} (split {split!r}{at})"


def read_hub_set(
    dataset: str, split: str, revision: str | None, columns: Mapping[str, str], limit: int | None
) -> SetData:
    """The rows of a Hugging Face dataset's split, at most ``limit``; needs ``datasets``.

    Raises ValueError naming the id when the package is missing or the dataset cannot be
    loaded (unknown id or split, hub unreachable, offline and not cached), RowError for its
    contents.
    """
    shown = hub_name(dataset, split, revision)
    if dataset.startswith((".", "/", "~")) or ".." in dataset or dataset.count("/") > 1:
        raise ValueError(f"{dataset!r} is a path, not a hub dataset id: give a file = instead")
    if os.path.exists(dataset):  # datasets would load a local folder of that name
        raise ValueError(
            f"{dataset!r} is also a local path, which the datasets package would read instead "
            "of the hub: give a file = instead, or run from another folder"
        )
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{shown} needs the 'datasets' package: pip install datasets "
            "(or export the rows to a .csv, .jsonl or .parquet file and give file =)"
        ) from None
    sliced = split if limit is None else f"{split}[:{limit}]"
    try:
        ds = datasets.load_dataset(dataset, split=sliced, revision=revision)
    # The datasets package raises many kinds (ConnectionError offline, DatasetNotFoundError,
    # ValueError for an unknown split, ...): each becomes one line naming the dataset.
    except Exception as exc:
        offline = [v for v in _OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true")]
        hint = f" ({' and '.join(offline)} set: only a cached copy loads)" if offline else ""
        raise ValueError(
            f"cannot load {shown}: {type(exc).__name__}: {exc}{hint}".rstrip()
        ) from None
    return rows_from_dataset(ds, columns, limit)


def rows_from_dataset(ds: Any, columns: Mapping[str, str], limit: int | None) -> SetData:
    """The rows of a loaded ``datasets.Dataset``, read as Arrow tables (no type conversion)."""
    arrow = ds.with_format("arrow")
    rows = list(
        _arrow_rows(arrow.iter(batch_size=_ARROW_BATCH_ROWS), columns, arrow.data.schema, limit)
    )
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row.cells, sort_keys=True).encode() + b"\n")
    return SetData(rows, digest.hexdigest())
