"""Pseudo-sources clustered again after a warm-up: the paper's order, warm up, then cluster.

Pseudo-sources (:mod:`colm.data.pseudo_sources`) made from the model as loaded
describe what the base model sees. The paper clusters the hidden states of a model
warmed up on the task instead. With ``CoLMTrainer(..., colm_cluster_after=N)`` the
first ``N`` optimizer steps select with the sources the training set came with (named
sources, or the pseudo-sources of the loaded model), and at the end of step ``N`` the
training set is embedded again with the model as trained so far, clustered (the same
``colm_num_sources``; ``None`` chooses k again) and relabelled; the selector starts
afresh on the new sources (its moments and budgets belong to the old ones).

Every process embeds and clusters the same rows and takes rank 0's labels, so all
agree. Each row gets its index (``colm_row``), which the collator passes on, so that
the selection reads every row's label when the step uses it, not when the loader fetched
it. The new labels go into every later checkpoint (``colm_pseudo_sources.json``)
and are restored on resume before the selector state, so a run resumed after step
``N`` continues with them exactly.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import MutableMapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

CHECKPOINT_FILE = "colm_pseudo_sources.json"
# each training row's index, added to the rows so that a micro-batch collated before the
# switch (data loaders fetch ahead) is read with the labels as they are when it is used
ROW_KEY = "colm_row"


def check_relabelable(dataset: Any, num_workers: int) -> None:
    """Relabelling during training rewrites each row's source in place: the training
    set must be a list of dicts that the data loader reads in this process."""
    if not isinstance(dataset, list) or not all(isinstance(r, MutableMapping) for r in dataset):
        raise ValueError(
            "colm_cluster_after relabels the training rows in place during training, so "
            "train_dataset must be a list of dicts (tokenized rows); got "
            f"{type(dataset).__name__}: pass list(dataset)"
        )
    if num_workers:
        raise ValueError(
            f"colm_cluster_after cannot relabel rows held by {num_workers} data loader worker "
            "processes (they keep their own copy of the data); set dataloader_num_workers=0"
        )


def cluster_now(trainer) -> Any:
    """Embed and cluster the training set with the model as it is now; every process
    returns rank 0's result."""
    from ..data.pseudo_sources import pseudo_sources

    model = trainer.accelerator.unwrap_model(trainer.model)
    result = pseudo_sources(
        model,
        trainer.train_dataset,
        k=trainer.colm_num_sources,
        seed=trainer.args.seed,
        progress=trainer.is_world_process_zero(),
    )
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def apply_labels(trainer, labels: Sequence[str]) -> dict[str, int]:
    """Every training row's source set to its new label; returns the new counts."""
    rows = trainer.train_dataset
    if len(labels) != len(rows):
        raise ValueError(
            f"{len(labels)} pseudo-source labels for {len(rows)} training rows: the "
            "checkpoint was written for other data"
        )
    for row, label in zip(rows, labels):
        row[trainer.source_column] = label
    return dict(Counter(str(x) for x in labels))


def save(folder: str, step: int, result: Any) -> None:
    record = {"step": step, **result.as_dict()}
    with open(os.path.join(folder, CHECKPOINT_FILE), "w") as f:
        json.dump(record, f)


def load(checkpoint: str) -> tuple[int, Any] | None:
    """(step, PseudoSources) saved in ``checkpoint``, or None when it has none."""
    from ..data.pseudo_sources import PseudoSources

    path = os.path.join(checkpoint, CHECKPOINT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return int(record["step"]), PseudoSources.from_dict(record)


class Recluster(TrainerCallback):
    """At the end of optimizer step ``step``: cluster again and switch the sources."""

    def __init__(self, trainer, step: int):
        self.trainer = trainer
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.trainer.colm_warm_sources is None:
            self.trainer._colm_switch_sources(cluster_now(self.trainer), state.global_step)
        return control
