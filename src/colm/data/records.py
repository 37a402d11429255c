"""Normalising rows into records: a source label and either prompt + completion or chat
messages (:func:`load_records`), and counting examples per source."""

from __future__ import annotations

import itertools
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import DataError, _short, _unencodable
from .reading import _parse_json, _rows_from

UNLABELLED = "unlabelled"  # the source of every example loaded with source_column=None
_MESSAGE_SHAPE = '{"role": ..., "content": ...}'


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
