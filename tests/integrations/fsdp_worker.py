"""One process of an FSDP2 run of the plain loop (``coreset_step``), started by
``torch.distributed.run`` from tests/integrations/test_fsdp.py (gloo on CPU, tiny
Llama + LoRA, ``fully_shard`` on each decoder layer and on the model).

Every rank writes ``<out>/rank<r>.json``: the examples selected at each step, the
selection stats, the per-step losses, the final LoRA weights (whole: gathered from
the shards on every rank) and the bytes the replay gathered. ``--save-at N`` writes
a sharded checkpoint after step N (torch.distributed.checkpoint: model and optimizer,
plus the selector state); ``--resume DIR`` continues from one.
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
from colm.features.locate import find_layers  # noqa: E402
from colm.sharding import full, tensor_sharding  # noqa: E402
from tests.conftest import make_batch  # noqa: E402
from tests.integrations.ddp_worker import SOURCES, _model, _record, _sources  # noqa: E402

SELECTOR_FILE = "selector.pt"


def shard(model: torch.nn.Module, how: str, mixed: bool = False) -> torch.nn.Module:
    """FSDP2 as its documentation applies it (each decoder layer, then the model; with
    ``mixed``, computing in bf16 with fp32 gradient reduction), or FSDP1 as accelerate
    does (a unit per decoder layer, original parameters kept)."""
    _, layers = find_layers(model)
    if how == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({type(layers[0])})
        return FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed else None,
        reduce_dtype=torch.float32 if mixed else None,
    )
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _lora(model) -> dict[str, list]:
    """The LoRA weights, whole (a collective under FSDP2: every rank calls it)."""
    return {
        n: full(p.detach()).flatten().tolist() for n, p in model.named_parameters() if "lora_" in n
    }


def _save(folder: Path, model, opt, selector: CoresetSelector, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    if rank == 0:  # the selector state is the same on every rank
        torch.save(selector.state_dict(), folder / SELECTOR_FILE)
    torch.distributed.barrier()


def _load(folder: Path, model, opt, selector: CoresetSelector) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from colm.integrations.hf_trainer import load_selector_state

    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    selector.load_state_dict(load_selector_state(folder / SELECTOR_FILE))


def run_loop(a, rank: int, world: int) -> dict:
    from colm.integrations.loop import coreset_step

    model = _model()
    if a.shard != "none":
        model = shard(model, a.shard, a.mixed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = SelectorConfig(
        method="colm",
        ratio=0.5,
        size=a.coreset or None,
        feature=a.feature,
        num_directions=2,
        chunk_size=1,  # as in ddp_worker: each row's features bitwise one process's
        small_sources=["small1", "small2"],
        moments=a.moments,
        seed=3,
    )
    selector = CoresetSelector(cfg, dict(SOURCES))
    start = 0
    if a.resume:
        _load(Path(a.resume), model, opt, selector)
        start = selector.step
    log: list = []
    _record(selector, log)
    losses, gathered = [], []
    for step in range(start, a.steps):
        if a.case == "edge":  # 2 big-source rows need features: the third rank has none
            names = ["big1"] * 2 + ["small1"] * 3 + ["small2"] * 2 + ["big2"] * 2
        else:
            names = _sources(a.batch, seed=100 + step)
        batch = make_batch(n=len(names), max_len=12, min_len=4, seed=100 + step, sources=names)
        out = coreset_step(model, opt, selector, batch, micro_batches=2, max_grad_norm=1.0)
        losses.append(out.loss)
        features = selector._features
        gathered.append(features.replay.gathered_bytes if features is not None else 0)
        if a.save_at and step + 1 == a.save_at:
            folder = Path(a.out) / f"checkpoint-{step + 1}"
            folder.mkdir(parents=True, exist_ok=True)
            _save(folder, model, opt, selector, rank)
    params = list(model.parameters())
    replay = selector._features.replay if selector._features is not None else None
    return {
        "replay_dtype": str(getattr(replay, "dtype", None)),
        "model_dtype": str(getattr(replay, "model_dtype", None)),
        "steps": log,
        "losses": losses,
        "lora": _lora(model),
        "gathered_bytes": gathered,
        "model_bytes": sum(p.numel() * p.element_size() for p in params),
        "sharded_parameters": sum(tensor_sharding(p) == "fsdp2" for p in params),
        "parameters": len(params),
    }


def probe_trainer_fsdp(a) -> dict:
    """What the Trainer does with ``fsdp="full_shard"`` on a CPU: one step of a plain
    Trainer, and what accelerate made of the FSDP request."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from tests.conftest import collate_rows, make_rows

    args = TrainingArguments(
        output_dir=a.out + "/trainer",
        per_device_train_batch_size=4,
        max_steps=1,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo",
        remove_unused_columns=False,
        save_strategy="no",
        fsdp="full_shard",
    )
    rows = [{k: v for k, v in r.items() if k != "source"} for r in make_rows(16)]
    trainer = Trainer(
        model=_model(), args=args, train_dataset=Dataset.from_list(rows), data_collator=collate_rows
    )
    trainer.train()
    return {
        "is_fsdp_enabled": bool(trainer.is_fsdp_enabled),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapped": type(trainer.model_wrapped).__name__,
        "sharded_parameters": sum(
            tensor_sharding(p) is not None for p in trainer.model.parameters()
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="global source batch size")
    p.add_argument("--shard", choices=["none", "fsdp2", "fsdp1"], default="none")
    p.add_argument("--case", default="")
    p.add_argument("--probe-trainer-fsdp", action="store_true")
    p.add_argument("--mixed", action="store_true", help="FSDP2 computing in bf16")
    p.add_argument("--also-plain", action="store_true", help="then run the unsharded model")
    p.add_argument("--coreset", type=int, default=0)
    p.add_argument("--feature", default="zo")
    p.add_argument("--moments", default="fresh")
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if a.probe_trainer_fsdp:  # the Trainer sets up the process group itself
        result = probe_trainer_fsdp(a)
    else:
        torch.distributed.init_process_group("gloo")
        result = run_loop(a, rank, world)
    if a.also_plain:  # the same run on the unsharded model, in this process
        result["plain"] = run_loop(argparse.Namespace(**{**vars(a), "shard": "none"}), rank, world)
    result["world"] = world
    Path(a.out).mkdir(parents=True, exist_ok=True)
    with open(Path(a.out) / f"rank{rank}.json", "w") as f:
        json.dump(result, f)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
