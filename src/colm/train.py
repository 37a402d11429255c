"""``colm train``: a complete configured job on the Hugging Face Trainer.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line
per log, appended as training goes), ``checkpoints/`` (adapter, optimizer and
selector state), ``adapter/`` (the final adapter), ``selector.pt``,
``data_report.json``, ``memory.json`` and, after evaluation, ``eval.json``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .config import RunConfig, save_config


def _log(msg: str) -> None:
    print(f"colm: {msg}", file=sys.stderr, flush=True)


def load_data(cfg: RunConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train records, in-domain test records, out-of-domain test records)."""
    from .data import MixtureSpec, build_default_mixture, load_records

    d = cfg.data
    if d.path is None:
        spec = MixtureSpec.from_dict({"seed": cfg.train.seed, **d.mixture})
        mix = build_default_mixture(spec)
        return list(mix.train), list(mix.test_in), list(mix.test_out)
    kw = dict(
        source_column=d.source_column,
        prompt_field=d.prompt_field,
        completion_field=d.completion_field,
        messages_field=d.messages_field,
    )
    train = load_records(d.path, **kw)
    test = load_records(d.test_path, **kw) if d.test_path else []
    return train, test, []


def build_model(cfg: RunConfig):
    from .models import add_lora, load_model

    model, tokenizer = load_model(cfg.model.name)
    if cfg.model.lora is not None:
        lo = cfg.model.lora
        torch.manual_seed(cfg.train.seed)  # LoRA initialisation
        model = add_lora(
            model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.targets
        )
    return model, tokenizer


