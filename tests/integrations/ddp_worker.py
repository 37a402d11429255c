"""One process of a data-parallel run, started by ``torch.distributed.run`` from
tests/integrations/test_distributed.py (gloo on CPU, tiny Llama + LoRA).

Every rank writes ``<out>/rank<r>.json``: the examples selected at each step
(as token lists, so runs with different process counts can be compared), the
selection stats, the per-step losses, and (rank 0) the final LoRA weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from colm import CoresetSelector, SelectorConfig  # noqa: E402
from colm.distributed import end_process_group  # noqa: E402
from tests.conftest import collate_rows, make_batch, make_rows, make_tiny  # noqa: E402

SOURCES = {"big1": 28, "big2": 20, "small1": 10, "small2": 6}


def _sources(n: int, seed: int) -> list[str]:
    names = [s for s, c in SOURCES.items() for _ in range(c)]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed))
    return [names[int(i)] for i in order[:n]]


def _rows(n: int, seed: int) -> list[dict]:
    return make_rows(n=n, max_len=12, min_len=4, seed=seed, sources=_sources(n, seed))


def _model():
    model = make_tiny("llama", lora=True, seed=0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # dropout masks come from each rank's own RNG
    return model


def _record(selector: CoresetSelector, log: list) -> None:
    """Keep every step's selected examples (token lists) and stats."""
    inner = selector.select

    def select(model, batch, **kw):
        sel = inner(model, batch, **kw)
        ids, am = batch["input_ids"], batch["attention_mask"]
        picked = [ids[i][am[i].bool()].tolist() for i in sel.indices.tolist()]
        replay = getattr(selector._features, "replay", None)
        gathered = replay.gathered_bytes if replay is not None else 0  # sharded: ZeRO-3
        log.append(
            {"picked": picked, "weights": sel.weights.tolist(), "stats": sel.stats,
             "gathered_bytes": gathered}
        )  # fmt: skip
        return sel

    selector.select = select


def _lora(model) -> dict[str, list]:
    return {
        n.replace("module.", ""): p.detach().flatten().tolist()
        for n, p in model.named_parameters()
        if "lora_" in n
    }


def _selector_config(a) -> SelectorConfig:
    if a.selection == "random_big":  # no features: the feature settings stay at defaults
        return SelectorConfig(
            method="random_big", ratio=0.5, small_sources=["small1", "small2"], seed=3
        )
    return SelectorConfig(
        method=a.selection,
        ratio=0.5,
        feature=a.feature,
        num_directions=2,
        small_sources=["small1", "small2"],
        weights=a.weights,
        moments=a.moments,
        seed=3,
    )


def _lora_params(model) -> dict[str, list]:
    """Like :func:`_lora`, with DeepSpeed ZeRO-3's partitioned parameters gathered whole."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    if not any(hasattr(p, "ds_id") for p in params):
        return _lora(model)
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        return _lora(model)


def run_trainer(a, rank: int, world: int) -> dict:
    from datasets import Dataset
    from transformers import TrainingArguments

    from colm.integrations.hf_trainer import CoLMTrainer

    model = _model()
    ds = Dataset.from_list(_rows(64, seed=1))
    args = TrainingArguments(
        output_dir=a.out + "/trainer",
        per_device_train_batch_size=a.micro // world,
        gradient_accumulation_steps=2,
        max_steps=a.steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        dataloader_drop_last=True,
    )
    cfg = _selector_config(a)
    trainer = CoLMTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=collate_rows,
        colm_config=cfg,
        colm_method=a.method,
    )
    log: list = []
    if trainer.colm_selector is not None:
        _record(trainer.colm_selector, log)
    trainer.train(resume_from_checkpoint=a.resume or None)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"steps": log, "losses": losses, "lora": _lora_params(trainer.model)}


def run_loop(a, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    from colm.integrations.loop import coreset_step

    model = _model()
    ddp = DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    small = ["small1", "small2"]
    counts = dict(SOURCES)
    cfg = SelectorConfig(
        method="colm",
        ratio=0.5,
        size=a.coreset or None,
        feature=a.feature,
        num_directions=2,
        # one example per replay chunk: each rank computes only its share of the rows, and
        # a BLAS call's rounding can depend on how many rows it gets; with one row per call
        # the features are bitwise those of one process, so the picks can be compared
        chunk_size=1,
        max_feature_mb=a.max_feature_mb,
        small_sources=small,
        weights=a.weights,
        moments=a.moments,
        seed=3,
    )
    selector = CoresetSelector(cfg, counts)
    log: list = []
    _record(selector, log)
    losses = []
    for step in range(a.steps):
        if a.case == "edge" and step % 2 == 0:
            # 12 small-source examples for a coreset of 6: only small sources survive
            names = ["small1"] * 7 + ["small2"] * 5 + ["big1"] * 4
        elif a.case == "edge":
            # 2 big-source examples need features; with 3 processes one rank computes none
            names = ["big1"] * 2 + ["small1"] * 3 + ["small2"] * 2
        else:
            names = _sources(a.micro * 2, seed=100 + step)
        seed = 100 + step + (rank if a.case == "mismatch" else 0)
        batch = make_batch(n=len(names), max_len=12, min_len=4, seed=seed, sources=names)
        out = coreset_step(ddp, opt, selector, batch, micro_batches=2, max_grad_norm=1.0)
        losses.append(out.loss)
    return {"steps": log, "losses": losses, "lora": _lora(model)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["trainer", "loop"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro", type=int, default=8, help="global micro-batch size")
    p.add_argument("--method", default="colm", help="colm_method (train method)")
    p.add_argument("--selection", default="colm", help="SelectorConfig.method")
    p.add_argument("--feature", default="zo")
    p.add_argument("--weights", default="uniform")
    p.add_argument("--moments", default="fresh")
    p.add_argument("--case", default="")
    p.add_argument("--max-feature-mb", type=float, default=256.0)
    p.add_argument("--coreset", type=int, default=0)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--resume", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if a.mode == "loop" and world > 1:
        torch.distributed.init_process_group("gloo")
    result = (run_trainer if a.mode == "trainer" else run_loop)(a, rank, world)
    result["world"] = world
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / f"rank{rank}.json", "w") as f:
        json.dump(result, f)
    end_process_group()  # the loop's group, or the one the Trainer started


if __name__ == "__main__":
    main()
