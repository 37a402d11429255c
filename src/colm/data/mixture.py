"""The built-in demo mixture: an imbalanced set of reasoning-gym math sources.

CoLM targets data mixtures in which a few big sources dominate and many small
ones are easily missed (MathInstruct: 4 big and 10 small sources). This module
builds a small stand-in from seeded `reasoning-gym` generators:

* ``train``: four big sources and six small ones, 16 to 1000 examples each
  (a 62x spread), about 3,000 examples in all, so a CPU demo can train on it;
* ``test_in``: held-out examples of every training source (same generators,
  disjoint generator seeds, no question repeated from ``train``);
* ``test_out``: out-of-domain examples from generators that are not trained on.

Each example is a plain dict (see :func:`build_default_mixture`) that keeps the
generator name, seed, size, index and configuration, so that
:func:`colm.data.answers.score` can re-create the generator's entry and grade a
model's answer with the generator's own checker.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

ANSWER_PREFIX = "Answer: "
"""The final line of every completion in the mixture is ``ANSWER_PREFIX + answer``."""

# Slack when drawing held-out examples: some generators repeat questions
# (chain_sum gives about 5 repeats in 800), which are skipped, not counted.
_DRAW_FACTOR = 4
_DRAW_EXTRA = 64


@dataclass
class SourceSpec:
    """One reasoning-gym generator used as one data source.

    Attributes:
        name: reasoning-gym generator name (``reasoning_gym.create_dataset(name)``);
            it is also the example's ``source`` label.
        size: number of examples to draw (train size for training sources,
            test size for out-of-domain sources).
        config: extra keyword arguments for the generator's config
            (e.g. ``{"max_digits": 3}``); must be JSON-serialisable.
    """

    name: str
    size: int
    config: dict[str, Any] = field(default_factory=dict)


def _default_train_sources() -> list[SourceSpec]:
    # Big sources (above the mean size, so CoLM selects among them) and small
    # ones (below the mean, kept whole). Only gsm_symbolic ships a worked
    # solution; the others are answer-only, like MathInstruct's PoT/CoT mix of
    # long and short targets.
    return [
        SourceSpec("basic_arithmetic", 1000),
        SourceSpec("chain_sum", 800),
        SourceSpec("gsm_symbolic", 600),
        SourceSpec("simple_equations", 400),
        SourceSpec("leg_counting", 60),
        SourceSpec("gcd", 48),
        SourceSpec("lcm", 40),
        SourceSpec("fraction_simplification", 32),
        SourceSpec("count_bits", 24),
        SourceSpec("time_intervals", 16),
    ]


def _default_ood_sources() -> list[SourceSpec]:
    return [
        SourceSpec("decimal_chain_sum", 20),
        SourceSpec("products", 20),
        SourceSpec("prime_factorization", 20),
    ]


@dataclass
class MixtureSpec:
    """What :func:`build_default_mixture` generates.

    Attributes:
        train: training sources with their sizes.
        test_per_source: held-out in-domain examples per training source.
        ood: out-of-domain generators (not used for training) with their test sizes.
        seed: master seed; each generator's seeds are derived from it and its name.
    """

    train: list[SourceSpec] = field(default_factory=_default_train_sources)
    test_per_source: int = 20
    ood: list[SourceSpec] = field(default_factory=_default_ood_sources)
    seed: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixtureSpec:
        """Build a spec from plain data (e.g. YAML).

        ``train`` and ``ood`` may be lists of ``{"name", "size", "config"}`` dicts
        or mappings ``{name: size}``; missing keys take the defaults.
        """
        unknown = set(data) - {"train", "test_per_source", "ood", "seed"}
        if unknown:
            raise ValueError(
                f"unknown mixture keys {sorted(unknown)}; "
                "expected train, test_per_source, ood, seed"
            )
        kwargs: dict[str, Any] = {}
        for key in ("train", "ood"):
            if key in data:
                kwargs[key] = _parse_sources(data[key], key)
        for key in ("test_per_source", "seed"):
            if key in data:
                kwargs[key] = int(data[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, the inverse of :meth:`from_dict`."""
        return asdict(self)

    def validate(self) -> None:
        """Raise ValueError naming the problem if the spec cannot be built."""
        import reasoning_gym

        known = set(reasoning_gym.factory.DATASETS)
        for group, sources in (("train", self.train), ("ood", self.ood)):
            names = [s.name for s in sources]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"mixture {group} lists generator(s) {dupes} more than once")
            for s in sources:
                if s.name not in known:
                    raise ValueError(
                        f"mixture {group} source '{s.name}' is not a reasoning-gym generator; "
                        f"known generators include {sorted(known)[:12]}..."
                    )
                if s.size < 1:
                    raise ValueError(
                        f"mixture {group} source '{s.name}' has size {s.size}; use >= 1"
                    )
                reserved = sorted({"seed", "size"} & set(s.config))
                if reserved:
                    raise ValueError(
                        f"mixture {group} source '{s.name}': config sets {reserved}; "
                        "sizes go in `size` and seeds are derived from the mixture seed"
                    )
                try:
                    json.dumps(s.config)
                except TypeError as e:
                    raise ValueError(
                        f"mixture {group} source '{s.name}': config must be JSON-serialisable ({e})"
                    ) from None
        if not self.train:
            raise ValueError("mixture has no training sources")
        overlap = sorted({s.name for s in self.train} & {s.name for s in self.ood})
        if overlap:
            raise ValueError(
                f"generator(s) {overlap} are both trained on and used as out-of-domain tests; "
                "remove them from `ood`"
            )
        if self.test_per_source < 0:
            raise ValueError(f"test_per_source is {self.test_per_source}; use >= 0")


