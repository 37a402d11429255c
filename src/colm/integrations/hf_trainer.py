"""Coreset mini-batches inside an unmodified Hugging Face ``Trainer`` / TRL ``SFTTrainer``.

The mixin hooks the one place where the Trainer fetches an optimizer step's
micro-batches (``get_batch_samples``): it merges them into the source batch,
selects the coreset, and re-packs it into the same number of micro-batches, so
the optimizer-step cadence, gradient accumulation, schedulers, callbacks,
logging and checkpointing of the Trainer all stay as they are.

    trainer = CoLMTrainer(model=model, args=args, train_dataset=ds,
                          data_collator=CoLMCollator(tokenizer),
                          colm_config=SelectorConfig(ratio=0.5))

The per-step batch of the Trainer (``per_device_train_batch_size x
gradient_accumulation_steps``) is the source batch; the coreset is
``ratio`` of it. Methods (``colm_method``):

- ``"colm"``: the selector (default);
- ``"random"``: a uniform random subset of the coreset's size;
- ``"full"``: the whole source batch (plain training);
- ``"accumulate"``: the whole source batch, each micro-batch run in pieces of the
  coreset's micro-batch size (memory-equal baseline).

Data parallelism (``torchrun`` / ``accelerate launch``, DDP and DeepSpeed
ZeRO-1/2/3): the source batch is global, ``per_device_train_batch_size x
gradient_accumulation_steps x processes`` examples, as in plain HF training.
For ``colm`` and ``random`` the training data loader is not sharded: every
rank loads the same global micro-batches, computes features for its share,
and all agree on one coreset (:mod:`colm.distributed`); each rank then trains
on an equal share of it. The coreset must be a multiple of the number of
processes. Under ZeRO-3 the selections that compute gradient features gather only
the last block, final norm and head for their replay (:mod:`colm.sharding`). FSDP is
refused in the Trainer for those selections (see :func:`_refuse_sharded_parameters`
for why), not for the default ``random_big``; FSDP2 works with features in the plain
loop (:mod:`colm.integrations.loop`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch

from ..selector import CoresetSelector, SelectorConfig
from . import batching, recluster

TRAIN_METHODS = ("colm", "random", "full", "accumulate")
WEIGHT_KEY = "colm_weight"
SELECTOR_FILE = "colm_selector.pt"
COMPLETE_MARKER = "colm_complete"


class KeepSourceCollator:
    """Wraps a collator so that the per-example ``source`` survives collation."""

    def __init__(self, inner, source_column: str = "source"):
        self.inner = inner
        self.source_column = source_column

    def __call__(self, features):
        if features and isinstance(features[0], Mapping) and self.source_column in features[0]:
            sources = [str(f[self.source_column]) for f in features]
            rows = (
                [f[recluster.ROW_KEY] for f in features]
                if recluster.ROW_KEY in features[0]
                else None
            )
            drop = (self.source_column, recluster.ROW_KEY)
            features = [{k: v for k, v in f.items() if k not in drop} for f in features]
            batch = self.inner(features)
            batch["source"] = sources
            if rows is not None:  # colm_cluster_after: the rows, to read their labels late
                batch[recluster.ROW_KEY] = rows
            return batch
        return self.inner(features)

    def __getattr__(self, name):  # padding_free, pad_token_id, ... of the wrapped collator
        return getattr(self.inner, name)


def _dataset_source_counts(dataset, column: str) -> dict[str, int]:
    if dataset is None:
        raise ValueError("a train_dataset is needed to count examples per source")
    if hasattr(dataset, "column_names"):
        if column not in dataset.column_names:
            raise ValueError(
                f"the training dataset has no {column!r} column (columns: {dataset.column_names}); "
                "colm needs the source of every example"
            )
        values = dataset[column]
    else:
        try:
            values = [ex[column] for ex in dataset]
        except (KeyError, TypeError) as e:
            raise ValueError(f"every training example needs a {column!r} entry") from e
    return dict(Counter(str(v) for v in values))


class CoLMTrainerMixin:
    """Mix into ``transformers.Trainer`` or ``trl.SFTTrainer`` (before it in the bases).

    Keyword arguments (besides the Trainer's own):
        colm_config: a :class:`SelectorConfig` (default: the paper's).
        colm_method: ``"colm"``, ``"random"``, ``"full"`` or ``"accumulate"``.
        source_counts: examples per source in the training set (default: counted
            from ``train_dataset``'s ``source_column``).
        source_column: name of the per-example source column; None for data without
            source labels: pseudo-sources (k-means clusters of the model's hidden
            states, :mod:`colm.data.pseudo_sources`) are computed on ``train_dataset``
            and stored in its ``source`` column (the result in ``colm_pseudo_sources``).
        colm_num_sources: clusters with ``source_column=None`` (None: found by density clustering).
        colm_cluster_after: cluster the training set again after this many optimizer
            steps, with the model as trained so far, and select on those clusters from
            then on (the paper's order: warm up, then cluster;
            :mod:`colm.integrations.recluster`). The training set must be a list of
            dicts; the result is in ``colm_warm_sources``. None (default): never.
    """

    def __init__(
        self,
        *args,
        colm_config: SelectorConfig | None = None,
        colm_method: str = "colm",
        source_counts: Mapping[str, int] | None = None,
        source_column: str | None = "source",
        colm_num_sources: int | None = None,
        colm_cluster_after: int | None = None,
        **kwargs,
    ):
        if colm_method not in TRAIN_METHODS:
            raise ValueError(
                f"colm_method={colm_method!r} is invalid; expected one of {TRAIN_METHODS}"
            )
        train_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        for flag in ("packing", "padding_free"):
            if getattr(train_args, flag, False):
                raise ValueError(
                    f"{flag}=True merges several examples into one sequence, but coreset selection "
                    f"picks whole examples; set {flag}=False in your SFTConfig"
                )
        super().__init__(*args, **kwargs)
        self.colm_method = colm_method
        self.colm_config = colm_config or SelectorConfig()
        self.colm_pseudo_sources = None
        self.colm_num_sources = colm_num_sources
        self.colm_warm_sources = None  # (step, PseudoSources) once clustered again
        self.colm_cluster_after = colm_cluster_after
        if source_column is None:  # the tokenized training set, clustered by the model
            from ..data.pseudo_sources import with_pseudo_sources

            source_column = "source"
            self.train_dataset, self.colm_pseudo_sources = with_pseudo_sources(
                self.model, self.train_dataset, k=colm_num_sources, seed=self.args.seed
            )
        self.source_column = source_column
        if source_counts is None:
            source_counts = _dataset_source_counts(self.train_dataset, source_column)
        self.colm_source_counts = dict(source_counts)
        self.colm_selector: CoresetSelector | None = None
        if colm_method in ("colm", "random"):
            cfg = self.colm_config
            if colm_method == "random":
                cfg = dataclasses.replace(cfg, method="random")
            world = self.accelerator.num_processes
            ga = self.args.gradient_accumulation_steps
            source = self.args.per_device_train_batch_size * ga * world
            coreset = cfg.coreset_size(source)
            if coreset % world:
                raise ValueError(
                    f"the coreset of {coreset} examples (global source batch {source} = "
                    f"per_device_train_batch_size x gradient_accumulation_steps x {world} "
                    f"processes) cannot be split equally over {world} processes; choose the "
                    f"selector's ratio or size so that the coreset is a multiple of {world}"
                )
            if colm_method == "colm" and cfg.method in ("colm", "match"):
                # gradient features replay the last block; random_big reads no parameters
                _refuse_sharded_parameters(self)
            if cfg.chunk_size is None:
                # replay chunks no larger than a training micro-batch of the coreset, so that
                # selection never needs more memory than the training step
                cfg = dataclasses.replace(cfg, chunk_size=math.ceil(coreset / world / ga))
            self._colm_selector_config = cfg
            self.colm_selector = CoresetSelector(cfg, self.colm_source_counts)
        if colm_cluster_after is not None:
            self._colm_setup_recluster(colm_cluster_after)
        if getattr(self.data_collator, "padding_free", False):
            raise ValueError(
                "the data collator is padding-free (examples merged into one row); "
                "coreset selection needs one example per row: use padding_free=False"
            )
        self.data_collator = KeepSourceCollator(self.data_collator, source_column)
        self._colm_weighted = colm_method == "colm" and self.colm_config.weights == "cluster"
        if self._colm_weighted:
            # our weighted loss is already divided by the step's weighted token count
            self.loss_is_scaled_for_ga = True
        self._colm_log: list[dict[str, float]] = []
        self._colm_sub_batch: int | None = None

    # -- clustering again after a warm-up ----------------------------------------------
    def _colm_setup_recluster(self, step: object) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"colm_cluster_after={step!r} is invalid; expected an integer >= 1")
        if 0 < self.args.max_steps <= step:
            raise ValueError(
                f"colm_cluster_after={step} is not before the last step (max_steps="
                f"{self.args.max_steps}): the new clusters would never be used"
            )
        if self.colm_selector is None:
            raise ValueError(
                f"colm_cluster_after changes the sources that selection uses; colm_method="
                f"{self.colm_method!r} selects nothing"
            )
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
            raise ValueError(
                "colm_cluster_after is not supported under DeepSpeed ZeRO-3: embedding the "
                "training set stops each forward pass inside the partitioned model"
            )
        recluster.check_relabelable(self.train_dataset, self.args.dataloader_num_workers)
        for i, row in enumerate(self.train_dataset):
            row[recluster.ROW_KEY] = i
        self.add_callback(recluster.Recluster(self, step))

    def _colm_switch_sources(self, result, step: int) -> None:
        """Relabel the training rows with ``result`` (clustered after ``step`` steps) and
        start the selector afresh on the new sources."""
        self.colm_source_counts = recluster.apply_labels(self, result.labels)
        self.colm_selector = CoresetSelector(self._colm_selector_config, self.colm_source_counts)
        self.colm_warm_sources = (step, result)

    # -- keep the source column ------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if (
            self._signature_columns is not None
            and self.source_column not in self._signature_columns
        ):
            self._signature_columns = [*self._signature_columns, self.source_column]

    # -- data parallelism: every rank loads the global source batch ---------------
    def get_train_dataloader(self):
        world = self.accelerator.num_processes
        if self.colm_method not in ("colm", "random") or world == 1:
            return super().get_train_dataloader()
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            raise ValueError(
                "coreset selection over several processes needs a map-style training dataset "
                "(every rank loads the same global batches); got an IterableDataset"
            )
        saved = self._train_batch_size
        self._train_batch_size = saved * world
        try:
            loader = super().get_train_dataloader()
        finally:
            self._train_batch_size = saved
        shard = getattr(loader, "batch_sampler", None)
        if shard is None or not hasattr(shard, "num_processes"):
            raise ValueError(
                "coreset selection over several processes needs accelerate's sharded batch "
                "sampler (dispatch_batches=False, the default); got "
                f"{type(loader).__name__} with {type(shard).__name__}"
            )
        # as transformers does for its rank-aware samplers: a pass-through shard, so that
        # every rank iterates the same global micro-batches (the sampler's seed is shared)
        shard.num_processes = 1
        shard.process_index = 0
        return loader

    # -- the hook: one optimizer step's micro-batches ----------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, num_items
        for b in batch_samples:
            if recluster.ROW_KEY in b:
                # the labels as they are now: a micro-batch may have been collated (loaders
                # fetch ahead) before the training set was clustered again
                col = self.source_column
                b["source"] = [str(self.train_dataset[i][col]) for i in b.pop(recluster.ROW_KEY)]
            batching.check_not_packed(b)
            if "source" not in b:
                raise ValueError(
                    "a training batch has no 'source' entry: keep the source column in the "
                    "dataset (it is added to the Trainer's signature columns automatically)"
                )
        n_micro = len(batch_samples)
        source_batch = sum(len(b["source"]) for b in batch_samples)
        coreset = self.colm_config.coreset_size(source_batch)
        if self.colm_method in ("full", "accumulate"):
            self._colm_sub_batch = math.ceil(coreset / n_micro)
            in_batch = Counter(s for b in batch_samples for s in b["source"])
            self._colm_log.append({f"colm/{s}/in_batch": float(c) for s, c in in_batch.items()})
            return [self._strip(b) for b in batch_samples], num_items

        merged = batching.merge(batch_samples, self._pad_id())
        model = self.accelerator.unwrap_model(self.model)
        selection = self.colm_selector.select(model, merged, optimizer=self.optimizer)
        # this rank's equal share of the coreset (all of it on one process)
        indices, weights = selection.shard(
            self.accelerator.process_index, self.accelerator.num_processes
        )
        chosen = batching.take(merged, indices)
        if self._colm_weighted:
            chosen[WEIGHT_KEY] = weights.to(merged["input_ids"].device)
        new_samples = [self._strip(b) for b in batching.split(chosen, n_micro)]
        if self._colm_weighted:
            num_items = self._weighted_items(new_samples, device)
        else:
            num_items = self._get_num_items_in_batch(new_samples, device)
        self._colm_log.append(selection.flat_stats())
        return new_samples, num_items

    def _strip(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k != "source"}

    def _pad_id(self) -> int:
        pc = getattr(self, "processing_class", None)
        pad = getattr(pc, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.data_collator, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _weighted_items(self, samples, device) -> torch.Tensor:
        total = sum((batching.label_tokens(b).float() * b[WEIGHT_KEY]).sum() for b in samples)
        total = torch.as_tensor(total, device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            total = self.accelerator.gather(total[None]).sum()
        return total

    # -- loss with per-example weights ---------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "source"}
        weights = inputs.pop(WEIGHT_KEY, None)
        if weights is None:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        if num_items_in_batch is None:
            num_items_in_batch = (batching.label_tokens({"labels": labels}) * weights).sum()
        loss = batching.weighted_token_loss(outputs.logits, labels, weights, num_items_in_batch)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    # -- accumulate: each micro-batch in pieces of the coreset's micro-batch size ----
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.colm_method != "accumulate" or not self._colm_sub_batch:
            return super().training_step(model, inputs, num_items_in_batch)
        n = len(inputs["input_ids"])
        pieces = torch.arange(n).split(self._colm_sub_batch)
        saved = self.current_gradient_accumulation_steps
        # a per-piece mean loss must be divided by pieces x micro-batches
        self.current_gradient_accumulation_steps = saved * len(pieces)
        try:
            total = None
            for idx in pieces:
                piece = batching.take(inputs, idx)
                loss = super().training_step(model, piece, num_items_in_batch)
                total = loss if total is None else total + loss
        finally:
            self.current_gradient_accumulation_steps = saved
        return total

    # -- logging -------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._colm_log and "loss" in logs:
            # mean per optimizer step since the last log (a source absent in a step counts 0)
            keys = sorted({k for entry in self._colm_log for k in entry})
            for k in keys:
                logs[k] = sum(e.get(k, 0.0) for e in self._colm_log) / len(self._colm_log)
            self._colm_log = []
        super().log(logs, *args, **kwargs)

    # -- selector state in checkpoints -----------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        if self.args.should_save:
            if self.colm_selector is not None:
                torch.save(self.colm_selector.state_dict(), os.path.join(folder, SELECTOR_FILE))
            if self.colm_warm_sources is not None:
                recluster.save(folder, *self.colm_warm_sources)
            # fault injection for tests: die while the checkpoint is incomplete
            if os.environ.get("COLM_FAULT_SIGKILL_IN_SAVE") == str(self.state.global_step):
                os.kill(os.getpid(), 9)
            # written last: a checkpoint without it was interrupted and is never resumed from
            with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
                f.write(str(self.state.global_step))
                f.flush()
                os.fsync(f.fileno())

    def _load_optimizer_and_scheduler(self, checkpoint):
        # the Trainer calls this on every resume, with or without DeepSpeed / FSDP
        # (_load_from_checkpoint is skipped under DeepSpeed, and also loads best models)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        warm = recluster.load(checkpoint)
        if warm is not None:  # clustered again before this checkpoint: the same sources
            if self.colm_cluster_after != warm[0]:
                raise ValueError(
                    f"{checkpoint} was written after the training set was clustered again at "
                    f"step {warm[0]} (colm_cluster_after={warm[0]}); resume with the same "
                    f"colm_cluster_after, not {self.colm_cluster_after}"
                )
            self._colm_switch_sources(warm[1], warm[0])
        path = os.path.join(checkpoint, SELECTOR_FILE)
        if self.colm_selector is not None and os.path.exists(path):
            self.colm_selector.load_state_dict(load_selector_state(path))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint in {self.args.output_dir} to resume from")
        return super().train(resume_from_checkpoint, *args, **kwargs)


def load_selector_state(path: str | os.PathLike) -> dict[str, Any]:
    """A saved selector state, read as data only (tensors and plain values,
    ``torch.load(weights_only=True)``): a checkpoint from elsewhere cannot run code."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} is not a selector state colm can read safely: it holds objects other than "
            "tensors and plain values, and colm never runs code from a checkpoint. Resume from "
            "a checkpoint colm wrote, or delete this file to resume without the selector state "
            f"(moments and random generator start afresh). ({str(e).splitlines()[0]})"
        ) from None


def _refuse_sharded_parameters(trainer) -> None:
    """Refuse FSDP under ``colm_method="colm"`` with gradient features (selector method
    ``colm`` or ``match``) in the Trainer, saying why and what works. DeepSpeed passes:
    ZeRO-1/2 shard only optimizer state and gradients, which selection never reads, and
    under ZeRO-3 the selection gathers the last block, final norm and head for its
    replay (:mod:`colm.sharding`). The default selection, ``random_big``, reads no
    parameters and is not checked.

    FSDP: accelerate wraps the model in FSDP1 unless told ``fsdp_version=2``, whose
    flat parameter buffers colm does not gather; and accelerate runs FSDP only on GPUs
    and other accelerators (on a CPU it ignores the FSDP plugin and trains with DDP),
    so the Trainer under FSDP2 cannot be tested here and is refused too."""
    works = (
        "What works: DeepSpeed ZeRO-3 (or ZeRO-1/2) in the Trainer, which shards the model "
        "as FSDP does and under which colm gathers only the last block, final norm and head "
        "for selection (tested on 2 processes, tests/integrations/test_deepspeed.py); FSDP2 "
        "(torch.distributed.fsdp.fully_shard on each decoder layer and the model) with the "
        "plain loop colm.integrations.loop.coreset_step (tests/integrations/test_fsdp.py); or, "
        "with any sharding, the default selection SelectorConfig(method='random_big'), "
        "which computes no features"
    )
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "colm feature selection does not support FSDP in CoLMTrainer: accelerate's "
            "default FSDP1 keeps parameters in flat buffers that colm does not gather for the "
            "replay of the last block, and the Trainer under FSDP2 is untested because "
            "accelerate runs FSDP only on GPUs (on a CPU it ignores the FSDP plugin). " + works
        )


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` whose writing finished (has the marker)."""
    if not os.path.isdir(folder):
        return None
    steps = []
    for name in os.listdir(folder):
        prefix, _, step = name.rpartition("-")
        path = os.path.join(folder, name)
        if (
            prefix == "checkpoint"
            and step.isdigit()
            and os.path.exists(os.path.join(path, COMPLETE_MARKER))
        ):
            steps.append((int(step), path))
    return max(steps)[1] if steps else None


@functools.cache
def _make(base, name):
    return type(name, (CoLMTrainerMixin, base), {"__doc__": f"{base.__name__} with CoLM coresets."})


def __getattr__(name):
    # the ready classes are built on first use so that importing colm does not import trl
    if name == "CoLMTrainer":
        from transformers import Trainer

        return _make(Trainer, "CoLMTrainer")
    if name == "CoLMSFTTrainer":
        from trl import SFTTrainer

        return _make(SFTTrainer, "CoLMSFTTrainer")
    raise AttributeError(name)
