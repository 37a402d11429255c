"""Pull the final answer out of generated text and grade it.

Grading uses the reasoning-gym generator's own checker (``score_answer``) on
the generator entry the example came from, re-created from the ``task*``
fields that :mod:`colm.data.mixture` stores in every example. Examples
without those fields (user data with an ``answer`` column) are graded by
normalised comparison with the gold answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

__all__ = ["extract_answer", "gold_entry", "score", "score_answer"]

# "Answer: x", also "Final answer: x", "**Answer:** x", "> Answer - x" is not
# accepted (a dash is too common inside text).
_ANSWER_LINE = re.compile(
    r"^[ \t>*_#]*(?:the[ \t]+)?(?:final[ \t]+)?answer[ \t*_]*[:：](?P<rest>.*)$",
    re.IGNORECASE | re.MULTILINE,
)
_GSM_LINE = re.compile(r"^[ \t]*####[ \t]*(?P<rest>.+)$", re.MULTILINE)
_ANSWER_IS = re.compile(
    r"(?:final answer|the answer)[ \t]+is[ \t:]*(?P<rest>[^\n]+)", re.IGNORECASE
)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?:[eE][+-]?\d+)?(?:/\d+)?(?![\w])")
_TRAILING = ".,;:!"


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}``, braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _clean(answer: str) -> str:
    """Strip decoration a model adds around an answer, keep the answer itself."""
    s = answer.strip().replace("\u2212", "-")  # unicode minus
    for _ in range(3):  # decorations nest: "**$\boxed{5}$**."
        before = s
        s = s.strip()
        while s and s[-1] in _TRAILING:
            s = s[:-1].rstrip()
        # Markdown emphasis, also unbalanced: "**Answer:** 12", "Answer: 12**".
        s = s.strip("*").strip()
        for wrap in ("__", "`"):
            if len(s) > 2 * len(wrap) and s.startswith(wrap) and s.endswith(wrap):
                s = s[len(wrap) : -len(wrap)].strip()
        if len(s) > 2 and s.startswith("$") and s.endswith("$"):
            inner = s.strip("$").strip()
            boxed = _boxed_contents(inner)
            # Unwrap "$\boxed{x}$" and "$x$"; keep "$\frac{a}{b}$" as is:
            # generators such as fraction_simplification accept it with "$".
            if boxed and inner.startswith("\\"):
                s = boxed[-1].strip()
            elif "\\" not in inner:
                s = inner
        boxed = _boxed_contents(s)
        if boxed and s.startswith("\\"):
            s = boxed[-1].strip()
        if s == before:
            break
    return s


def extract_answer(text: str | None) -> str | None:
    """The final answer in a generated completion, or None when there is none.

    Looks, in order, for:

    1. the first ``Answer: ...`` line (the mixture's format; the first, because
       a model that runs past its answer tends to start a new question);
       if that line is empty, the next non-empty line;
    2. the last ``\\boxed{...}``;
    3. the last GSM8K-style ``#### ...`` line;
    4. the last "the answer is ..." phrase;
    5. the last number (integers, decimals, ``a/b``, thousands commas removed).

    The result is stripped of surrounding whitespace, markdown emphasis,
    ``$...$`` around plain values, ``\\boxed{}`` and trailing ``.,;:!``.
    """
    if not text or not text.strip():
        return None
    m = _ANSWER_LINE.search(text)
    if m:
        rest = _clean(m.group("rest"))
        if not rest:
            following = [ln for ln in text[m.end() :].split("\n") if ln.strip()]
            rest = _clean(following[0]) if following else ""
        if rest:
            return rest
    boxed = _boxed_contents(text)
    if boxed and _clean(boxed[-1]):
        return _clean(boxed[-1])
    for pattern in (_GSM_LINE, _ANSWER_IS):
        found = [_clean(m.group("rest")) for m in pattern.finditer(text)]
        found = [f for f in found if f]
        if found:
            return found[-1]
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


@lru_cache(maxsize=64)
def _dataset(task: str, seed: int | None, size: int, config_json: str):
    import reasoning_gym

    config = json.loads(config_json) if config_json else {}
    kwargs: dict[str, Any] = {"size": size, **config}
    if seed is not None:
        kwargs["seed"] = seed
    return reasoning_gym.create_dataset(task, **kwargs)


def _config_json(record: Mapping[str, Any]) -> str:
    config = record.get("task_config") or "{}"
    if isinstance(config, Mapping):
        return json.dumps(dict(config), sort_keys=True)
    if not isinstance(config, str):
        raise ValueError(
            f"task_config must be a JSON string or a dict, got {type(config).__name__}"
        )
    return config


def gold_entry(record: Mapping[str, Any]) -> dict[str, Any]:
    """The reasoning-gym entry an example was made from.

    Uses ``record["entry"]`` when the record carries the entry itself, else
    re-creates it from ``task``, ``task_seed``, ``task_size``, ``task_index``
    and ``task_config``. Raises ValueError if the record has neither, or if the
    re-created entry's answer differs from ``record["answer"]`` (a different
    reasoning-gym version generated the data).
    """
    entry = record.get("entry")
    if isinstance(entry, Mapping):
        return dict(entry)
    missing = [k for k in ("task", "task_seed", "task_size", "task_index") if record.get(k) is None]
    if missing:
        raise ValueError(
            f"example has no reasoning-gym fields {missing}; only examples built by "
            "colm.data.mixture (or carrying an 'entry' dict) can be graded by a generator"
        )
    dataset = _dataset(
        str(record["task"]),
        int(record["task_seed"]),
        int(record["task_size"]),
        _config_json(record),
    )
    entry = dataset[int(record["task_index"])]
    gold = record.get("answer")
    if gold is not None and str(entry["answer"]) != str(gold):
        raise ValueError(
            f"example {record.get('entry_id', '?')}: re-created answer {entry['answer']!r} != "
            f"stored answer {gold!r}; the data was generated by another reasoning-gym version. "
            "Regenerate the mixture with the installed version."
        )
    return entry


def _task_name(record: Mapping[str, Any]) -> str | None:
    """The generator of an example: ``task``, else the entry's ``source_dataset``."""
    if record.get("task") is not None:
        return str(record["task"])
    entry = record.get("entry")
    if isinstance(entry, Mapping):
        name = (entry.get("metadata") or {}).get("source_dataset")
        if name:
            return str(name)
        raise ValueError(
            "example carries an 'entry' without metadata.source_dataset; add a 'task' field "
            "naming its reasoning-gym generator"
        )
    return None