def _parse_sources(value: Any, key: str) -> list[SourceSpec]:
    if isinstance(value, Mapping):
        return [SourceSpec(str(name), int(size)) for name, size in value.items()]
    out = []
    for item in value:
        if isinstance(item, SourceSpec):
            out.append(item)
        elif isinstance(item, Mapping) and "name" in item and "size" in item:
            out.append(
                SourceSpec(str(item["name"]), int(item["size"]), dict(item.get("config") or {}))
            )
        else:
            raise ValueError(
                f"mixture {key}: each source must be {{name: ..., size: ...}}, got {item!r}"
            )
    return out


class Mixture(NamedTuple):
    """The three splits, each a list of example dicts; unpacks as a tuple."""

    train: list[dict[str, Any]]
    test_in: list[dict[str, Any]]
    test_out: list[dict[str, Any]]


def derive_seed(seed: int, name: str) -> int:
    """A generator's base seed: stable across runs, Python versions and source order."""
    return zlib.crc32(f"colm/{seed}/{name}".encode()) % (2**31)


def format_completion(answer: str, solution: str | None = None) -> str:
    """The training target: an optional worked solution, then ``Answer: <answer>``."""
    line = f"{ANSWER_PREFIX}{answer}"
    return f"{solution.rstrip()}\n{line}" if solution else line


def _solution_of(entry: Mapping[str, Any]) -> str | None:
    """The generator's worked solution, without a trailing GSM8K ``#### n`` line."""
    cot = (entry.get("metadata") or {}).get("answer_cot")
    if not isinstance(cot, str) or not cot.strip():
        return None
    lines = cot.rstrip().split("\n")
    if lines[-1].lstrip().startswith("####"):
        lines = lines[:-1]
    text = "\n".join(lines).strip()
    return text or None


