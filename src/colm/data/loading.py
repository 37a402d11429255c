"""User data: read examples with a source label, tokenize them, batch them.

Data flow::

    load_records(path or Dataset)   -> [{"source", "prompt", "completion", ...}]
    tokenize_records(records, tok)  -> [{"input_ids", "attention_mask", "labels", "source"}], report
    CoLMCollator(tok)(features)     -> {"input_ids", "attention_mask", "labels": tensors,
                                        "source": list[str]}

Every example needs a source (its sub-dataset, e.g. "gsm8k"), because CoLM
keeps small sources whole and selects among the big ones.

Rules for hostile input
-----------------------
Bad input raises :class:`DataError` (a ValueError) whose message names the
file (or "records"/"dataset"/"example i"), the row or line, the field, and
what would be valid; ``err.name``, ``err.row``, ``err.line``, ``err.index``
(the 0-based "example i" of a list given to tokenize_records, source_counts
or the collator) and ``err.field`` hold the same facts. A missing file raises
FileNotFoundError (and an unreadable one, e.g. PermissionError, its OSError).
Nothing else should escape: no KeyError, TypeError, AttributeError,
UnicodeError or RecursionError from inside.
"row N" is the N-th example (1-based; for CSV the N-th data row, header not
counted); "line L" is the physical line of a .jsonl file (given as
"row N (line L)" when blank lines make them differ). Only "\\n" ends a line
(U+2028 and the like may sit inside JSON strings); a line of JSON whitespace
only is blank. A .json file is an array of objects, one object, or JSON
lines (when its first non-blank line is a JSON value of its own); a broken
array is reported with line and column.

Errors (:func:`load_records`):

* the path: unknown extension, not a file, a NUL character in it;
* the file: not UTF-8 (line and byte offset), a JSON line that does not parse
  (line and column; this includes numbers over Python's 4300-digit limit and
  nesting too deep to parse), a JSON line or array element that is not an
  object, a CSV header with a repeated column name, a CSV row with more
  cells than the header, a Parquet file pyarrow cannot read, no examples at
  all (empty file, only blank lines, a CSV header with no rows, ``[]``);
* a row: no source column, a source that is not a string or is blank;
  neither prompt + completion nor messages; a prompt or completion that is
  neither text nor a list of messages; messages that are not a non-empty list
  (or, in a CSV cell, JSON text of one) of ``{"role": str, "content": str}``;
  messages without an assistant message; a blank completion; text that
  cannot be encoded as UTF-8 (lone surrogates such as ``"\\ud800"``, which
  JSON escapes can produce).

Accepted as is: any other Unicode (NUL, RTL marks, emoji, combining marks,
a U+FEFF inside text), an empty prompt, strings of any length (length is
dealt with when tokenizing), duplicate rows and duplicate ids (every row is
an example; an ``id`` column is an ordinary extra column, kept unchanged),
sources with a single example, extra columns of any type. A UTF-8 byte order
mark at the start of a file is ignored. Cells of any length are read (the
csv module's 128k-character field limit is lifted while reading). CSV cells
missing from a short row read as missing (None) values, so a missing
completion is then an error naming that field; an empty prompt cell is an
empty prompt. Blank lines of a .jsonl file are not examples and are ignored.

Skipped and counted:

* messages after the last assistant message are dropped (one warning with
  the count of examples affected); keys of a message other than ``role`` and
  ``content`` are ignored; of a TRL-style completion list only the last
  message's content is the completion;
* :func:`tokenize_records`: an example longer than ``max_length`` is cut
  (``overflow="truncate"``, counted in ``TokenizationReport.n_truncated``) or
  dropped (``"drop"``, ``n_dropped_too_long``); one whose prompt leaves no
  completion token is dropped (``n_dropped_no_completion``). Counts per source
  are in ``kept_per_source`` / ``dropped_per_source``, and a warning gives the
  summary. A source that loses *all* its examples is an error.

Errors in :func:`tokenize_records`: bad ``max_length``/``overflow``, records
that are not a list of dicts, a source/prompt/completion that is not a
string, ``prompt_messages`` that is not None or a list of
``{"role": str, "content": str}``, text that cannot be encoded as UTF-8, a
chat template that rejects an example's messages (the template's own message
is quoted). :func:`source_counts`: a record that is not a dict or has no
non-empty string source. :class:`CoLMCollator`: features that are not a list
of dicts, a missing ``input_ids``, values that are not a flat list of
integers (floats, strings, None and nested lists are refused; int64 range;
``input_ids`` >= 0, ``attention_mask`` 0/1, ``labels`` >= 0 or -100),
lengths that differ from ``input_ids``, an empty ``input_ids``, a ``source``
on some examples only or one that is not a string or an int.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import numbers
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "CoLMCollator",
    "DataError",
    "TokenizationReport",
    "load_records",
    "source_counts",
    "tokenize_records",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100
UNLABELLED = "unlabelled"  # the source of every example loaded with source_column=None
_INT64 = (-(2**63), 2**63 - 1)
_MESSAGE_SHAPE = '{"role": ..., "content": ...}'
_JSON_SPACE = " \t\r\n"  # what JSON calls whitespace: a line of only these is blank


class DataError(ValueError):
    """Bad input data. The message says where (file, row or line, field) and what is valid.

    ``name`` is the file (or "records", "dataset"), ``row`` the 1-based row
    ("row N" in the message), ``line`` the physical line of a text file,
    ``index`` the 0-based position in the list given to tokenize_records,
    source_counts or the collator ("example i"), ``field`` the column or key at
    fault; each is None where it does not apply.
    """

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        row: int | None = None,
        line: int | None = None,
        index: int | None = None,
        field: str | None = None,
    ):
        super().__init__(message)
        self.name = name
        self.row = row
        self.line = line
        self.index = index
        self.field = field


def _short(value: Any, limit: int = 80) -> str:
    """A repr for error messages: never huge, never raising."""
    try:
        text = repr(value)
    except Exception:  # a user object with a broken __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unencodable(text: str) -> int | None:
    """Position of the first character that UTF-8 cannot encode (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


# --------------------------------------------------------------------------- reading


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


# --------------------------------------------------------------------------- normalising


def _columns(row: Mapping[str, Any], limit: int = 20) -> str:
    names = [_short(str(k), 40) for k in itertools.islice(row, limit)]
    more = len(row) - len(names)
    return ", ".join(names) + (f" and {more} more" if more > 0 else "") or "none"


class _Row:
    """Where a row came from, for error messages."""

    def __init__(self, name: str, row: int, line: int | None):
        self.name, self.row, self.line = name, row, line
        self.where = f"{name}: row {row}" + (f" (line {line})" if line and line != row else "")

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(
            f"{self.where}: {message}", name=self.name, row=self.row, line=self.line, field=field
        )

    def text(self, value: str, field: str, what: str = "") -> str:
        pos = _unencodable(value)
        if pos is not None:
            raise self.error(
                f"field '{field}'{what} has a character that cannot be encoded as UTF-8 "
                f"({value[pos]!r} at position {pos}, a lone surrogate, e.g. from a JSON escape "
                "such as \\ud800); text must be valid Unicode - fix or remove it",
                field,
            )
        return value


def _as_messages(value: Any, at: _Row, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = _parse_json(value)
        except ValueError:
            raise at.error(
                f"field '{name}' is a string that is not JSON; it must be a list of "
                f"{_MESSAGE_SHAPE} messages (in a CSV cell: that list as JSON text)",
                name,
            ) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise at.error(
            f"field '{name}' must be a non-empty list of {_MESSAGE_SHAPE} messages, "
            f"got {_short(value)} ({type(value).__name__})",
            name,
        )
    out = []
    for j, msg in enumerate(value):
        if (
            not isinstance(msg, Mapping)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise at.error(
                f"message {j} of '{name}' must be a dict with string 'role' and 'content', "
                f"got {_short(msg)}",
                name,
            )
        for key in ("role", "content"):
            at.text(msg[key], name, f" (message {j} '{key}')")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _flatten(messages: Sequence[Mapping[str, str]]) -> str:
    """Prompt text for tokenizers without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def _normalise_row(
    row: Mapping[str, Any],
    at: _Row,
    source_column: str | None,
    prompt_field: str,
    completion_field: str,
    messages_field: str,
) -> tuple[dict[str, Any], bool]:
    """One example as {"source", "prompt", "completion", "prompt_messages", ...extra}.

    Returns the record and whether messages after the last assistant turn were dropped.
    """
    if source_column is None:  # unlabelled data: pseudo-sources replace the placeholder
        row = {k: v for k, v in row.items() if k != "source"}
        row = {"source": UNLABELLED, **row}
        source_column = "source"
    if source_column not in row:
        raise at.error(
            f"no source column '{source_column}' (columns: {_columns(row)}). "
            "Every example needs a source label; pass source_column=... to name the column "
            "that holds it",
            source_column,
        )
    source = row[source_column]
    if not isinstance(source, str):
        raise at.error(
            f"source '{source_column}' is {_short(source)} ({type(source).__name__}); "
            "source labels must be non-empty strings",
            source_column,
        )
    if not source.strip():
        raise at.error(
            f"source '{source_column}' is empty; give every example a source label",
            source_column,
        )
    at.text(source, source_column)
    used = {source_column}
    trailing = False
    prompt_messages = None
    has_prompt = row.get(prompt_field) is not None
    has_completion = row.get(completion_field) is not None
    if has_prompt and has_completion:
        used |= {prompt_field, completion_field}
        prompt, completion = row[prompt_field], row[completion_field]
        # TRL's conversational prompt-completion format: lists of messages.
        if isinstance(prompt, (list, tuple)):
            prompt_messages = _as_messages(prompt, at, prompt_field)
            prompt = _flatten(prompt_messages)
        if isinstance(completion, (list, tuple)):
            msgs = _as_messages(completion, at, completion_field)
            completion = msgs[-1]["content"]
        for name, value in ((prompt_field, prompt), (completion_field, completion)):
            if not isinstance(value, str):
                raise at.error(
                    f"field '{name}' is {_short(value)} ({type(value).__name__}); it must be "
                    f"text or a list of {_MESSAGE_SHAPE} messages",
                    name,
                )
            at.text(value, name)
    elif row.get(messages_field) is not None:
        used.add(messages_field)
        messages = _as_messages(row[messages_field], at, messages_field)
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise at.error(
                f"'{messages_field}' has no assistant message (roles: "
                f"{_short([m['role'] for m in messages])}); the last assistant message is "
                "the target",
                messages_field,
            )
        trailing = last < len(messages) - 1
        prompt_messages = messages[:last]
        prompt = _flatten(prompt_messages) if prompt_messages else ""
        completion = messages[last]["content"]
    else:
        missing, present = None, ""
        if has_prompt != has_completion:
            have, missing = (
                (prompt_field, completion_field) if has_prompt else (completion_field, prompt_field)
            )
            present = f"it has '{have}' but no '{missing}'; "
        raise at.error(
            f"needs either '{prompt_field}' and '{completion_field}' or "
            f"'{messages_field}' ({present}columns: {_columns(row)}); pass prompt_field=/"
            "completion_field= or messages_field= to name your columns",
            missing or messages_field,
        )
    if not completion.strip():
        origin = (
            f"field '{completion_field}'"
            if has_prompt and has_completion
            else f"the last assistant message of '{messages_field}'"
        )
        raise at.error(
            f"the completion is empty ({origin}); remove the example or fill it in",
            completion_field if has_prompt and has_completion else messages_field,
        )
    record = {k: v for k, v in row.items() if k not in used}
    record.update(
        source=source,
        prompt=prompt,
        completion=completion,
        prompt_messages=prompt_messages,
    )
    return record, trailing


def load_records(
    data: str | os.PathLike | Any,
    source_column: str | None = "source",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    messages_field: str = "messages",
) -> list[dict[str, Any]]:
    """Read examples with a source label from a file, a Dataset or a list of dicts.

    Files are chosen by extension: ``.jsonl``, ``.json`` (array or JSON lines),
    ``.csv`` (a ``messages`` cell holds JSON text), ``.parquet``. Each row
    needs a non-empty string in `source_column` and either `prompt_field` +
    `completion_field` (text, or TRL-style lists of messages) or
    `messages_field` (a list of ``{"role", "content"}``: the last assistant
    message is the completion, the messages before it are the prompt, later
    messages are dropped with a warning).
    With ``source_column=None`` the data has no source labels: every example's
    ``source`` is the placeholder ``"unlabelled"`` (a ``source`` column is
    ignored), to be replaced by pseudo-sources (:mod:`colm.data.pseudo_sources`).

    Returns one dict per row: ``source``, ``prompt`` (text; for messages a
    plain ``role: content`` rendering used with template-free tokenizers),
    ``completion``, ``prompt_messages`` (the prompt turns, or None), and the
    row's other columns unchanged. Bad input raises :class:`DataError`; the
    module docstring lists what is an error and what is accepted.
    """
    rows, name = _rows_from(data)
    if not rows:
        raise DataError(f"{name} has no examples; check the file or the dataset split", name=name)
    records = []
    n_trailing = 0
    for i, (line, row) in enumerate(rows):
        record, trailing = _normalise_row(
            row,
            _Row(name, i + 1, line),
            source_column,
            prompt_field,
            completion_field,
            messages_field,
        )
        n_trailing += trailing
        records.append(record)
    if n_trailing:
        warnings.warn(
            f"{name}: {n_trailing} example(s) have messages after the last assistant message; "
            "those messages were dropped",
            stacklevel=2,
        )
    return records


def _examples(records: Any, what: str) -> list[Any]:
    """`records` as a list, refusing things that only look iterable (a dict, a string)."""
    if isinstance(records, (Mapping, str, bytes)) or not isinstance(records, Iterable):
        raise DataError(
            f"{what} needs a list of examples (dicts), got a {type(records).__name__}"
            + ("; wrap a single example in a list" if isinstance(records, Mapping) else "")
        )
    return list(records)


def source_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Number of examples per source, largest first (ties by name)."""
    counts: Counter[str] = Counter()
    for i, r in enumerate(_examples(records, "source_counts")):
        if not isinstance(r, Mapping):
            raise DataError(
                f"example {i} is a {type(r).__name__} ({_short(r)}), not a dict; "
                "load data with load_records first",
                index=i,
            )
        if "source" not in r:
            raise DataError(
                f"example {i} has no 'source'; load data with load_records first",
                index=i,
                field="source",
            )
        source = r["source"]
        if not isinstance(source, str) or not source.strip():
            raise DataError(
                f"example {i}: 'source' is {_short(source)} ({type(source).__name__}); "
                "source labels must be non-empty strings",
                index=i,
                field="source",
            )
        counts[source] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# --------------------------------------------------------------------------- tokenizing


@dataclass
class TokenizationReport:
    """What :func:`tokenize_records` kept, truncated and dropped."""

    max_length: int
    overflow: str
    n_input: int = 0
    n_kept: int = 0
    n_truncated: int = 0
    n_dropped_too_long: int = 0
    n_dropped_no_completion: int = 0
    kept_per_source: dict[str, int] = field(default_factory=dict)
    dropped_per_source: dict[str, int] = field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        return self.n_dropped_too_long + self.n_dropped_no_completion

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_dropped": self.n_dropped}

    def summary(self) -> str:
        return (
            f"{self.n_kept}/{self.n_input} examples kept at max_length={self.max_length} "
            f"({self.n_truncated} truncated, {self.n_dropped_too_long} dropped as too long, "
            f"{self.n_dropped_no_completion} dropped with no completion tokens left)"
        )


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_texts(records: Sequence[Mapping[str, Any]], use_template: bool, tokenizer: Any):
    if not use_template:
        return [r["prompt"] for r in records]
    texts = []
    for i, r in enumerate(records):
        messages = r.get("prompt_messages") or [{"role": "user", "content": r["prompt"]}]
        try:
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as e:  # jinja2 TemplateError, raise_exception(...) of the template
            raise DataError(
                f"example {i} ({_short(r['source'], 40)}): the tokenizer's chat template "
                f"rejected its prompt messages ({type(e).__name__}: {_short(str(e), 200)}); "
                "fix the messages (e.g. roles the template does not allow) or use a "
                "tokenizer whose template accepts them",
                index=i,
                field="prompt_messages",
            ) from None
        if not isinstance(text, str):
            raise DataError(
                f"example {i}: the chat template gave a {type(text).__name__}, not text",
                index=i,
                field="prompt_messages",
            )
        texts.append(text)
    return texts


def _check_records(records: Sequence[Any]) -> None:
    if not records:
        raise DataError("no examples to tokenize")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise DataError(
                f"example {i} is a {type(r).__name__} ({_short(r)}), not a dict", index=i
            )

        def bad(key: str, problem: str, i: int = i) -> DataError:
            return DataError(
                f"example {i}: {problem}; read data with load_records (or "
                "build_default_mixture) first",
                index=i,
                field=key,
            )

        for key in ("source", "prompt", "completion"):
            value = r.get(key)
            if not isinstance(value, str):
                raise bad(key, f"'{key}' must be a string, got {_short(value)}")
            pos = _unencodable(value)
            if pos is not None:
                raise bad(
                    key,
                    f"'{key}' has a character that cannot be encoded as UTF-8 "
                    f"({value[pos]!r} at position {pos}, a lone surrogate)",
                )
        messages = r.get("prompt_messages")
        if messages is None:
            continue
        if not isinstance(messages, (list, tuple)):
            raise bad(
                "prompt_messages",
                f"'prompt_messages' must be None or a list of {_MESSAGE_SHAPE} messages, "
                f"got {_short(messages)}",
            )
        for j, m in enumerate(messages):
            if not (
                isinstance(m, Mapping)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
            ):
                raise bad(
                    "prompt_messages",
                    f"message {j} of 'prompt_messages' must be a dict with string 'role' and "
                    f"'content', got {_short(m)}",
                )
            for key in ("role", "content"):
                if _unencodable(m[key]) is not None:
                    raise bad(
                        "prompt_messages",
                        f"message {j} '{key}' of 'prompt_messages' has a character that cannot "
                        "be encoded as UTF-8 (a lone surrogate)",
                    )


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_length: int,
    overflow: str = "truncate",
) -> tuple[list[dict[str, Any]], TokenizationReport]:
    """Tokenize examples into ``input_ids``, ``attention_mask``, ``labels``, ``source``.

    With a chat template, the prompt (``prompt_messages`` or the prompt as one
    user turn) is rendered with ``add_generation_prompt=True``; without one,
    the prompt text is tokenized with the tokenizer's special tokens (e.g. BOS).
    The completion's tokens and the EOS token follow. Labels are -100 on the
    prompt, so the loss covers the completion and EOS only.

    Examples longer than `max_length` are cut at the end (``overflow="truncate"``)
    or dropped (``"drop"``). Examples left without a completion token to learn
    (prompt alone fills `max_length`) are dropped. Both are counted in the
    report and announced with a warning. A source that loses all of its examples
    raises ValueError: CoLM needs every source's examples. Malformed records
    raise :class:`DataError` naming the example and the field.
    """
    if not isinstance(overflow, str) or overflow not in ("truncate", "drop"):
        raise DataError(f"overflow must be 'truncate' or 'drop', got {_short(overflow)}")
    if (
        isinstance(max_length, bool)
        or not isinstance(max_length, numbers.Integral)
        or max_length < 2
    ):
        raise DataError(f"max_length must be an integer >= 2, got {_short(max_length)}")
    max_length = int(max_length)
    records = _examples(records, "tokenize_records")
    _check_records(records)

    use_template = _has_chat_template(tokenizer)
    eos = tokenizer.eos_token_id
    prompt_enc = tokenizer(
        _prompt_texts(records, use_template, tokenizer),
        add_special_tokens=not use_template,  # the template already holds them
    )["input_ids"]
    completion_enc = tokenizer([r["completion"] for r in records], add_special_tokens=False)[
        "input_ids"
    ]

    report = TokenizationReport(max_length=max_length, overflow=overflow, n_input=len(records))
    kept: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    out = []
    for r, prompt_ids, completion_ids in zip(records, prompt_enc, completion_enc):
        prompt_ids = list(prompt_ids)
        if not use_template and eos is not None and prompt_ids and prompt_ids[-1] == eos:
            # Tokenizers that append EOS to every text: the prompt must not end the text.
            prompt_ids = prompt_ids[:-1]
        completion_ids = list(completion_ids) + ([eos] if eos is not None else [])
        source = r["source"]
        if len(prompt_ids) + len(completion_ids) > max_length:
            if overflow == "drop":
                report.n_dropped_too_long += 1
                dropped[source] += 1
                continue
            completion_ids = completion_ids[: max(0, max_length - len(prompt_ids))]
            prompt_ids = prompt_ids[:max_length]
            truncated = True
        else:
            truncated = False
        # A label at position 0 is never predicted (no context), so it does not count.
        n_learnable = len(completion_ids) - (0 if prompt_ids else 1)
        if n_learnable <= 0:
            report.n_dropped_no_completion += 1
            dropped[source] += 1
            continue
        report.n_truncated += truncated
        input_ids = prompt_ids + completion_ids
        out.append(
            {
                "input_ids": input_ids,
                "attention_mask": [1] * len(input_ids),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
                "source": source,
            }
        )
        kept[source] += 1

    report.n_kept = len(out)
    report.kept_per_source = dict(sorted(kept.items()))
    report.dropped_per_source = dict(sorted(dropped.items()))
    empty = sorted(set(dropped) - set(kept))
    if empty:
        raise DataError(
            f"source(s) {_short(empty, 200)} have no usable examples at max_length={max_length} "
            f"({report.summary()}); raise max_length, use overflow='truncate', "
            "or shorten the prompts",
            field="source",
        )
    if report.n_truncated or report.n_dropped:
        warnings.warn(f"tokenize_records: {report.summary()}", stacklevel=2)
    return out, report


# --------------------------------------------------------------------------- batching


class CoLMCollator:
    """Pad tokenized examples into a batch, passing ``source`` through.

    Right padding: ``input_ids`` with the pad token (EOS if the tokenizer has
    none), ``attention_mask`` with 0, ``labels`` with -100. Lengths are
    rounded up to `pad_to_multiple_of` when given. ``source`` comes back as a
    list of strings (int sources are turned into strings); models do not take
    it, so the trainer integration pops it before the forward pass. Malformed
    features raise :class:`DataError` naming the example and the key.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None):
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise DataError(
                "tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first"
            )
        if isinstance(pad, bool) or not isinstance(pad, numbers.Integral) or pad < 0:
            raise DataError(f"the tokenizer's pad/EOS token id must be an int >= 0, got {pad!r}")
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool)
            or not isinstance(pad_to_multiple_of, numbers.Integral)
            or pad_to_multiple_of < 1
        ):
            raise DataError(
                f"pad_to_multiple_of must be a positive int, got {_short(pad_to_multiple_of)}"
            )
        self.pad_token_id = int(pad)
        self.pad_to_multiple_of = None if pad_to_multiple_of is None else int(pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        features = _examples(features, "CoLMCollator")
        if not features:
            raise DataError("cannot collate an empty list of examples")
        for i, f in enumerate(features):
            if not isinstance(f, Mapping):
                raise DataError(
                    f"example {i} is a {type(f).__name__} ({_short(f)}), not a dict; "
                    "tokenize examples with tokenize_records first",
                    index=i,
                )
        ids = [_as_list(f, "input_ids", i) for i, f in enumerate(features)]
        for i, x in enumerate(ids):
            if not x:
                raise DataError(
                    f"example {i}: 'input_ids' is empty; every example needs at least one token",
                    index=i,
                    field="input_ids",
                )
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = -(-width // m) * m
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch: dict[str, Any] = {}
        for key, fill in fills.items():
            if key == "labels" and all(key not in f for f in features):
                continue  # e.g. prompts for generation
            rows = []
            for i, f in enumerate(features):
                if key == "attention_mask" and key not in f:
                    values = [1] * len(ids[i])
                else:
                    values = ids[i] if key == "input_ids" else _as_list(f, key, i)
                if len(values) != len(ids[i]):
                    raise DataError(
                        f"example {i}: '{key}' has {len(values)} entries, input_ids has "
                        f"{len(ids[i])}",
                        index=i,
                        field=key,
                    )
                rows.append(values + [fill] * (width - len(values)))
            batch[key] = torch.tensor(rows, dtype=torch.long)
            _check_values(key, batch[key])
        has_source = ["source" in f for f in features]
        if any(has_source):
            if not all(has_source):
                missing = has_source.index(False)
                raise DataError(
                    f"some examples have a 'source' and some do not (example {missing} has "
                    "none); every example needs one",
                    index=missing,
                    field="source",
                )
            sources = []
            for i, f in enumerate(features):
                s = f["source"]
                if isinstance(s, bool) or not isinstance(s, (str, numbers.Integral)):
                    raise DataError(
                        f"example {i}: 'source' is {_short(s)} ({type(s).__name__}); "
                        "a source must be a string (or an int)",
                        index=i,
                        field="source",
                    )
                sources.append(str(s))
            batch["source"] = sources
        return batch


# What a value of each key may hold besides being an int64 (checked on the padded tensor;
# the fill values are valid).
_VALID_TOKEN = {
    "input_ids": ("token ids >= 0", lambda t: t >= 0),
    "attention_mask": ("0 or 1", lambda t: (t == 0) | (t == 1)),
    "labels": (f"token ids >= 0 or {IGNORE_INDEX}", lambda t: (t >= 0) | (t == IGNORE_INDEX)),
}


def _feature_error(key: str, i: int, problem: str) -> DataError:
    return DataError(
        f"example {i}: '{key}' {problem}; it must be a flat list of integers "
        f"({_VALID_TOKEN[key][0]})",
        index=i,
        field=key,
    )


def _as_list(feature: Mapping[str, Any], key: str, i: int) -> list[int]:
    """The integers of ``feature[key]`` (a list, tuple, tensor or array), in int64 range."""
    if key not in feature:
        raise DataError(
            f"example {i} has no '{key}'; tokenize it with tokenize_records first",
            index=i,
            field=key,
        )
    value = feature[key]
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise _feature_error(key, i, f"is {_short(value)} ({type(value).__name__})")
    values = list(value)
    if not set(map(type, values)) <= {int}:  # the common all-int case is checked in C
        for j, v in enumerate(values):
            if not isinstance(v, numbers.Integral):  # floats, None, strings, nested lists
                raise _feature_error(
                    key, i, f"has {_short(v)} ({type(v).__name__}) at position {j}"
                )
        values = [int(v) for v in values]
    if values and (min(values) < _INT64[0] or max(values) > _INT64[1]):
        j = next(j for j, v in enumerate(values) if not _INT64[0] <= v <= _INT64[1])
        raise _feature_error(key, i, f"has {_short(values[j])} at position {j}, outside int64")
    return values


def _check_values(key: str, t: Any) -> None:
    """Raise for the first entry of the padded batch tensor `t` that `key` may not hold."""
    bad = ~_VALID_TOKEN[key][1](t)
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise _feature_error(key, i, f"has {int(t[i, j])} at position {j}")
