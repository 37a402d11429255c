"""Tokenizing records: prompt tokens masked out of the labels, long examples cut or
dropped and counted (:class:`TokenizationReport`)."""

from __future__ import annotations

import numbers
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import DataError, _short, _unencodable
from .records import _MESSAGE_SHAPE, _examples

IGNORE_INDEX = -100


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
