"""User data and its errors: the contract of reading, normalising, tokenizing and batching.

The four steps live in :mod:`colm.data.reading` (files), :mod:`colm.data.records`
(rows -> records with a source), :mod:`colm.data.tokenize` and :mod:`colm.data.collate`;
this module holds their common error type.

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

from typing import Any


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
