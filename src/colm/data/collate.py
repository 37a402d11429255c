"""Batching tokenized examples: :class:`CoLMCollator` pads them and keeps each source."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import DataError, _short
from .records import _examples
from .tokenize import IGNORE_INDEX

_INT64 = (-(2**63), 2**63 - 1)


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
