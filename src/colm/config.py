"""Run configuration: typed dataclasses, YAML in and out, ``key=value`` overrides.

Every value is checked before anything heavy (model, data) is loaded; errors
name the key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .integrations.hf_trainer import TRAIN_METHODS
from .selector import SelectorConfig


class ConfigError(ValueError):
    """A configuration value is invalid."""


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelSettings:
    name: str = "smollm2-135m-instruct"  # the packaged default, a local directory, or a hub id
    lora: LoraSettings | None = field(default_factory=LoraSettings)  # None: full fine-tuning


@dataclass
class DataSettings:
    path: str | None = None  # JSONL / CSV / Parquet; None: the built-in mixture
    mixture: dict[str, Any] = field(default_factory=dict)  # MixtureSpec.from_dict overrides
    source_column: str = "source"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    test_path: str | None = None  # held-out user data (loss per source)
    max_length: int = 256
    overflow: str = "truncate"  # or "drop"


@dataclass
class TrainSettings:
    method: str = "colm"  # colm | random | full | accumulate
    steps: int = 30
    source_batch: int = 32  # examples drawn per optimizer step
    micro_batches: int = 2  # micro-batches per step (gradient accumulation)
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 10
    report_to: list[str] = field(default_factory=list)  # e.g. ["tensorboard"], ["wandb"]


@dataclass
class EvalSettings:
    enabled: bool = True
    max_new_tokens: int = 48
    batch_size: int = 16
    limit_per_task: int | None = None  # cap examples per task (None: all)


@dataclass
class RunConfig:
    name: str = "colm"
    output_dir: str = "runs/default"
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    selector: dict[str, Any] = field(default_factory=dict)  # SelectorConfig fields
    eval: EvalSettings = field(default_factory=EvalSettings)

    def selector_config(self) -> SelectorConfig:
        try:
            return SelectorConfig(
                **{**self.selector, "seed": self.selector.get("seed", self.train.seed)}
            )
        except TypeError as e:
            valid = [f.name for f in dataclasses.fields(SelectorConfig)]
            raise ConfigError(f"selector: {e}; valid keys: {valid}") from e
        except ValueError as e:
            raise ConfigError(f"selector: {e}") from e

    def validate(self) -> None:
        t, d = self.train, self.data

        def bad(key, value, valid):
            raise ConfigError(f"{key}={value!r} is invalid; expected {valid}")

        if t.method not in TRAIN_METHODS:
            bad("train.method", t.method, f"one of {TRAIN_METHODS}")
        for key in ("steps", "source_batch", "micro_batches", "logging_steps", "save_steps"):
            v = getattr(t, key)
            if not isinstance(v, int) or v < 1:
                bad(f"train.{key}", v, "an integer >= 1")
        if t.source_batch % t.micro_batches:
            bad(
                "train.source_batch",
                t.source_batch,
                f"a multiple of train.micro_batches ({t.micro_batches})",
            )
        if not (isinstance(t.lr, (int, float)) and t.lr > 0):
            bad("train.lr", t.lr, "a number > 0")
        if not (0 <= t.warmup_ratio < 1):
            bad("train.warmup_ratio", t.warmup_ratio, "a number in [0, 1)")
        if not isinstance(d.max_length, int) or d.max_length < 8:
            bad("data.max_length", d.max_length, "an integer >= 8")
        if d.overflow not in ("truncate", "drop"):
            bad("data.overflow", d.overflow, "'truncate' or 'drop'")
        if d.path is not None and not Path(d.path).exists():
            bad("data.path", d.path, "an existing JSONL / CSV / Parquet file")
        if self.model.lora is not None and self.model.lora.r < 1:
            bad("model.lora.r", self.model.lora.r, "an integer >= 1")
        sel = self.selector_config()
        coreset = sel.coreset_size(t.source_batch)
        if coreset < t.micro_batches:
            bad(
                "selector.ratio",
                sel.ratio,
                f"a coreset ({coreset}) of at least train.micro_batches ({t.micro_batches}) examples",
            )


def _build(cls, data: Any, prefix: str):
    """Dataclass ``cls`` from a mapping, recursively; unknown keys are errors."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)} in {prefix or 'config'}; valid: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = {
            "model": ModelSettings,
            "data": DataSettings,
            "train": TrainSettings,
            "eval": EvalSettings,
            "lora": LoraSettings,
        }.get(name)
        if sub is not None and dataclasses.is_dataclass(sub) and name in fields:
            kwargs[name] = _build(sub, value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults) and apply ``key=value`` overrides
    (values parsed as YAML: ``train.steps=10``, ``selector.feature=exact``)."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=10)")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), yaml.safe_load(raw))
    cfg = _build(RunConfig, tree, "")
    cfg.validate()
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