def make_record(
    entry: Mapping[str, Any],
    *,
    task: str,
    task_seed: int,
    task_size: int,
    task_index: int,
    task_config: Mapping[str, Any],
    split: str,
) -> dict[str, Any]:
    """Turn one reasoning-gym entry into a mixture example dict."""
    answer = str(entry["answer"])
    if "\n" in answer:
        # The answer line format cannot carry it; no generator we use does this.
        raise ValueError(f"{task}[{task_index}] has a multi-line answer {answer!r}")
    return {
        "source": task,
        "prompt": str(entry["question"]).strip(),
        "completion": format_completion(answer, _solution_of(entry)),
        "answer": answer,
        "task": task,
        "task_seed": task_seed,
        "task_size": task_size,
        "task_index": task_index,
        # A JSON string, not a dict: keeps records Arrow/JSONL friendly when
        # sources have different config keys.
        "task_config": json.dumps(dict(task_config), sort_keys=True),
        "entry_id": f"{task}/{task_seed}/{task_index}",
        "split": split,
    }


def _draw(
    source: SourceSpec,
    seed: int,
    n: int,
    split: str,
    exclude: set[str],
    dataset_size: int | None = None,
) -> list[dict[str, Any]]:
    """Draw n examples with seed, skipping questions in `exclude` (and repeats)."""
    import reasoning_gym

    size = dataset_size or n
    try:
        dataset = reasoning_gym.create_dataset(source.name, size=size, seed=seed, **source.config)
    except (TypeError, AssertionError, ValueError) as e:
        raise ValueError(
            f"generator '{source.name}' rejects config {source.config!r}: {e or type(e).__name__}"
        ) from None
    out: list[dict[str, Any]] = []
    seen = set(exclude)
    for idx in range(size):
        if len(out) == n:
            break
        entry = dataset[idx]
        if dataset_size is not None:  # held-out: no repeats of train or of each other
            question = str(entry["question"]).strip()
            if question in seen:
                continue
            seen.add(question)
        out.append(
            make_record(
                entry,
                task=source.name,
                task_seed=seed,
                task_size=size,
                task_index=idx,
                task_config=source.config,
                split=split,
            )
        )
    if len(out) < n:
        raise ValueError(
            f"generator '{source.name}' produced only {len(out)} distinct held-out questions "
            f"of the {n} asked for; lower test_per_source or widen its config"
        )
    return out


def build_default_mixture(spec: MixtureSpec | None = None) -> Mixture:
    """Generate the demo mixture described by `spec` (default: ``MixtureSpec()``).

    Returns ``(train, test_in, test_out)``; every example is a dict with

    * ``source``: generator name, the label CoLM groups by;
    * ``prompt``: the question; ``completion``: the target text, ending in
      ``"Answer: <answer>"``; ``answer``: the gold answer string;
    * ``task``, ``task_seed``, ``task_size``, ``task_index``, ``task_config``
      (JSON string): enough to re-create the generator entry for grading;
    * ``entry_id`` (unique per generator entry) and ``split``.

    Generator seeds are derived from ``spec.seed`` and the generator name.
    reasoning-gym seeds item ``idx`` with ``seed + idx``, so the train items of
    a source use seeds ``[s, s + size)`` and its test items start at
    ``s + size``; test questions that also occur in train are skipped. The
    result depends only on the spec (and the reasoning-gym version).
    """
    spec = spec or MixtureSpec()
    spec.validate()
    train: list[dict[str, Any]] = []
    test_in: list[dict[str, Any]] = []
    test_out: list[dict[str, Any]] = []
    for source in spec.train:
        base = derive_seed(spec.seed, source.name)
        part = _draw(source, base, source.size, "train", set())
        train.extend(part)
        if spec.test_per_source:
            n = spec.test_per_source
            test_in.extend(
                _draw(
                    source,
                    base + source.size,
                    n,
                    "test_in",
                    {r["prompt"] for r in part},
                    dataset_size=n * _DRAW_FACTOR + _DRAW_EXTRA,
                )
            )
    for source in spec.ood:
        base = derive_seed(spec.seed, "ood/" + source.name)
        test_out.extend(
            _draw(
                source,
                base,
                source.size,
                "test_out",
                set(),
                dataset_size=source.size * _DRAW_FACTOR + _DRAW_EXTRA,
            )
        )
    return Mixture(train, test_in, test_out)
