"""Reading user data files (JSONL, JSON, CSV, Parquet) or in-memory rows into numbered
rows; :mod:`colm.data.errors` lists what is refused and how."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import DataError, _short

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
_JSON_SPACE = " \t\r\n"  # what JSON calls whitespace: a line of only these is blank


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    bom = b"\xef\xbb\xbf"
    skip = len(bom) if raw.startswith(bom) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + skip
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}: not UTF-8 text: line {line} has byte 0x{raw[offset]:02x} "
            f"(byte offset {offset}) that is not valid UTF-8; save the file as UTF-8 "
            "or check the extension",
            name=str(path),
            line=line,
        ) from None


def _deepest(text: str) -> int:
    """Position of the most deeply nested bracket of JSON text (for error messages)."""
    depth = best = best_at = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > best:
                best, best_at = depth, i
        elif ch in "]}":
            depth -= 1
    return best_at


def _parse_json(text: str) -> Any:
    """json.loads; every failure is a json.JSONDecodeError (a ValueError) with a position."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", text, _deepest(text)) from None
    except ValueError as e:  # e.g. an integer over Python's 4300-digit limit
        long_number = re.search(r"\d{4301,}", text)
        pos = long_number.start() if long_number else 0
        raise json.JSONDecodeError(str(e), text, pos) from None


def _parses(text: str) -> bool:
    try:
        _parse_json(text)
    except ValueError:
        return False
    return True


def _jsonl_rows(text: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    # Only "\n" ends a line: U+2028, "\x1c" and the like may sit inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip(_JSON_SPACE):
            continue
        try:
            row = _parse_json(line)
        except json.JSONDecodeError as e:
            reason = f"{e.msg} at column {e.colno}"
            raise DataError(
                f"{path}: line {lineno} is not valid JSON ({reason}); "
                "a .jsonl file needs one JSON object per line",
                name=str(path),
                line=lineno,
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object; "
                "each line must be an object such as "
                '{"source": ..., "prompt": ..., "completion": ...}',
                name=str(path),
                line=lineno,
            )
        rows.append((lineno, row))
    return rows


def _read_jsonl(path: Path) -> list[tuple[int | None, dict[str, Any]]]:
    return _jsonl_rows(_read_text(path), path)


def _read_json(path: Path) -> list[tuple[int | None, dict[str, Any]]]:
    text = _read_text(path)
    try:
        data = _parse_json(text)
    except json.JSONDecodeError as e:
        first = next((line for line in text.split("\n") if line.strip(_JSON_SPACE)), "")
        if not first or _parses(first):  # empty, or JSON lines saved as .json
            return _jsonl_rows(text, path)
        raise DataError(
            f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); a .json "
            "file needs an array of objects (or one object per line)",
            name=str(path),
            line=e.lineno,
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON array of objects (or one object per line), "
            f"got a {type(data).__name__}",
            name=str(path),
        )
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise DataError(
                f"{path}: row {i + 1} (array element {i}) is a JSON {type(r).__name__}, "
                'not an object; each element must be {"source": ..., "prompt": ..., '
                '"completion": ...} or {"source": ..., "messages": [...]}',
                name=str(path),
                row=i + 1,
            )
    return [(None, r) for r in data]


def _read_csv(path: Path) -> list[tuple[int | None, dict[str, Any]]]:
    text = _read_text(path)
    old_limit = csv.field_size_limit()
    # Long cells are not an error here: tokenize_records truncates or drops them.
    csv.field_size_limit(max(old_limit, len(text) + 1))
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = []
        try:
            header = reader.fieldnames or []
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                raise DataError(
                    f"{path}: the header repeats column(s) {repeated}; give every column "
                    "a distinct name",
                    name=str(path),
                    line=1,
                    field=repeated[0],
                )
            for i, row in enumerate(reader, start=1):
                if None in row:
                    raise DataError(
                        f"{path}: row {i} has more fields than the header "
                        f"({len(header)} columns; the row ends on line {reader.line_num}); "
                        "quote fields that contain commas",
                        name=str(path),
                        row=i,
                        line=reader.line_num,
                    )
                rows.append((None, row))
        except csv.Error as e:
            raise DataError(
                f"{path}: not readable as CSV near line {reader.line_num}: {e}",
                name=str(path),
                line=reader.line_num,
            ) from None
    finally:
        csv.field_size_limit(old_limit)
    return rows


def _read_parquet(path: Path) -> list[tuple[int | None, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for broken files
        raise DataError(
            f"{path}: not a readable Parquet file ({type(e).__name__}: {_short(str(e), 200)}); "
            "check that it was fully written",
            name=str(path),
        ) from None
    return [(None, r) for r in rows]


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _rows_from(data: Any) -> tuple[list[tuple[int | None, Mapping[str, Any]]], str]:
    """Rows of `data` (each with its line number, where a text file has one) and a name."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if "\x00" in str(path):
            raise DataError(
                f"{_short(str(path))}: a path cannot contain a NUL character", name=str(path)
            )
        ext = path.suffix.lower()
        if ext not in _READERS:
            raise DataError(
                f"{path}: unknown file type '{path.suffix}'; use one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)} (or pass a datasets.Dataset)",
                name=str(path),
            )
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        if not path.is_file():
            raise DataError(f"{path} is not a file; pass the path of a {ext} file", name=str(path))
        return _READERS[ext](path), str(path)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None:
        if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise DataError(
                f"got a DatasetDict with splits {list(data.keys())}; pass one split, "
                "e.g. load_records(ds['train'])"
            )
        if isinstance(data, datasets.Dataset):
            return [(None, r) for r in data.to_list()], "dataset"
    if isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray, memoryview)):
        for i, r in enumerate(data):
            if not isinstance(r, Mapping):
                raise DataError(
                    f"records: row {i + 1} (item {i}) is a {type(r).__name__} "
                    f"({_short(r)}), not a dict; pass a list of dicts such as "
                    '{"source": ..., "prompt": ..., "completion": ...}',
                    name="records",
                    row=i + 1,
                )
        return [(None, r) for r in data], "records"
    hint = "; wrap a single example in a list" if isinstance(data, Mapping) else ""
    raise DataError(
        f"cannot read examples from a {type(data).__name__}; pass a path to a "
        f"{'/'.join(SUPPORTED_EXTENSIONS)} file, a datasets.Dataset or a list of dicts{hint}"
    )
