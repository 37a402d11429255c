"""User data: read examples with a source label, tokenize them, batch them.

Data flow::

    load_records(path or Dataset)   -> [{"source", "prompt", "completion", ...}]
    tokenize_records(records, tok)  -> [{"input_ids", "attention_mask", "labels", "source"}], report
    CoLMCollator(tok)(features)     -> {"input_ids", "attention_mask", "labels": tensors,
                                        "source": list[str]}

Every example needs a source (its sub-dataset, e.g. "gsm8k"), because CoLM
keeps small sources whole and selects among the big ones. Bad input raises a
ValueError / FileNotFoundError that names the file, row and field, and says
how to fix it.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "CoLMCollator",
    "TokenizationReport",
    "load_records",
    "source_counts",
    "tokenize_records",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100


# --------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}: line {lineno} is not valid JSON ({e.msg}); "
                    "a .jsonl file needs one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object; "
                    "each line must be an object such as "
                    '{"source": ..., "prompt": ..., "completion": ...}'
                )
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON lines saved as .json
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(
            f"{path}: expected a JSON array of objects (or one object per line), "
            f"got a {type(data).__name__}"
        )
    return data


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = []
        try:
            for row in reader:
                if None in row:
                    raise ValueError(
                        f"{path}: row {reader.line_num - 1} has more fields than the header "
                        f"({len(reader.fieldnames or [])} columns); quote fields that contain commas"
                    )
                rows.append(row)
        except csv.Error as e:
            raise ValueError(
                f"{path}: not readable as CSV near line {reader.line_num}: {e}"
            ) from None
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for broken files
        raise ValueError(
            f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); "
            "check that it was fully written"
        ) from None
    return table.to_pylist()


_READERS = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _rows_from(data: Any) -> tuple[list[Mapping[str, Any]], str]:
    """Rows of `data` and a name for error messages."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        ext = path.suffix.lower()
        if ext not in _READERS:
            raise ValueError(
                f"{path}: unknown file type '{path.suffix}'; use one of "
                f"{', '.join(SUPPORTED_EXTENSIONS)} (or pass a datasets.Dataset)"
            )
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        if not path.is_file():
            raise ValueError(f"{path} is not a file; pass the path of a {ext} file")
        try:
            return _READERS[ext](path), str(path)
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 or check the extension"
            ) from None
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None:
        if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise ValueError(
                f"got a DatasetDict with splits {list(data.keys())}; pass one split, "
                "e.g. load_records(ds['train'])"
            )
        if isinstance(data, datasets.Dataset):
            return data.to_list(), "dataset"
    if isinstance(data, Sequence) and all(isinstance(r, Mapping) for r in data):
        return list(data), "records"
    raise ValueError(
        f"cannot read examples from a {type(data).__name__}; pass a path to a "
        f"{'/'.join(SUPPORTED_EXTENSIONS)} file, a datasets.Dataset or a list of dicts"
    )


# --------------------------------------------------------------------------- normalising


def _columns(row: Mapping[str, Any]) -> str:
    return ", ".join(repr(str(k)) for k in row) or "none"