def _as_number(s: str) -> Decimal | None:
    s = s.strip().replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Decimal(num.strip()) / Decimal(den.strip())
        return Decimal(s)
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def score_answer(record: Mapping[str, Any], answer: str | None) -> float:
    """Grade an already-extracted answer for one example, in [0, 1].

    Generator examples use the generator's ``score_answer`` (which may give
    partial credit below 1 to wrong answers); other examples with an
    ``answer`` field get 1.0 for an equal number or equal normalised text.
    """
    if answer is None:
        return 0.0
    task = _task_name(record)
    if task is not None:
        entry = gold_entry(record)
        seed = record.get("task_seed")
        dataset = _dataset(
            task,
            None if seed is None else int(seed),
            int(record.get("task_size") or 1),
            _config_json(record),
        )
        try:
            value = float(dataset.score_answer(answer, entry))
        except Exception:  # a checker that chokes on odd text: the answer is wrong
            value = 0.0
        return min(1.0, max(0.0, value))
    if record.get("answer") is None:
        raise ValueError(
            "example has neither reasoning-gym fields (task, task_seed, ...) nor an 'answer' "
            "field; add the gold answer to grade it"
        )
    gold = str(record["answer"])
    a, g = _as_number(answer), _as_number(gold)
    if a is not None and g is not None:
        return 1.0 if a == g else 0.0
    return 1.0 if " ".join(answer.split()).lower() == " ".join(gold.split()).lower() else 0.0


def score(record: Mapping[str, Any], generated_text: str | None) -> float:
    """Grade a model's generated completion for one example, in [0, 1].

    Extracts the answer with :func:`extract_answer` (no answer scores 0.0)
    and grades it with :func:`score_answer`.
    """
    return score_answer(record, extract_answer(generated_text))
