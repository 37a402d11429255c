"""Evaluate a fine-tuned model: held-out loss per source, generation accuracy per task.

Data flow::

    heldout_loss(model, tok, records)         -> {source: mean token loss on the completion}
    generation_accuracy(model, tok, records)  -> {task: {"accuracy", "n", "mean_score"}}
    evaluate(model, tok, test_in, test_out)   -> both, on both splits, plus a summary
    write_eval(result, path)  /  format_table(result)

Prompts are tokenized by :func:`colm.data.tokenize_records`, the function that
builds the training examples, so the model is asked exactly what it was
trained on (chat template with the generation prompt when the tokenizer has
one). Answers are graded by :func:`colm.data.score`, i.e. by the generator's
own checker; it can give partial credit, so an example counts as correct only
when its score is 1.0 (``mean_score`` keeps the partial credit).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from colm.data import CoLMCollator, score, tokenize_records
from colm.files import atomic_write
from colm.models import eval_mode

__all__ = [
    "evaluate",
    "format_table",
    "generate_completions",
    "generation_accuracy",
    "heldout_loss",
    "prompt_token_ids",
    "task_of",
    "write_eval",
]

IGNORE_INDEX = -100
# Prompts are never cut for generation: the limit only has to exceed any prompt.
_NO_LIMIT = 2**62


# --------------------------------------------------------------------------- helpers


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off and no gradients for the duration, then the caller's modes back
    (e.g. mid-training)."""
    with eval_mode(model), torch.no_grad():
        yield


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, file=sys.stderr)


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
    return int(pad)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Tokens that end a generation: the model's generation config's and the tokenizer's EOS."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured is not None:
        ids.extend(int(i) for i in configured)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and int(eos) not in ids:
        ids.append(int(eos))
    return ids


def task_of(record: Mapping[str, Any]) -> str:
    """The task an example is grouped under for accuracy: ``task``, else its ``source``."""
    return str(record.get("task") or record["source"])


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------- held-out loss


@dataclass(frozen=True)
class SourceLoss:
    """Held-out loss of one source: the mean over its completion tokens, and how sure it is.

    ``se`` is the standard error of that token-weighted mean over the source's examples
    (a ratio estimator: sum_i s_i / sum_i n_i with s_i, n_i example i's summed loss and
    label tokens; SE = sqrt(sum_i (s_i - R n_i)^2 / (m (m - 1))) / mean_i n_i). It says how
    much the figure would move with other held-out examples of the same source, so two
    models' losses on the same examples differ by less than their intervals suggest.
    NaN with fewer than 2 examples.
    """

    loss: float
    se: float
    examples: int
    tokens: int

    @property
    def ci95(self) -> tuple[float, float]:
        """95% interval (normal approximation; fine from about 30 examples)."""
        return (self.loss - 1.96 * self.se, self.loss + 1.96 * self.se)


def _source_loss(sums: Sequence[float], counts: Sequence[int]) -> SourceLoss:
    m, tokens = len(sums), sum(counts)
    if not tokens:
        return SourceLoss(math.nan, math.nan, m, 0)
    r = sum(sums) / tokens
    if m < 2:
        return SourceLoss(r, math.nan, m, tokens)
    resid = sum((s - r * n) ** 2 for s, n in zip(sums, counts))
    se = math.sqrt(resid / (m * (m - 1))) / (tokens / m)
    return SourceLoss(r, se, m, tokens)


_WARNED: set[str] = set()


def _tokenize_once_warned(records, tokenizer, max_length: int) -> list[dict[str, Any]]:
    """Tokenize held-out records; a truncation warning is shown once per process, not at
    every evaluation of the same records during training."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples, _ = tokenize_records(
            records, tokenizer, max_length=max_length, overflow="truncate"
        )
    for w in caught:
        text = str(w.message)
        if text not in _WARNED:
            _WARNED.add(text)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return examples


def heldout_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "held-out loss",
) -> dict[str, float]:
    """Mean per-token loss on the completion (prompt masked), per source.

    Examples are tokenized as for training (:func:`colm.data.tokenize_records`,
    cut at `max_length`). The loss of a source is the mean cross-entropy over
    all of its completion tokens (EOS included), i.e. weighted by tokens, not
    by examples. Returns ``{source: loss}`` in order of first appearance;
    :func:`heldout_losses` gives each with its standard error.
    """
    found = heldout_losses(model, tokenizer, records, max_length, batch_size, progress, desc)
    return {s: v.loss for s, v in found.items()}


def heldout_losses(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    max_length: int = 512,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "held-out loss",
) -> dict[str, SourceLoss]:
    """As :func:`heldout_loss`, with each source's standard error (:class:`SourceLoss`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    examples = _tokenize_once_warned(records, tokenizer, max_length)
    # Similar lengths together: less padding. Right padding cannot change the
    # logits of real tokens in a causal model, so the order does not matter.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    collate = CoLMCollator(tokenizer)
    device = _device(model)
    sums: dict[str, list[float]] = {ex["source"]: [] for ex in examples}
    counts: dict[str, list[int]] = {s: [] for s in sums}
    fast = True  # logits at label positions only, until the model shows it cannot
    with _eval_mode(model), _progress(len(examples), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]])
            sources = batch.pop("source")  # models do not take it
            labels = batch.pop("labels").to(device)
            inputs = {
                "input_ids": batch["input_ids"].to(device),
                "attention_mask": batch["attention_mask"].to(device),
            }
            per_sum = per_n = None
            if fast:
                per_sum, per_n = _label_token_losses(model, inputs, labels)
                fast = per_sum is not None
            if per_sum is None:
                per_sum, per_n = _all_token_losses(model, inputs, labels)
            for source, s, n in zip(sources, per_sum.tolist(), per_n.tolist()):
                sums[source].append(s)
                counts[source].append(int(n))
            bar.update(len(sources))
    return {s: _source_loss(sums[s], counts[s]) for s in sums}


