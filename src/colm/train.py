"""``colm train``: a complete configured job on the Hugging Face Trainer.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line
per log, appended as training goes), ``checkpoints/`` (adapter, optimizer and
selector state), ``adapter/`` (the final adapter), ``selector.pt``,
``data_report.json``, ``memory.json`` and, after evaluation, ``eval.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import resource
import signal
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from .config import (
    LR_SCHEDULERS,
    ConfigError,
    RunConfig,
    deepspeed_stage,
    eval_max_length,
    save_config,
)
from .console import install as install_console
from .console import is_main_process as _is_main_process
from .console import log as _log
from .console import summary_table
from .files import write_text_atomic
from .pseudo_run import WarmClustersWriter, assign_pseudo_sources


class NonFiniteLossError(RuntimeError):
    """Training stopped: a step's loss or gradients were not finite (NaN / inf).

    ``step`` is the step whose update was not applied; ``checkpoint`` the folder
    holding the last good state (after step ``step - 1``)."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def load_data(cfg: RunConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train records, in-domain test records, out-of-domain test records)."""
    from .data import MixtureSpec, build_default_mixture, load_records

    d = cfg.data
    if d.path is None:
        spec = MixtureSpec.from_dict({"seed": cfg.train.seed, **d.mixture})
        mix = build_default_mixture(spec)
        return list(mix.train), list(mix.test_in), list(mix.test_out)
    kw = dict(
        prompt_field=d.prompt_field,
        completion_field=d.completion_field,
        messages_field=d.messages_field,
    )

    def load(path, column):
        try:
            return load_records(path, source_column=column, **kw)
        except ValueError as e:
            if column is not None and _check_source_column(path, column, e):
                # no example has the default source column: unlabelled data
                if path == d.path:
                    _log(
                        f"{path} has no '{column}' column: using pseudo-sources "
                        "(data.sources=auto, clusters of the model's hidden states)"
                    )
                    d.sources = "auto"
                return load_records(path, source_column=None, **kw)
            raise

    train = load(d.path, None if d.sources == "auto" else d.source_column)
    # held-out data keeps its source labels when it has them (loss per source)
    test = load(d.test_path, d.source_column) if d.test_path else []
    return train, test, []


def _check_source_column(path, column: str, error: Exception) -> bool:
    """After a failed load, whether no example of ``path`` has ``column`` at all: True
    for the default column "source" (unlabelled data: pseudo-sources), a ConfigError for
    another name (a wrong data.source_column rather than a bad row); False otherwise."""
    from .data.reading import _rows_from

    try:
        rows, _ = _rows_from(path)
        # the reader's rows are (line number, row) pairs (plain rows in older versions)
        rows = [r[-1] if isinstance(r, tuple) else r for r in rows]
    except Exception:  # the file itself is the problem: keep the loader's error
        return False
    if not rows or any(isinstance(r, Mapping) and column in r for r in rows):
        return False
    if column == "source":
        return True
    columns = sorted({str(k) for r in rows[:1000] if isinstance(r, Mapping) for k in r})
    raise ConfigError(
        f"data.source_column={column!r} is invalid; expected one of the columns of {path} "
        f"({columns}), the one that names each example's source (sub-dataset), or "
        "data.sources=auto for data without source labels"
    ) from error