class _MetricsWriter(TrainerCallback):
    """Trainer callback appending each log as one JSON line (flushed, never partial)."""

    def __init__(self, path: Path, time_offset: float = 0.0):
        self.path = path
        self.offset = time_offset  # wall time already spent before a resume
        self.t0 = time.perf_counter()

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        wall = self.offset + time.perf_counter() - self.t0
        rec = {"step": state.global_step, "wall_time": wall, **logs}
        line = json.dumps(rec) + "\n"
        # one write of a whole line in append mode: a crash leaves whole lines only
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class _StopOnSignal(TrainerCallback):
    """On SIGTERM / SIGINT, finish the current step, save a checkpoint and stop."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        _log(f"received signal {signum}: saving a checkpoint after this step, then stopping")

    def on_step_end(self, args, state, control, **kw):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kw):
        # fault injection for the kill-and-resume tests: die without any clean-up
        # once the step after ``N`` has been logged (but not checkpointed)
        kill_at = os.environ.get("COLM_FAULT_SIGKILL_AFTER_STEP")
        if kill_at and state.global_step == int(kill_at) + 1:
            os.kill(os.getpid(), signal.SIGKILL)


def _keep_metrics_until(path: Path, step: int) -> float:
    """Keep the metrics lines of steps <= ``step`` (a resumed run rewrites the rest);
    returns the wall time reached by then. Unreadable (partial) lines are dropped."""
    if not path.exists():
        return 0.0
    kept, wall = [], 0.0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", 0) <= step:
            kept.append(line)
            wall = max(wall, float(rec.get("wall_time", 0.0)))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    tmp.replace(path)
    return wall


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_training(cfg: RunConfig, resume: bool = False) -> Path:
    """Train as configured; returns the run directory. With ``resume``, continue
    from the run directory's last checkpoint (same data order, selector state,
    optimizer and RNG state as the uninterrupted run)."""
    from transformers import TrainingArguments

    from .data import CoLMCollator, tokenize_records
    from .integrations.hf_trainer import CoLMTrainer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    metrics = run / "metrics.jsonl"
    checkpoint, time_offset = None, 0.0
    if resume:
        from .integrations.hf_trainer import last_complete_checkpoint

        folder = run / "checkpoints"
        checkpoint = last_complete_checkpoint(folder)
        if checkpoint is None:
            raise FileNotFoundError(f"{run} has no complete checkpoint to resume from ({folder})")
        step = int(checkpoint.rsplit("-", 1)[1])
        time_offset = _keep_metrics_until(metrics, step)
        _log(f"resuming from {checkpoint}")
    else:
        save_config(cfg, run / "config.yaml")
        if metrics.exists():
            metrics.unlink()
    selector_cfg = cfg.selector_config()

    _log(f"run directory {run}")
    train_records, _, _ = load_data(cfg)
    model, tokenizer = build_model(cfg)
    examples, report = tokenize_records(
        train_records, tokenizer, max_length=cfg.data.max_length, overflow=cfg.data.overflow
    )
    (run / "data_report.json").write_text(json.dumps(report.as_dict(), indent=1))
    _log(report.summary())

    t = cfg.train
    args = TrainingArguments(
        output_dir=str(run / "checkpoints"),
        per_device_train_batch_size=t.source_batch // t.micro_batches,
        gradient_accumulation_steps=t.micro_batches,
        max_steps=t.steps,
        learning_rate=t.lr,
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(t.warmup_ratio * t.steps),
        weight_decay=t.weight_decay,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=2,
        report_to=t.report_to,
        seed=t.seed,
        data_seed=t.seed,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = CoLMTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=CoLMCollator(tokenizer),
        processing_class=tokenizer,
        colm_config=selector_cfg,
        colm_method=t.method,
        callbacks=[_MetricsWriter(metrics, time_offset), _StopOnSignal()],
    )
    _log(
        f"training {t.method}: {t.steps} steps, source batch {t.source_batch}, coreset "
        f"{selector_cfg.coreset_size(t.source_batch) if t.method in ('colm', 'random') else t.source_batch}"
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.state.global_step < t.steps:
        _log(
            f"stopped at step {trainer.state.global_step}; continue with: colm train --resume {run}"
        )
        return run
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    if trainer.colm_selector is not None:
        torch.save(trainer.colm_selector.state_dict(), run / "selector.pt")
    (run / "memory.json").write_text(json.dumps({"peak_mb": peak_memory_mb()}))
    if cfg.eval.enabled:
        run_eval(run, model=model, tokenizer=tokenizer, cfg=cfg)
    return run


def load_run_config(run: Path) -> RunConfig:
    from .config import load_config

    path = Path(run) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a colm run directory (no config.yaml)")
    return load_config(path)


def run_eval(run: Path, model=None, tokenizer=None, cfg: RunConfig | None = None) -> dict[str, Any]:
    """Evaluate a run's final adapter (or the given model); writes eval.json."""
    from .evaluate import evaluate, format_table, write_eval

    run = Path(run)
    cfg = cfg or load_run_config(run)
    if model is None:
        from peft import PeftModel

        from .models import load_model

        base, tokenizer = load_model(cfg.model.name)
        adapter = run / "adapter"
        if cfg.model.lora is not None:
            if not adapter.exists():
                raise FileNotFoundError(f"{adapter} is missing: the run did not finish training")
            model = PeftModel.from_pretrained(base, str(adapter))
        else:
            model = base
    _, test_in, test_out = load_data(cfg)
    e = cfg.eval
    if e.limit_per_task:
        test_in, test_out = _limit(test_in, e.limit_per_task), _limit(test_out, e.limit_per_task)
    result = evaluate(
        model,
        tokenizer,
        test_in,
        test_out,
        max_length=cfg.data.max_length,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        # answer checkers exist for the built-in generators only; user data gets held-out loss
        generate=cfg.data.path is None,
    )
    write_eval(result, run / "eval.json")
    print(format_table(result))
    return result


def _limit(records: list[dict], n: int) -> list[dict]:
    seen: dict[str, int] = {}
    out = []
    for r in records:
        key = r.get("task") or r["source"]
        if seen.get(key, 0) < n:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out