def _as_messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                f"{where}: field '{name}' is a string that is not JSON; it must be a list of "
                '{"role": ..., "content": ...} messages'
            ) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"{where}: field '{name}' must be a non-empty list of "
            '{"role": ..., "content": ...} messages'
        )
    out = []
    for j, msg in enumerate(value):
        if (
            not isinstance(msg, Mapping)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise ValueError(
                f"{where}: message {j} of '{name}' must have string 'role' and 'content', "
                f"got {msg!r}"
            )
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _flatten(messages: Sequence[Mapping[str, str]]) -> str:
    """Prompt text for tokenizers without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def _normalise_row(
    row: Mapping[str, Any],
    where: str,
    source_column: str,
    prompt_field: str,
    completion_field: str,
    messages_field: str,
) -> tuple[dict[str, Any], bool]:
    """One example as {"source", "prompt", "completion", "prompt_messages", ...extra}.

    Returns the record and whether messages after the last assistant turn were dropped.
    """
    if source_column not in row:
        raise ValueError(
            f"{where}: no source column '{source_column}' (columns: {_columns(row)}). "
            "Every example needs a source label; pass source_column=... to name the column "
            "that holds it"
        )
    source = row[source_column]
    if not isinstance(source, str):
        raise ValueError(
            f"{where}: source '{source_column}' is {source!r} ({type(source).__name__}); "
            "source labels must be non-empty strings"
        )
    if not source.strip():
        raise ValueError(
            f"{where}: source '{source_column}' is empty; give every example a source label"
        )
    used = {source_column}
    trailing = False
    prompt_messages = None
    has_pc = row.get(prompt_field) is not None and row.get(completion_field) is not None
    if has_pc:
        used |= {prompt_field, completion_field}
        prompt, completion = row[prompt_field], row[completion_field]
        # TRL's conversational prompt-completion format: lists of messages.
        if isinstance(prompt, (list, tuple)):
            prompt_messages = _as_messages(prompt, where, prompt_field)
            prompt = _flatten(prompt_messages)
        if isinstance(completion, (list, tuple)):
            msgs = _as_messages(completion, where, completion_field)
            completion = msgs[-1]["content"]
        for name, value in ((prompt_field, prompt), (completion_field, completion)):
            if not isinstance(value, str):
                raise ValueError(
                    f"{where}: field '{name}' is a {type(value).__name__}; it must be text"
                )
    elif row.get(messages_field) is not None:
        used.add(messages_field)
        messages = _as_messages(row[messages_field], where, messages_field)
        last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise ValueError(
                f"{where}: '{messages_field}' has no assistant message (roles: "
                f"{[m['role'] for m in messages]}); the last assistant message is the target"
            )
        trailing = last < len(messages) - 1
        prompt_messages = messages[:last]
        prompt = _flatten(prompt_messages) if prompt_messages else ""
        completion = messages[last]["content"]
    else:
        raise ValueError(
            f"{where}: needs either '{prompt_field}' and '{completion_field}' or "
            f"'{messages_field}' (columns: {_columns(row)}); pass prompt_field=/"
            "completion_field= or messages_field= to name your columns"
        )
    if not completion.strip():
        raise ValueError(f"{where}: the completion is empty; remove the example or fill it in")
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
    source_column: str = "source",
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

    Returns one dict per row: ``source``, ``prompt`` (text; for messages a
    plain ``role: content`` rendering used with template-free tokenizers),
    ``completion``, ``prompt_messages`` (the prompt turns, or None), and the
    row's other columns unchanged.
    """
    rows, name = _rows_from(data)
    if not rows:
        raise ValueError(f"{name} has no examples; check the file or the dataset split")
    records = []
    n_trailing = 0
    for i, row in enumerate(rows):
        record, trailing = _normalise_row(
            row,
            f"{name}: row {i + 1}",
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


def source_counts(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Number of examples per source, largest first (ties by name)."""
    counts: Counter[str] = Counter()
    for i, r in enumerate(records):
        if "source" not in r:
            raise ValueError(f"example {i} has no 'source'; load data with load_records first")
        counts[r["source"]] += 1
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
    for r in records:
        messages = r.get("prompt_messages") or [{"role": "user", "content": r["prompt"]}]
        texts.append(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    return texts


def _check_records(records: Sequence[Mapping[str, Any]]) -> None:
    if not records:
        raise ValueError("no examples to tokenize")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise ValueError(f"example {i} is a {type(r).__name__}, not a dict")
        for key in ("source", "prompt", "completion"):
            if not isinstance(r.get(key), str):
                raise ValueError(
                    f"example {i}: '{key}' must be a string, got {r.get(key)!r}; "
                    "read data with load_records (or build_default_mixture) first"
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
    raises ValueError: CoLM needs every source's examples.
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    records = list(records)
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
        raise ValueError(
            f"source(s) {empty} have no usable examples at max_length={max_length} "
            f"({report.summary()}); raise max_length, use overflow='truncate', "
            "or shorten the prompts"
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
    list of strings; models do not take it, so the trainer integration pops it
    before the forward pass.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None):
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError(
                "tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first"
            )
        if pad_to_multiple_of is not None and (
            not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
        ):
            raise ValueError(
                f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}"
            )
        self.pad_token_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        if not features:
            raise ValueError("cannot collate an empty list of examples")
        ids = [_as_list(f, "input_ids", i) for i, f in enumerate(features)]
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
                    raise ValueError(
                        f"example {i}: '{key}' has {len(values)} entries, input_ids has {len(ids[i])}"
                    )
                rows.append(values + [fill] * (width - len(values)))
            batch[key] = torch.tensor(rows, dtype=torch.long)
        has_source = ["source" in f for f in features]
        if any(has_source):
            if not all(has_source):
                raise ValueError("some examples have a 'source' and some do not")
            batch["source"] = [str(f["source"]) for f in features]
        return batch


def _as_list(feature: Mapping[str, Any], key: str, i: int) -> list[int]:
    if key not in feature:
        raise ValueError(f"example {i} has no '{key}'; tokenize it with tokenize_records first")
    value = feature[key]
    if hasattr(value, "tolist"):
        value = value.tolist()
    return [int(v) for v in value]