def _all_token_losses(model, inputs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: summed cross-entropy over its label tokens, and their count (the
    plain way: logits at every position)."""
    logits = model(**inputs).logits
    target = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = target != IGNORE_INDEX
    return (token_loss * mask).sum(dim=1), mask.sum(dim=1)


def _label_token_losses(model, inputs, labels) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """As :func:`_all_token_losses`, with the LM head applied only where a label token is
    predicted (transformers' boolean ``logits_to_keep``): most positions are prompt, and
    the head over a large vocabulary is a good part of the forward pass. ``(None, None)``
    when the model does not take such a mask (its logits come back unsliced)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # a forward without logits_to_keep
        return None, None
    n_keep = int(keep.sum())
    if logits.dim() != 2 or logits.shape[0] != n_keep:
        return None, None
    target = labels[:, 1:][keep[:, :-1]]
    token_loss = F.cross_entropy(logits.float(), target, reduction="none")
    row = keep.nonzero()[:, 0]  # row of every kept position, in the same (row-major) order
    per_sum = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=labels.device)
    per_sum.index_add_(0, row, token_loss)
    return per_sum, keep.sum(dim=1)


# --------------------------------------------------------------------------- generation


def prompt_token_ids(records: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[list[int]]:
    """Token ids of each example's prompt exactly as in training, ready to generate from.

    Uses :func:`colm.data.tokenize_records` (whose labels are -100 on the
    prompt tokens and only there), so the chat template, the generation
    prompt and special tokens match the training examples.
    """
    examples, _ = tokenize_records(records, tokenizer, max_length=_NO_LIMIT, overflow="truncate")
    out = []
    for i, ex in enumerate(examples):
        n_prompt = sum(1 for label in ex["labels"] if label == IGNORE_INDEX)
        if n_prompt == 0:
            raise ValueError(
                f"example {i} ({ex['source']}) has an empty prompt; there is nothing to "
                "generate from"
            )
        out.append(list(ex["input_ids"][:n_prompt]))
    return out


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask: generation continues right after each prompt.

    Padding is done here rather than with ``tokenizer.pad`` so the caller's
    tokenizer (its ``padding_side``) is never modified.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


def generate_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "generation",
) -> list[str]:
    """Greedy completions (new text only, up to the first EOS) for each example's prompt."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = prompt_token_ids(records, tokenizer)
    pad_id = _pad_id(tokenizer)
    eos_ids = _eos_ids(model, tokenizer)
    device = _device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    with _eval_mode(model), _progress(len(prompts), desc, progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = _left_pad([prompts[i] for i in chunk], pad_id)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
                eos_token_id=eos_ids or None,
                use_cache=True,
            )
            new_tokens = out[:, ids.shape[1] :].tolist()
            for i, tokens in zip(chunk, new_tokens):
                # Cut at the first EOS: what follows is padding, whatever the pad token is.
                end = next((j for j, t in enumerate(tokens) if t in eos_ids), len(tokens))
                texts[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
            bar.update(len(chunk))
    return texts


def generation_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    progress: bool = False,
    outputs: list[dict[str, Any]] | None = None,
    desc: str = "generation",
) -> dict[str, dict[str, float | int]]:
    """Greedy generation, graded by :func:`colm.data.score`, per task.

    Returns ``{task: {"accuracy", "n", "mean_score"}}`` where ``accuracy`` is
    the share of examples scoring exactly 1.0 and ``mean_score`` the mean
    score (partial credit included). The task is the record's ``task``, else
    its ``source``. If `outputs` is a list, one dict per example
    (``task``, ``prompt``, ``generated``, ``answer``, ``score``) is appended.
    """
    records = list(records)
    texts = generate_completions(
        model, tokenizer, records, max_new_tokens, batch_size, progress, desc
    )
    scores: dict[str, list[float]] = {}
    for record, text in zip(records, texts):
        value = float(score(record, text))
        scores.setdefault(task_of(record), []).append(value)
        if outputs is not None:
            outputs.append(
                {
                    "task": task_of(record),
                    "prompt": record["prompt"],
                    "generated": text,
                    "answer": record.get("answer"),
                    "score": value,
                }
            )
    return {
        task: {
            "accuracy": sum(v == 1.0 for v in values) / len(values),
            "n": len(values),
            "mean_score": sum(values) / len(values),
        }
        for task, values in scores.items()
    }


# --------------------------------------------------------------------------- all together


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    test_in: Sequence[Mapping[str, Any]],
    test_out: Sequence[Mapping[str, Any]] = (),
    *,
    max_length: int = 512,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    generate: bool = True,
    samples_per_task: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Held-out loss and generation accuracy on in-domain and out-of-domain tests.

    Returns a JSON-ready dict:

    * ``loss``: ``{source: mean token loss}`` for the sources of both splits, with
      ``loss_se`` (its standard error, :class:`SourceLoss`) and ``loss_examples``;
    * ``accuracy_in`` / ``accuracy_out``: ``{task: {"accuracy", "n", "mean_score"}}``
      (empty when ``generate=False`` or the split is empty);
    * ``summary``: ``loss_in`` / ``loss_out`` (mean over the split's sources),
      ``acc_in`` / ``acc_out`` (mean accuracy over the split's tasks) and
      ``acc_all`` (mean over all tasks of both splits); None where not measured;
    * ``samples``: the first `samples_per_task` generations of every task;
    * ``settings`` and ``seconds``.
    """
    test_in, test_out = list(test_in), list(test_out)
    if not test_in and not test_out:
        raise ValueError("nothing to evaluate: test_in and test_out are both empty")
    t0 = time.perf_counter()
    loss: dict[str, dict[str, float]] = {"in": {}, "out": {}}
    found: dict[str, SourceLoss] = {}
    for split, records in (("in", test_in), ("out", test_out)):
        if records:
            per = heldout_losses(
                model, tokenizer, records, max_length, batch_size, progress, f"loss ({split})"
            )
            loss[split] = {s: v.loss for s, v in per.items()}
            found.update(per)
    accuracy: dict[str, dict[str, Any]] = {"in": {}, "out": {}}
    outputs: list[dict[str, Any]] = []
    if generate:
        for split, records in (("in", test_in), ("out", test_out)):
            if records:
                accuracy[split] = generation_accuracy(
                    model,
                    tokenizer,
                    records,
                    max_new_tokens,
                    batch_size,
                    progress,
                    outputs,
                    f"generation ({split})",
                )
    samples: dict[str, list[dict[str, Any]]] = {}
    for out in outputs:
        kept = samples.setdefault(out["task"], [])
        if len(kept) < samples_per_task:
            kept.append({k: v for k, v in out.items() if k != "task"})
    acc_in = [a["accuracy"] for a in accuracy["in"].values()]
    acc_out = [a["accuracy"] for a in accuracy["out"].values()]
    return {
        "loss": {**loss["in"], **loss["out"]},
        "loss_se": {s: v.se for s, v in found.items()},
        "loss_examples": {s: v.examples for s, v in found.items()},
        "accuracy_in": accuracy["in"],
        "accuracy_out": accuracy["out"],
        "summary": {
            "loss_in": _mean(list(loss["in"].values())),
            "loss_out": _mean(list(loss["out"].values())),
            "acc_in": _mean(acc_in),
            "acc_out": _mean(acc_out),
            "acc_all": _mean(acc_in + acc_out),
            "n_in": len(test_in),
            "n_out": len(test_out),
        },
        "samples": samples,
        "settings": {
            "max_length": max_length,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "generate": generate,
            "decoding": "greedy",
        },
        "seconds": time.perf_counter() - t0,
    }


def write_eval(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write `result` as JSON; a temporary file renamed into place, so readers never see half."""
    path = Path(path)
    with atomic_write(path) as f:
        json.dump(result, f, indent=2, sort_keys=False, allow_nan=True)
        f.write("\n")
    return path


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate` result: summary, then one row per task/source."""
    summary = result.get("summary", {})
    lines = [
        "  ".join(
            f"{key} {_fmt(summary.get(key), 4 if key.startswith('loss') else 3)}"
            for key in ("loss_in", "loss_out", "acc_in", "acc_out", "acc_all")
        )
    ]
    loss = result.get("loss", {})
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for split in ("in", "out"):
        for task, acc in result.get(f"accuracy_{split}", {}).items():
            rows.append((task, split, acc))
    named = {r[0] for r in rows}
    rows += [(source, "-", {}) for source in loss if source not in named]
    width = max([len("task"), *(len(r[0]) for r in rows)])
    header = (
        f"{'task':<{width}}  {'split':<5}  {'n':>5}  {'accuracy':>8}  {'score':>6}  {'loss':>7}"
    )
    lines += [header, "-" * len(header)]
    for name, split, acc in rows:
        lines.append(
            f"{name:<{width}}  {split:<5}  {_fmt(acc.get('n')):>5}  "
            f"{_fmt(acc.get('accuracy'), 3):>8}  {_fmt(acc.get('mean_score'), 3):>6}  "
            f"{_fmt(loss.get(name)):>7}"
        )
    return "\n".join(lines)