def build_model(cfg: RunConfig):
    from .models import TORCH_DTYPES, add_lora, load_model

    # with LoRA on a bf16 / fp16 model, PEFT keeps the adapters (the trained weights) in fp32
    model, tokenizer = load_model(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
    if cfg.model.lora is not None:
        lo = cfg.model.lora
        torch.manual_seed(cfg.train.seed)  # LoRA initialisation
        try:
            model = add_lora(
                model, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=lo.targets
            )
        except ValueError as e:  # PEFT: targets not found in the model, ...
            raise ConfigError(
                f"model.lora.targets={lo.targets!r} is invalid for {cfg.model.name}; expected "
                f"names of modules of the model ({e})"
            ) from e
    return model, tokenizer


def check_feature_block(cfg: RunConfig, model) -> None:
    """For train.method='colm' with a selection that uses gradient features
    (selector.method colm or match): the built model must have the block whose gradient
    is the selection feature (with LoRA: LoRA on the last block's value projection)."""
    if cfg.train.method != "colm" or cfg.selector_config().method not in ("colm", "match"):
        return
    from .features.locate import BlockNotFoundError, find_value_block

    try:
        find_value_block(model)
    except BlockNotFoundError as e:
        if cfg.model.lora is not None:
            raise ConfigError(
                f"model.lora.targets={cfg.model.lora.targets!r} is invalid for "
                f"{cfg.model.name}; expected LoRA on the value projection of the last "
                f"transformer block, whose gradient train.method='colm' uses as the "
                f"selection feature: {e}"
            ) from e
        raise ConfigError(
            f"model.name={cfg.model.name!r} is invalid for train.method='colm'; expected a "
            f"model whose last block's value projection can be located: {e}"
        ) from e


class _Clock:
    """Training wall time: time since training began (plus what a resumed run had
    already spent), without the time spent in held-out evaluations."""

    def __init__(self, offset: float = 0.0):
        self.offset = offset
        self.t0 = time.perf_counter()
        self.paused = 0.0

    def start(self) -> None:
        self.t0, self.paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.t0 - self.paused


class _MetricsWriter(TrainerCallback):
    """Trainer callback appending each log as one JSON line (flushed, never partial)."""

    def __init__(self, path: Path, clock: _Clock):
        self.path = path
        self.clock = clock

    def on_train_begin(self, args, state, control, **kw):
        self.clock.start()

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        _append_line(
            self.path, {"step": state.global_step, "wall_time": self.clock.elapsed(), **logs}
        )


def _append_line(path: Path, record: Mapping[str, Any]) -> None:
    """One write of a whole JSON line in append mode: a crash leaves whole lines only."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


class _HeldoutCurve(TrainerCallback):
    """Held-out loss per source during training: every ``every`` steps (and, with
    ``at_start``, once before step 1), one line in ``heldout.jsonl`` with the step, the
    training wall time reached (evaluations excluded) and the loss per source. The
    last step's point is written by :func:`run_training` from the final evaluation,
    so it is not computed twice. Computed on the main process only, except under
    DeepSpeed ZeRO-3 (``every_process``), where each forward gathers the layers from all
    processes: there every process computes it, in step, and the main one writes it. The
    time it takes is not counted as training time."""

    def __init__(
        self,
        path,
        clock,
        tokenizer,
        test_in,
        test_out,
        cfg: RunConfig,
        final_eval: bool,
        every_process: bool = False,
    ):
        self.path, self.clock, self.tokenizer = path, clock, tokenizer
        self.test_in, self.test_out = test_in, test_out
        self.every, self.at_start = cfg.eval.every, cfg.eval.at_start
        self.max_length, self.batch_size = eval_max_length(cfg), cfg.eval.batch_size
        self.final_eval = final_eval
        self.every_process = every_process

    def measure(self, model, step: int, write: bool = True) -> None:
        from .evaluate import heldout_losses

        t0 = time.perf_counter()
        loss: dict[str, dict[str, float]] = {}
        se: dict[str, float] = {}
        for split, records in (("in", self.test_in), ("out", self.test_out)):
            if records:
                per = heldout_losses(
                    model, self.tokenizer, records, self.max_length, self.batch_size
                )
                loss[split] = {s: v.loss for s, v in per.items()}
                se.update({s: v.se for s, v in per.items()})
        seconds = time.perf_counter() - t0
        self.clock.paused += seconds
        if write:
            record = heldout_record(step, self.clock.elapsed(), loss, seconds, se)
            _append_line(self.path, record)

    def _here(self, state) -> bool:
        return state.is_world_process_zero or self.every_process

    def on_train_begin(self, args, state, control, model=None, **kw):
        if self.at_start and state.global_step == 0 and self._here(state):
            self.measure(model, 0, write=state.is_world_process_zero)

    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step
        if not self.every or step % self.every or not self._here(state):
            return
        if step == state.max_steps and self.final_eval:
            return  # the final evaluation gives this point
        self.measure(model, step, write=state.is_world_process_zero)


def heldout_record(
    step: int,
    wall: float,
    loss: Mapping[str, Mapping[str, float]],
    seconds,
    se: Mapping[str, float] | None = None,
):
    """One line of heldout.jsonl: losses per source (with their standard errors, where
    measured) and the in/out-of-domain means."""

    def mean(d):
        vals = list(d.values())
        return sum(vals) / len(vals) if vals else None

    return {
        "step": step,
        "wall_time": wall,
        "loss": {**loss.get("in", {}), **loss.get("out", {})},
        "loss_in": mean(loss.get("in", {})),
        "loss_out": mean(loss.get("out", {})),
        "sources_out": sorted(loss.get("out", {})),
        "seconds": seconds,
        **({"se": dict(se)} if se else {}),
    }


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
        stop = self.received is not None
        if _world_size() > 1:
            # the signal reaches the ranks at different moments: all stop at the same step
            flag = torch.tensor([float(stop)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            control.should_save = True
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kw):
        # fault injection for the kill-and-resume tests: die without any clean-up
        # once the step after ``N`` has been logged (but not checkpointed)
        kill_at = os.environ.get("COLM_FAULT_SIGKILL_AFTER_STEP")
        if kill_at and state.global_step == int(kill_at) + 1:
            os.kill(os.getpid(), signal.SIGKILL)


class _StopOnNonFinite(TrainerCallback):
    """Stops training at the first step whose loss or gradients are not finite.

    Runs in ``on_pre_optimizer_step``: after the step's backward passes, gradient
    clipping and (under DDP) the all-reduce of the gradients, before the optimizer
    applies the update. If the step's loss or any trainable parameter's gradient is
    NaN / inf, the update is never applied: the callback saves a checkpoint of the
    last good state (parameters, optimizer, scheduler and trainer state after the
    previous step, with the RNG and selector state as they were then, so that the
    checkpoint equals the one a periodic save would have written) with the
    trainer's own saving, and raises :class:`NonFiniteLossError`.
    """

    def __init__(self, run: Path, lr: float):
        self.trainer = None  # set once the trainer exists
        self.run = run
        self.lr = lr
        self.step = 0  # the step in progress, 1-based
        self._snapshot: dict[str, Any] | None = None

    # -- the state a checkpoint after the last completed step would hold ------------
    def _take(self) -> dict[str, Any]:
        snap: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cpu": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            snap["cuda"] = torch.cuda.get_rng_state_all()
        selector = getattr(self.trainer, "colm_selector", None)
        if selector is not None:
            snap["selector"] = copy.deepcopy(selector.state_dict())
        return snap

    def _restore(self, snap: dict[str, Any]) -> None:
        random.setstate(snap["python"])
        np.random.set_state(snap["numpy"])
        torch.set_rng_state(snap["cpu"])
        if "cuda" in snap:
            torch.cuda.set_rng_state_all(snap["cuda"])
        if "selector" in snap:
            self.trainer.colm_selector.load_state_dict(snap["selector"])

    def on_train_begin(self, args, state, control, **kw):
        self._snapshot = self._take()

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step + 1

    def on_step_end(self, args, state, control, **kw):
        self._snapshot = self._take()

    # -- the check -------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        model = model if model is not None else self.trainer.model
        grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
        grads = [(n, g) for n, g in grads if g is not None]
        loss = getattr(self.trainer, "_tr_loss", None)  # summed since the last log
        device = grads[0][1].device if grads else torch.device("cpu")
        # with fp16 loss scaling, overflowing gradients are the scaler's to handle (it skips
        # the update and lowers the scale): only a non-finite loss stops training
        scaled = _loss_scaling(self.trainer)
        flags = [] if scaled else [(~torch.isfinite(g)).any().to(device) for _, g in grads]
        grad_bad = torch.stack(flags).any() if flags else torch.zeros((), device=device)
        loss_bad = (
            (~torch.isfinite(loss)).any().to(device)
            if isinstance(loss, torch.Tensor)
            else torch.zeros((), dtype=torch.bool, device=device)
        )
        verdict = torch.stack([grad_bad, loss_bad]).to(torch.float32)
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            # the gradients are already all-reduced; the loss is per rank
            torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MAX)
        if not bool(verdict.any()):  # the one host sync per step
            return
        step = state.global_step + 1
        what = []
        if bool(verdict[1]):
            what.append("the training loss is not finite")
        if bool(verdict[0]):
            bad = [n for n, g in grads if not bool(torch.isfinite(g).all())]
            what.append(
                f"{len(bad)} of {len(grads)} trainable parameters have non-finite gradients"
                + (f" (e.g. {bad[0]})" if bad else "")
            )
        checkpoint = self._save_last_good(args, state)
        if checkpoint is not None:
            good = f"after step {step - 1}" if step > 1 else "before training"
            where = (
                f"The last good state ({good}; the bad update was not applied) is saved in "
                f"{checkpoint}; continue from it with: colm train --resume {self.run}"
            )
        else:
            where = "No checkpoint was saved"
        raise NonFiniteLossError(
            f"training stopped at step {step}: the loss / gradients were non-finite (NaN or "
            f"inf): {'; '.join(what)}. {where}. What to try: a lower train.lr (now "
            f"{self.lr:g}; train again from the start, since a resumed run keeps its learning "
            f"rate schedule); check the training data of step {step} (empty, very long or "
            f"broken examples); train in fp32 rather than fp16 / bf16.",
            step=step,
            checkpoint=checkpoint,
        )

    def _save_last_good(self, args, state) -> str | None:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from .integrations.hf_trainer import COMPLETE_MARKER

        trainer = self.trainer
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.exists(os.path.join(folder, COMPLETE_MARKER)):
            return folder  # the periodic save of the last good step
        if self._snapshot is not None:
            self._restore(self._snapshot)
        # the trainer's own saving (adapter / model, optimizer, scheduler, RNG, trainer
        # state; CoLMTrainerMixin adds the selector and, last, the colm_complete marker)
        try:
            trainer._save_checkpoint(trainer.model, trial=None)
        except Exception as e:  # still report the non-finite step, which is the cause
            _log(f"could not save the last good state to {folder}: {type(e).__name__}: {e}")
            return None
        return folder


def _loss_scaling(trainer) -> bool:
    """Whether the trainer scales the loss (fp16 mixed precision's GradScaler)."""
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    return scaler is not None and scaler.is_enabled()


def _install_nan_fault(model, guard: _StopOnNonFinite) -> None:
    """Fault injection for the tests: ``COLM_FAULT_NAN_AT_STEP=k`` makes the training
    loss (and logits) of step ``k`` NaN. Selection runs in eval mode and is untouched."""
    at = os.environ.get("COLM_FAULT_NAN_AT_STEP")
    if not at:
        return
    k = int(at)

    def hook(module, args, output):
        if module.training and guard.step == k:
            for key in ("loss", "logits"):
                value = output.get(key) if isinstance(output, Mapping) else None
                if isinstance(value, torch.Tensor):
                    output[key] = value * float("nan")
        return output

    model.register_forward_hook(hook)


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
    write_text_atomic(path, "".join(x + "\n" for x in kept))
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

    from .data import CoLMCollator, source_counts, tokenize_records
    from .integrations.hf_trainer import CoLMTrainer

    cfg.validate()  # a RunConfig built in code has not been through load_config
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    run = Path(cfg.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    metrics = run / "metrics.jsonl"
    curve = run / "heldout.jsonl"
    main = _is_main_process()  # under torchrun, only rank 0 writes run files
    checkpoint, time_offset = None, 0.0
    if resume:
        from .integrations.hf_trainer import last_complete_checkpoint

        folder = run / "checkpoints"
        checkpoint = last_complete_checkpoint(folder)
        if checkpoint is None:
            raise FileNotFoundError(f"{run} has no complete checkpoint to resume from ({folder})")
        step = int(checkpoint.rsplit("-", 1)[1])
        if main:
            time_offset = _keep_metrics_until(metrics, step)
            _keep_metrics_until(curve, step)
        _log(f"resuming from {checkpoint}")
    elif main:
        save_config(cfg, run / "config.yaml")
        for old in (metrics, curve):
            if old.exists():
                old.unlink()
    selector_cfg = cfg.selector_config()

    _log(f"run directory {run}")
    train_records, test_in, test_out = load_data(cfg)
    auto = cfg.data.sources == "auto"
    if cfg.data.cluster_after is not None and not auto:
        raise ConfigError(
            f"data.cluster_after={cfg.data.cluster_after} clusters the data again into "
            "pseudo-sources, but the run uses the labels in data.source_column; set "
            "data.sources: auto, or data.cluster_after: null"
        )
    if not auto:
        cfg.validate_data(source_counts(train_records))  # before the model is loaded
    model, tokenizer = build_model(cfg)
    check_feature_block(cfg, model)  # before training starts
    with warnings.catch_warnings():  # the data report below says the same, once
        warnings.filterwarnings("ignore", message="tokenize_records:")
        examples, report = tokenize_records(
            train_records, tokenizer, max_length=cfg.data.max_length, overflow=cfg.data.overflow
        )
    truth = [ex.get("source") for ex in examples]  # labelled data clustered anyway: ARI
    if auto:  # the clusters become the sources, before anything counts them
        assign_pseudo_sources(cfg, run, model, tokenizer, examples, resume=resume, write=main)
        cfg.validate_data(source_counts(examples))
    if main:
        (run / "data_report.json").write_text(json.dumps(report.as_dict(), indent=1))
        _log(report.summary())

    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    args = TrainingArguments(
        output_dir=str(run / "checkpoints"),
        # train.source_batch is the global source batch, whatever the number of processes
        per_device_train_batch_size=t.source_batch // (t.micro_batches * world),
        gradient_accumulation_steps=t.micro_batches,
        max_steps=t.steps,
        learning_rate=t.lr,
        lr_scheduler_type=LR_SCHEDULERS[t.lr_scheduler],
        adam_beta2=t.adam_beta2,
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
        logging_nan_inf_filter=False,  # a non-finite loss must reach _StopOnNonFinite
        use_cpu=not torch.cuda.is_available(),
        # mixed precision of the model's dtype: bf16 autocast, or fp16 autocast with the
        # Trainer's loss scaling (colm's selection replays in fp32 either way)
        bf16=cfg.model.dtype == "bf16",
        fp16=cfg.model.dtype == "fp16",
        deepspeed=t.deepspeed,
    )
    # under ZeRO-3 every forward gathers the layers from all processes
    zero3 = t.deepspeed is not None and deepspeed_stage(t.deepspeed) == 3
    guard = _StopOnNonFinite(run, t.lr)
    clock = _Clock(time_offset)
    callbacks = [_MetricsWriter(metrics, clock), _StopOnSignal(), guard]
    if cfg.eval.every or cfg.eval.at_start:
        test_in, test_out = _limited(cfg, test_in, test_out)
        callbacks.append(
            _HeldoutCurve(curve, clock, tokenizer, test_in, test_out, cfg, cfg.eval.enabled, zero3)
        )
    trainer = CoLMTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=CoLMCollator(tokenizer),
        processing_class=tokenizer,
        colm_config=selector_cfg,
        colm_method=t.method,
        callbacks=callbacks,
        colm_num_sources=cfg.data.num_sources,
        colm_cluster_after=cfg.data.cluster_after,
    )
    if cfg.data.cluster_after is not None and main:
        trainer.add_callback(WarmClustersWriter(run, trainer, tokenizer, truth))
    guard.trainer = trainer
    _install_nan_fault(model, guard)
    install_console(trainer)  # one progress bar; the per-step log dicts go to files only
    _place_tensorboard(trainer, run / "tensorboard")
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
    with _gathered_for_saving(model, cfg):  # every process: a collective under ZeRO-3
        if trainer.is_world_process_zero():
            model.save_pretrained(run / "adapter")
    if not trainer.is_world_process_zero():
        return run
    tokenizer.save_pretrained(run / "adapter")
    if trainer.colm_selector is not None:
        torch.save(trainer.colm_selector.state_dict(), run / "selector.pt")
    (run / "memory.json").write_text(json.dumps({"peak_mb": peak_memory_mb()}))
    wall = clock.elapsed()
    result = None
    if cfg.eval.enabled:
        # under ZeRO-3 the trained model is in partitions: the saved result is evaluated
        # on a whole model loaded on this (the main) process
        loaded = _saved_model(run, cfg) if zero3 else model
        result = run_eval(run, model=loaded, tokenizer=tokenizer, cfg=cfg, show=False)
        if cfg.eval.every or cfg.eval.at_start:  # the curve's last point
            split = {"in": {}, "out": {}}
            ood = {r["source"] for r in test_out}
            for src, value in result["loss"].items():
                split["out" if src in ood else "in"][src] = value
            _append_line(
                curve,
                heldout_record(t.steps, wall, split, result["seconds"], result.get("loss_se")),
            )
    _print_summary(cfg, run, examples if auto else train_records, test_out, result, wall)
    return run


def _saved_model(run: Path, cfg: RunConfig):
    """The trained model as saved in RUN/adapter, loaded whole: the base model with the
    adapter (LoRA), or the saved model itself (full fine-tuning). Called on the main
    process alone after a ZeRO-3 run: transformers' ZeRO-3 loading (each parameter
    partitioned as it is made, a collective) is switched off first, as training is over."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from .models import TORCH_DTYPES, load_model

    unset_hf_deepspeed_config()

    dtype = TORCH_DTYPES[cfg.model.dtype]
    if cfg.model.lora is None:
        return load_model(str(run / "adapter"), dtype=dtype)[0]
    from peft import PeftModel

    base, _ = load_model(cfg.model.name, dtype=dtype)
    return PeftModel.from_pretrained(base, str(run / "adapter"))


def _gathered_for_saving(model, cfg: RunConfig):
    """Under DeepSpeed ZeRO-3, the parameters ``save_pretrained`` writes, gathered whole
    for the context (the adapter's, with LoRA; every parameter without): a collective
    that every process enters. Nothing to do otherwise."""
    from .sharding import is_zero3

    params = [p for p in model.parameters() if p.requires_grad or cfg.model.lora is None]
    if not any(is_zero3(p) for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _place_tensorboard(trainer, folder: Path) -> None:
    """TensorBoard event files go to RUN/tensorboard (the Trainer's default would be under
    the checkpoint folder); a resumed run adds an event file beside the first one."""
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback) and cb.tb_writer is None:
            cb.logging_dir = str(folder)


def _print_summary(cfg: RunConfig, run: Path, train_records, test_out, result, wall: float):
    """The end of a run on the console: held-out loss before -> after per source group
    (before: the step-0 point of heldout.jsonl, with eval.at_start), time, peak memory."""
    from .data import source_counts
    from .runs import heldout_before, read_run
    from .sources import find_small_sources

    measured = heldout_before(read_run(run))  # heldout.jsonl's step 0, with eval.at_start
    before = {s: loss for s, (loss, _) in measured.items()} if measured else None
    after = (result or {}).get("loss") or {}
    small = find_small_sources(source_counts(train_records), cfg.selector_config().small_sources)
    if after:
        print(
            summary_table(
                before,
                after,
                small=small,
                out_of_domain={r["source"] for r in test_out},
                seconds=wall,
                peak_mb=peak_memory_mb(),
                report=f"colm report {run} --out {run / 'report'}",
            ),
            flush=True,
        )
    else:
        print(f"\ntraining time  {wall:.0f} s\nrun directory  {run}", flush=True)


def load_run_config(run: Path) -> RunConfig:
    from .config import load_config

    path = Path(run) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a colm run directory (no config.yaml)")
    return load_config(path)


def run_eval(
    run: Path, model=None, tokenizer=None, cfg: RunConfig | None = None, show: bool = True
) -> dict[str, Any]:
    """Evaluate a run's final adapter (or the given model); writes eval.json and, with
    ``show``, prints the table per source."""
    from .evaluate import evaluate, format_table, write_eval

    run = Path(run)
    cfg = cfg or load_run_config(run)
    if model is None:
        from peft import PeftModel

        from .models import TORCH_DTYPES, load_model

        base, tokenizer = load_model(cfg.model.name, dtype=TORCH_DTYPES[cfg.model.dtype])
        adapter = run / "adapter"
        if cfg.model.lora is not None:
            if not adapter.exists():
                raise FileNotFoundError(f"{adapter} is missing: the run did not finish training")
            model = PeftModel.from_pretrained(base, str(adapter))
        else:
            model = base
    _, test_in, test_out = load_data(cfg)
    e = cfg.eval
    test_in, test_out = _limited(cfg, test_in, test_out)
    result = evaluate(
        model,
        tokenizer,
        test_in,
        test_out,
        max_length=eval_max_length(cfg),
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        # answer checkers exist for the built-in generators only; user data gets held-out loss
        generate=e.generate and cfg.data.path is None,
    )
    write_eval(result, run / "eval.json")
    if show:
        print(format_table(result))
    return result


def _limited(cfg: RunConfig, test_in: list[dict], test_out: list[dict]):
    """The held-out sets as evaluated: at most eval.limit_per_task examples per task."""
    n = cfg.eval.limit_per_task
    return (_limit(test_in, n), _limit(test_out, n)) if n else (test_in, test_out)


def _limit(records: list[dict], n: int) -> list[dict]:
    seen: dict[str, int] = {}
    out = []
    for r in records:
        key = r.get("task") or r["source"]
        if seen.get(key, 0) < n:
            seen[key] = seen.get(key, 0) + 1
            out.append(r)
    return out
