"""Run configuration: typed dataclasses, YAML in and out, ``key=value`` overrides.

Every value is checked before anything heavy (model, data) is loaded; errors
name the key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .features.locate import VALUE_PROJECTIONS
from .integrations.hf_trainer import TRAIN_METHODS
from .selector_config import SelectorConfig


def _world_size() -> int:
    """Processes of a data-parallel launch (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# train.lr_scheduler -> the Trainer's lr_scheduler_type (every one with the warm-up)
LR_SCHEDULERS = {"linear": "linear", "constant": "constant_with_warmup", "cosine": "cosine"}


class ConfigError(ValueError):
    """A configuration value is invalid."""


def _bad(key: str, value: Any, valid: str):
    raise ConfigError(f"{key}={value!r} is invalid; expected {valid}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


# model.dtype: the dtype the model is loaded in; the Trainer trains with mixed precision
# of the same kind (bf16: bf16 autocast; fp16: fp16 autocast with loss scaling)
MODEL_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class ModelSettings:
    name: str = "smollm2-135m-instruct"  # the packaged default, a local directory, or a hub id
    lora: LoraSettings | None = field(default_factory=LoraSettings)  # None: full fine-tuning
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (see MODEL_DTYPES)


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
    # "column": each example's source is in source_column; "auto": pseudo-sources, k-means
    # clusters of the model's hidden states (docs/pseudo_sources.md). Data without the
    # default source column falls back to "auto" with a notice.
    sources: str = "column"
    num_sources: int | None = None  # clusters with sources="auto"; None: found by density (HDBSCAN)
    # sources="auto": a folder shared by runs, where the pseudo-source embeddings are kept
    # under their fingerprint (model, dtype, every example's tokens) and reused by every
    # run on the same data and model (None: only the run directory keeps them)
    embeddings_cache: str | None = None
    # sources="auto": cluster again after this many training steps, with the model as
    # trained so far, and select on those clusters from then on (the paper's order: warm
    # up, then cluster); None: the clusters of the model as loaded, throughout
    cluster_after: int | None = None


@dataclass
class TrainSettings:
    method: str = "colm"  # colm | random | full | accumulate
    steps: int = 30
    source_batch: int = 32  # examples drawn per optimizer step
    micro_batches: int = 2  # micro-batches per step (gradient accumulation)
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    lr_scheduler: str = "linear"  # linear | constant | cosine (after the warm-up)
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    weight_decay: float = 0.0
    seed: int = 0
    logging_steps: int = 1
    save_steps: int = 10
    report_to: list[str] = field(default_factory=list)  # e.g. ["tensorboard"], ["wandb"]
    # a DeepSpeed JSON config (e.g. configs/deepspeed_zero3.json) for the Trainer: ZeRO-1/2
    # shard optimizer state and gradients, ZeRO-3 the parameters too (None: no DeepSpeed)
    deepspeed: str | None = None


@dataclass
class EvalSettings:
    enabled: bool = True
    max_new_tokens: int = 48
    batch_size: int = 16
    limit_per_task: int | None = None  # cap examples per task (None: all)
    max_length: int | None = None  # tokens per held-out example (None: data.max_length)
    generate: bool = True  # generation accuracy at the end (built-in mixture only)
    every: int = 0  # held-out loss every N steps during training (0: only at the end)
    at_start: bool = False  # held-out loss of the untrained model, before step 1


def deepspeed_stage(path: object) -> int:
    """The ZeRO stage of the DeepSpeed config file ``path`` (0 when it sets none);
    a missing or unreadable file, or DeepSpeed not installed, is a ConfigError."""
    import importlib.util
    import json

    if not isinstance(path, str) or not Path(path).is_file():
        _bad("train.deepspeed", path, "the path of a DeepSpeed JSON config file, or null")
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        _bad("train.deepspeed", path, f"a readable JSON file ({e})")
    stage = (ds.get("zero_optimization") or {}).get("stage", 0) if isinstance(ds, dict) else None
    if stage not in (0, 1, 2, 3):
        _bad("train.deepspeed", path, "a DeepSpeed config whose zero_optimization.stage is 0-3")
    if importlib.util.find_spec("deepspeed") is None:
        _bad(
            "train.deepspeed",
            path,
            "set only where DeepSpeed is installed (pip install deepspeed); leave it null "
            "to train without it",
        )
    return stage


def eval_max_length(cfg: RunConfig) -> int:
    """Tokens per held-out example: eval.max_length, else data.max_length."""
    return cfg.eval.max_length or cfg.data.max_length


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
        sel = self.selector
        if not isinstance(sel, Mapping):
            _bad("selector", sel, "a mapping of SelectorConfig fields")
        # values whose wrong type SelectorConfig would report confusingly
        if "ratio" in sel and not _is_number(sel["ratio"]):
            _bad("selector.ratio", sel["ratio"], "a number in (0, 1]")
        fields = {k: v for k, v in sel.items() if k != "preset"}
        fields["seed"] = sel.get("seed", self.train.seed)
        try:
            if "preset" in sel:
                return SelectorConfig.preset(sel["preset"], **fields)
            return SelectorConfig(**fields)
        except TypeError as e:
            valid = [f.name for f in dataclasses.fields(SelectorConfig)]
            raise ConfigError(f"selector: {e}; valid keys: {valid}") from e
        except ValueError as e:
            # "SelectorConfig.ratio=0 is invalid; ..." -> "selector.ratio: SelectorConfig.ratio=0 ..."
            m = re.match(r"SelectorConfig\.(\w+)=", str(e))
            where = f"selector.{m.group(1)}" if m else "selector"
            raise ConfigError(f"{where}: {e}") from e

    def _validate_cluster_after(self) -> None:
        d, t = self.data, self.train
        if not _is_int(d.cluster_after) or not 1 <= d.cluster_after < t.steps:
            _bad(
                "data.cluster_after",
                d.cluster_after,
                f"an integer from 1 to train.steps - 1 ({t.steps - 1}): the training steps "
                "after which the data is clustered again; or null (never)",
            )
        if t.method not in ("colm", "random"):
            _bad(
                "data.cluster_after",
                d.cluster_after,
                f"null with train.method={t.method!r}, which selects nothing (the new clusters "
                "are only used by selection)",
            )
        if t.deepspeed is not None and deepspeed_stage(t.deepspeed) == 3:
            _bad(
                "data.cluster_after",
                d.cluster_after,
                "null under DeepSpeed ZeRO-3 (embedding the data again stops each forward "
                "pass inside the partitioned model)",
            )

    def validate(self) -> None:
        """Check every value that can be checked without the data or the model."""
        t, d = self.train, self.data
        bad = _bad

        if t.method not in TRAIN_METHODS:
            bad("train.method", t.method, f"one of {TRAIN_METHODS}")
        for key in ("steps", "source_batch", "micro_batches", "logging_steps", "save_steps"):
            v = getattr(t, key)
            if not _is_int(v) or v < 1:
                bad(f"train.{key}", v, "an integer >= 1")
        if t.micro_batches > t.source_batch:
            bad(
                "train.micro_batches",
                t.micro_batches,
                f"at most train.source_batch ({t.source_batch}): each micro-batch needs examples",
            )
        world = _world_size()
        if t.source_batch % (t.micro_batches * world):
            bad(
                "train.source_batch",
                t.source_batch,
                f"a multiple of train.micro_batches ({t.micro_batches})"
                + (f" x {world} processes" if world > 1 else ""),
            )
        if not (_is_number(t.lr) and t.lr > 0):
            bad("train.lr", t.lr, "a number > 0")
        if not (_is_number(t.warmup_ratio) and 0 <= t.warmup_ratio < 1):
            bad("train.warmup_ratio", t.warmup_ratio, "a number in [0, 1)")
        if t.lr_scheduler not in LR_SCHEDULERS:
            bad("train.lr_scheduler", t.lr_scheduler, f"one of {tuple(LR_SCHEDULERS)}")
        if not (_is_number(t.adam_beta2) and 0 < t.adam_beta2 < 1):
            bad("train.adam_beta2", t.adam_beta2, "a number in (0, 1), e.g. 0.999")
        e = self.eval
        if t.deepspeed is not None:
            deepspeed_stage(t.deepspeed)  # the file is there, readable, with a stage
        if not _is_int(e.every) or e.every < 0:
            bad("eval.every", e.every, "an integer >= 0 (steps between held-out evaluations)")
        if e.max_length is not None and (not _is_int(e.max_length) or e.max_length < 8):
            bad("eval.max_length", e.max_length, "an integer >= 8 or null (data.max_length)")
        for key in ("enabled", "generate", "at_start"):
            if not isinstance(getattr(e, key), bool):
                bad(f"eval.{key}", getattr(e, key), "true or false")
        if e.limit_per_task is not None and (not _is_int(e.limit_per_task) or e.limit_per_task < 1):
            bad("eval.limit_per_task", e.limit_per_task, "an integer >= 1 or null (all)")
        if not _is_int(d.max_length) or d.max_length < 8:
            bad("data.max_length", d.max_length, "an integer >= 8")
        if d.overflow not in ("truncate", "drop"):
            bad("data.overflow", d.overflow, "'truncate' or 'drop'")
        if d.path is not None and not Path(d.path).exists():
            bad("data.path", d.path, "an existing JSONL / CSV / Parquet file")
        if not isinstance(d.source_column, str) or not d.source_column:
            bad("data.source_column", d.source_column, "the name of the column holding the source")
        if d.sources not in ("column", "auto"):
            bad(
                "data.sources",
                d.sources,
                "'column' (labels in data.source_column) or 'auto' (pseudo-sources: clusters "
                "of the model's hidden states)",
            )
        if d.num_sources is not None and (not _is_int(d.num_sources) or d.num_sources < 1):
            bad(
                "data.num_sources",
                d.num_sources,
                "an integer >= 1 (clusters used as sources with data.sources=auto) or null "
                "(chosen automatically)",
            )
        if d.embeddings_cache is not None and (
            not isinstance(d.embeddings_cache, str)
            or not d.embeddings_cache
            or (Path(d.embeddings_cache).exists() and not Path(d.embeddings_cache).is_dir())
        ):
            bad(
                "data.embeddings_cache",
                d.embeddings_cache,
                "a folder (created if missing) shared by runs for the pseudo-source "
                "embeddings, or null",
            )
        if d.cluster_after is not None:
            self._validate_cluster_after()
        self._validate_lora()
        self._validate_dtype()

        sel = self.selector_config()
        if sel.size is not None and sel.size > t.source_batch:
            bad(
                "selector.size",
                sel.size,
                f"a coreset size <= train.source_batch ({t.source_batch}), the batch it is "
                "picked from (or null to use selector.ratio)",
            )
        coreset = sel.coreset_size(t.source_batch)
        if coreset < t.micro_batches:
            key = "selector.size" if sel.size is not None else "selector.ratio"
            bad(
                key,
                sel.size if sel.size is not None else sel.ratio,
                f"a coreset ({coreset}) of at least train.micro_batches ({t.micro_batches}) examples",
            )
        if t.method in ("colm", "random") and coreset % world:
            key = "selector.size" if sel.size is not None else "selector.ratio"
            bad(
                key,
                sel.size if sel.size is not None else sel.ratio,
                f"a coreset ({coreset} examples) that is a multiple of the {world} processes, "
                "so that every process trains on an equal share",
            )
        small = sel.small_sources
        if isinstance(small, numbers.Real):
            if isinstance(small, bool) or not _is_number(small) or small <= 0:
                bad(
                    "selector.small_sources",
                    small,
                    "'below_mean', a number c > 0 (small: count < total / c), or a list of "
                    "source names",
                )
        elif not isinstance(small, str) and (
            not isinstance(small, (list, tuple)) or not all(isinstance(x, str) for x in small)
        ):
            bad(
                "selector.small_sources",
                small,
                "'below_mean', a number c > 0, or a list of source names (strings)",
            )

    def _validate_dtype(self) -> None:
        dtype = self.model.dtype
        if dtype not in MODEL_DTYPES:
            _bad(
                "model.dtype", dtype, f"one of {list(MODEL_DTYPES)}, the dtype to load the model in"
            )
        if dtype == "fp16" and self.model.lora is None:
            # the Trainer's fp16 loss scaling refuses fp16 gradients ("Attempting to unscale
            # FP16 gradients"); with LoRA, PEFT keeps the trained adapters in fp32
            _bad(
                "model.dtype",
                dtype,
                "'bf16' or 'fp32' for full fine-tuning (model.lora: null): fp16 loss scaling "
                "needs fp32 trainable weights, which an fp16 model does not have; or keep "
                "model.dtype=fp16 with LoRA (its adapters are trained in fp32)",
            )

    def _validate_lora(self) -> None:
        lo = self.model.lora
        if lo is None:
            return
        if not _is_int(lo.r) or lo.r < 1:
            _bad("model.lora.r", lo.r, "an integer >= 1")
        targets = lo.targets
        if (
            not isinstance(targets, list)
            or not targets
            or not all(isinstance(x, str) and x for x in targets)
        ):
            _bad("model.lora.targets", targets, "a non-empty list of module names, e.g. ['v_proj']")
        # colm's features are gradients of the last block's value projection (its LoRA B
        # matrix with LoRA); PEFT matches a target by the end of the module's name
        if self.train.method == "colm" and "all-linear" not in targets:
            names = {x.rsplit(".", 1)[-1] for x in targets}
            if not names & set(VALUE_PROJECTIONS):
                _bad(
                    "model.lora.targets",
                    targets,
                    "a list that includes the value projection, whose LoRA gradient "
                    "train.method='colm' uses as the selection feature: one of "
                    f"{list(VALUE_PROJECTIONS)} (e.g. 'v_proj' for Llama/SmolLM2, 'c_attn' "
                    "for GPT-2, 'qkv_proj' for Phi-3, 'query_key_value' for GPT-NeoX)",
                )

    def validate_data(self, source_counts: Mapping[str, int]) -> None:
        """Checks that need the training data (examples per source), made right after
        loading it and before the model is loaded."""
        small = self.selector.get("small_sources") if isinstance(self.selector, Mapping) else None
        if isinstance(small, (list, tuple)):
            unknown = sorted(set(small) - set(source_counts))
            if unknown:
                _bad(
                    "selector.small_sources",
                    list(small),
                    f"names of sources in the training data {sorted(source_counts)}; "
                    f"not in the data: {unknown}",
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
