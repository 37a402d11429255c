"""Memory and time of one optimizer step: full, accumulate, random, colm (and match).

Every method gets the same source batch of the default mixture (examples made
``--max-length`` tokens long by putting earlier questions of the same source
in front of each question; the real token counts are reported) and trains
SmolLM2-135M-Instruct + LoRA (r=8 on q, k, v, o, as ``configs/default.yaml``)
through the code path of ``colm train``: ``CoLMTrainer`` (a Hugging Face
``Trainer`` with the coreset hook) with ``colm_method`` set to the method.
The micro-batch structure is the Trainer's: the step has ``coreset /
--coreset-micro-batch`` micro-batches (gradient accumulation steps), so

- colm / random / match: the coreset (``ratio`` x source batch) in micro-batches
  of ``--coreset-micro-batch`` examples, selection replayed in chunks of that size;
- full: the whole source batch in the same number of micro-batches (each
  1 / ratio times larger: this is the memory of plain large-batch training);
- accumulate: the whole source batch in pieces of the coreset's micro-batch
  size (the memory-equal, compute-equal baseline).

Each (method, source batch) runs in its own process. Memory: growth over the
loaded model (after the Trainer is built and the weights are paged in) of the
peak during the selection phase (the ``selector.select`` call) and during the
training phase (forward, backward and optimizer step on the micro-batches),
each the largest over the timed steps; on CPU peak resident memory (VmHWM, the
value behind ``getrusage``'s ``ru_maxrss``, reset per phase through
/proc/self/clear_refs after ``malloc_trim`` hands freed heap back, so that a
phase is not charged for what the previous one freed), on GPU
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. The
step's peak is the larger of the two phases.
Time: median over ``--repeats`` steps after ``--warmup`` steps (the first
step also checks the replayed last block once, so keep ``--warmup >= 1``),
split into features (``Selection.stats["time_features"]``), selection (the
rest of ``select``: budgets, normalisation, facility location), data (fetch
and collation) and train.

    python benchmarks/bench_step.py                                  # CPU, 32 and 64 x 256 tokens
    python benchmarks/bench_step.py --device cuda --source-batch 128 --max-length 512 \\
        --coreset-micro-batch 32
    python benchmarks/bench_step.py --quick                          # tiny model, ~1-2 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# full_ckpt: the full batch with gradient checkpointing (the memory-saving alternative a
# user may pick instead; its quality is full's); random_big: colm's budgets, no features
METHODS = ("full", "accumulate", "random", "colm", "match", "random_big", "full_ckpt")
# (label, numerator, denominator, quantity, target: ratio must be <= target)
TARGETS = (
    ("colm/full memory", "colm", "full", "memory", 0.6),
    ("colm/random memory", "colm", "random", "memory", 1.1),
    ("colm/full time", "colm", "full", "time", 0.85),
    ("colm/accumulate time", "colm", "accumulate", "time", 0.7),
)
# the same time ratios in CPU seconds (informational: less sensitive to a shared machine)
CPU_RATIOS = (
    ("colm/full CPU time", "colm", "full", "cpu", 0.85),
    ("colm/accumulate CPU time", "colm", "accumulate", "cpu", 0.7),
)
PATH_NOTE = (
    "CoLMTrainer (transformers.Trainer with the colm get_batch_samples hook), "
    "the code path of `colm train`; colm_method set to each method"
)


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"bench_step: {msg}", file=sys.stderr, flush=True)


def default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def method_available(method: str) -> tuple[bool, str]:
    """Whether this colm accepts ``method`` (``match`` is optional)."""
    from colm import SelectorConfig
    from colm.integrations.hf_trainer import TRAIN_METHODS

    if method in TRAIN_METHODS or method == "full_ckpt":
        return True, ""
    try:
        SelectorConfig(method=method)
    except (ValueError, TypeError) as e:
        return False, f"SelectorConfig(method={method!r}) is not accepted here ({e})"
    return True, ""


def machine_info(device: str, threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if hasattr(os, "getloadavg"):
        info["load_average"] = os.getloadavg()  # others' work on the machine skews timings
    return info


def make_tiny_model_dir(
    path: str | os.PathLike, tokenizer_from: str | None = None, **config
) -> Path:
    """A tiny Llama with SmolLM2's tokenizer, saved in ``path``: for ``--quick`` runs that
    check the mechanics in seconds (numbers are meaningless); ``config``: LlamaConfig
    fields (``--wide``)."""
    from colm.testing import tiny_model_dir

    return tiny_model_dir(path, tokenizer_from, **config)


# --------------------------------------------------------------------------- data


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def build_examples(tokenizer, max_length: int, n: int, seed: int = 0):
    """``n`` training examples of (about) ``max_length`` tokens from the default mixture,
    and the mixture's examples per source.

    Each example is a mixture record whose prompt is preceded by earlier questions of
    the same source; the filler is cut from the front of the prompt (after the chat
    template's header) so that the example has exactly ``max_length`` tokens. The
    labels stay the record's own completion (plus EOS)."""
    from colm.data import build_default_mixture, source_counts, tokenize_records

    records = list(build_default_mixture().train)
    counts = source_counts(records)
    by_source: dict[str, list[dict]] = {}
    for r in records:
        by_source.setdefault(r["source"], []).append(r)
    rng = random.Random(seed)
    picked = [rng.choice(records) for _ in range(n)]
    long_records = []
    for r in picked:
        same = by_source[r["source"]]
        start = same.index(r)
        parts, chars, k = [], 0, 1
        while chars < 8 * max_length and k < 4 * len(same) + 8:
            q = same[(start + k) % len(same)]["prompt"]
            parts.append(q)
            chars += len(q) + 2
            k += 1
        long_records.append(
            {
                "source": r["source"],
                "prompt": "\n\n".join([*parts, r["prompt"]]),
                "completion": r["completion"],
            }
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        toks, _ = tokenize_records(long_records, tokenizer, max_length=64 * max_length)
        probe, _ = tokenize_records(
            [
                {"source": "a", "prompt": "Alpha " * 5, "completion": "x"},
                {"source": "a", "prompt": "Zulu " * 5, "completion": "x"},
            ],
            tokenizer,
            max_length=4096,
        )
    header = max(0, _common_prefix(probe[0]["input_ids"], probe[1]["input_ids"]) - 1)
    out = []
    for ex in toks:
        ids, labels = ex["input_ids"], ex["labels"]
        n_prompt = sum(1 for x in labels if x == -100)
        excess = len(ids) - max_length
        if excess > 0:
            if n_prompt - header >= excess:  # cut filler just after the header
                keep = list(range(header)) + list(range(header + excess, len(ids)))
            else:  # a very long completion: keep its last max_length tokens
                keep = list(range(len(ids) - max_length, len(ids)))
            ids = [ids[i] for i in keep]
            labels = [labels[i] for i in keep]
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": labels,
                "source": ex["source"],
            }
        )
    lengths = [len(e["input_ids"]) for e in out]
    label_tokens = [sum(1 for x in e["labels"][1:] if x != -100) for e in out]
    stats = {
        "examples": len(out),
        "tokens_mean": statistics.fmean(lengths),
        "tokens_min": min(lengths),
        "tokens_max": max(lengths),
        "label_tokens_mean": statistics.fmean(label_tokens),
    }
    return out, counts, stats


# --------------------------------------------------------------------------- memory


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Peak memory of a phase, as growth over a baseline (MB)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.resettable = True
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak resident set (VmHWM) to the current one
            except OSError:
                self.resettable = False
        self.base = 0.0
        self._trim = None
        if not self.cuda:
            try:
                import ctypes

                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc
                pass

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def current(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return _status_mb("VmRSS")

    def set_baseline(self) -> None:
        self.reset()
        self.base = self.current()

    def reset(self) -> None:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        if self._trim is not None:
            # hand freed heap back to the OS, so that memory the previous phase freed
            # does not count as the next phase's resident memory
            self._trim(0)
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> float:
        """Peak since the last reset, minus the baseline."""
        self.sync()
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return _status_mb("VmHWM") - self.base


# --------------------------------------------------------------------------- one run (child)


def run_method(spec: dict) -> dict:
    """Child process: train ``warmup + repeats`` steps of one method and measure each."""
    from transformers import TrainerCallback, TrainingArguments

    from colm import SelectorConfig
    from colm.data import CoLMCollator
    from colm.integrations.hf_trainer import TRAIN_METHODS, CoLMTrainer
    from colm.models import add_lora, load_model

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    method = spec["method"]
    mem = PeakMemory(device)
    model, tokenizer = load_model(spec["model"])
    torch.manual_seed(0)
    if spec.get("lora", True):
        model = add_lora(model, r=8, alpha=16, dropout=0.05)
    examples = json.loads(Path(spec["data"]).read_text())
    counts = json.loads(Path(spec["counts"]).read_text())

    selector_method = method if method in ("match", "random_big") else "colm"
    colm_method = "full" if method == "full_ckpt" else method if method in TRAIN_METHODS else "colm"
    sel_cfg = SelectorConfig.preset(
        "paper",
        ratio=spec["ratio"],
        method=selector_method,
        feature=spec.get("feature", "zo"),
        max_feature_mb=spec.get("max_feature_mb", SelectorConfig.max_feature_mb),
        seed=0,
    )
    B, n_micro = spec["source_batch"], spec["micro_batches"]
    steps = spec["warmup"] + spec["repeats"]
    records: list[dict] = []
    clock = {}

    class Bench(CoLMTrainer):
        def get_batch_samples(self, epoch_iterator, num_batches, dev):
            mem.sync()
            rec = {"features_s": 0.0, "selection_s": 0.0, "select_s": 0.0, "selection_mb": 0.0}
            records.append(rec)
            clock["start"] = time.perf_counter()
            clock["cpu"] = time.process_time()
            out = super().get_batch_samples(epoch_iterator, num_batches, dev)
            mem.reset()
            clock["train"] = time.perf_counter()
            rec["fetch_select_s"] = clock["train"] - clock["start"]
            rec["trained_examples"] = sum(len(b["input_ids"]) for b in out[0])
            rows = [len(b["input_ids"]) for b in out[0]]
            if self.colm_method == "accumulate" and self._colm_sub_batch:
                # each micro-batch runs in pieces of the coreset's micro-batch size
                sub = self._colm_sub_batch
                rows = [min(sub, r - i) for r in rows for i in range(0, r, sub)]
            rec["micro_batch_rows"] = rows
            rec["trained_tokens"] = sum(int(b["attention_mask"].sum()) for b in out[0])
            return out

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            mem.sync()
            now = time.perf_counter()
            rec = records[-1]
            rec["train_mb"] = mem.peak()
            rec["train_s"] = now - clock["train"]
            rec["step_s"] = now - clock["start"]
            # CPU seconds of this process (all threads): less sensitive than wall time
            # to other work on a shared machine
            rec["step_cpu_s"] = time.process_time() - clock["cpu"]
            rec["data_s"] = rec["fetch_select_s"] - rec["select_s"]

    tmp = tempfile.mkdtemp(prefix="bench_step_")
    args = TrainingArguments(
        output_dir=tmp,
        per_device_train_batch_size=B // n_micro,
        gradient_accumulation_steps=n_micro,
        max_steps=steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        remove_unused_columns=False,
        dataloader_drop_last=True,
        use_cpu=not device.startswith("cuda"),
        gradient_checkpointing=method == "full_ckpt",
        gradient_checkpointing_kwargs={"use_reentrant": False} if method == "full_ckpt" else None,
    )
    trainer = Bench(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=CoLMCollator(tokenizer),
        processing_class=tokenizer,
        colm_config=sel_cfg,
        colm_method=colm_method,
        source_counts=counts,
        callbacks=[Timer()],
    )
    selector = trainer.colm_selector
    if selector is not None:
        inner = selector.select

        def timed_select(m, batch, **kw):
            mem.reset()
            t0 = time.perf_counter()
            sel = inner(m, batch, **kw)
            mem.sync()
            rec = records[-1]
            rec["select_s"] = time.perf_counter() - t0
            rec["selection_mb"] = mem.peak()
            rec["features_s"] = float(sel.stats.get("time_features", 0.0))
            rec["selection_s"] = rec["select_s"] - rec["features_s"]
            rec["streamed"] = bool(sel.stats.get("streamed", False))
            return sel

        selector.select = timed_select
    with torch.no_grad():  # page in the weights (loaded lazily from the safetensors file)
        touched = sum(float(p.detach().float().sum()) for p in model.parameters())
    del touched
    mem.set_baseline()
    trainer.train()
    timed = records[spec["warmup"] :]
    if not timed:
        raise RuntimeError("no timed steps: raise --repeats")
    keys = ("features_s", "selection_s", "select_s", "data_s", "train_s", "step_s", "step_cpu_s")
    median = {k: statistics.median(r[k] for r in timed) for k in keys}
    memory = {
        "selection_mb": max(r["selection_mb"] for r in timed),
        "train_mb": max(r["train_mb"] for r in timed),
    }
    memory["step_mb"] = max(memory["selection_mb"], memory["train_mb"])
    # including the warm-up steps (the first step also checks the replay on the full model)
    memory["peak_with_warmup_mb"] = max(
        max(r.get("selection_mb", 0.0), r.get("train_mb", 0.0)) for r in records
    )
    memory["baseline_mb"] = mem.base
    memory["phase_reset"] = mem.resettable or mem.cuda
    return {
        "method": method,
        "variant": spec.get("variant", method),
        "colm_method": colm_method,
        "selector_method": selector.config.method if selector is not None else None,
        "source_batch": B,
        "micro_batches": n_micro,
        "micro_batch_rows": timed[0]["micro_batch_rows"],
        "trained_examples": timed[0]["trained_examples"],
        "trained_tokens_median": statistics.median(r["trained_tokens"] for r in timed),
        "chunk_size": selector.config.chunk_size if selector is not None else None,
        "feature": selector.config.feature if selector is not None else None,
        "max_feature_mb": selector.config.max_feature_mb if selector is not None else None,
        "streamed": any(r.get("streamed", False) for r in timed),
        "median": median,
        "memory": memory,
        "steps": records,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- parent


def ratios(results: list[dict]) -> list[dict]:
    out = []
    by = {
        (r["method"], r["source_batch"]): r
        for r in results
        if r.get("variant", r["method"]) == r["method"]
    }
    for B in sorted({r["source_batch"] for r in results}):
        for label, num, den, what, target in TARGETS + CPU_RATIOS:
            a, b = by.get((num, B)), by.get((den, B))
            if a is None or b is None:
                continue
            if what == "memory":
                x, y = a["memory"]["step_mb"], b["memory"]["step_mb"]
            elif what == "cpu":
                if "step_cpu_s" not in a["median"] or "step_cpu_s" not in b["median"]:
                    continue
                x, y = a["median"]["step_cpu_s"], b["median"]["step_cpu_s"]
            else:
                x, y = a["median"]["step_s"], b["median"]["step_s"]
            value = x / y if y > 0 else float("nan")
            out.append(
                {
                    "source_batch": B,
                    "ratio": label,
                    "value": value,
                    "target": target,
                    "met": bool(value <= target),
                    "informational": what == "cpu",
                }
            )
    return out


def variant_name(method: str, feature: str, budget: float | None | str) -> str:
    """``colm (exact, features held)``, ``colm (zo, streamed past 0 MiB)``, ... for the
    feature-based methods off their defaults; the method's name otherwise."""
    if method not in ("colm", "match") or (feature == "zo" and budget == "default"):
        return method
    if budget == "default":
        return f"{method} ({feature})"
    held = "features held" if budget is None else f"streamed past {budget:g} MiB"
    return f"{method} ({feature}, {held})"


def table(results: list[dict]) -> str:
    lines = [
        "| method | source batch | trained | micro-batches x rows | features (s) | selection (s) "
        "| data (s) | train (s) | step (s) | step CPU (s) | selection peak (MB) | train peak (MB) "
        "| step peak (MB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m, mem = r["median"], r["memory"]
        rows = r["micro_batch_rows"]
        lines.append(
            f"| {r.get('variant', r['method'])} | {r['source_batch']} | {r['trained_examples']} "
            f"| {len(rows)} x {max(rows)} | {m['features_s']:.3f} | {m['selection_s']:.3f} "
            f"| {m['data_s']:.3f} | {m['train_s']:.3f} | {m['step_s']:.3f} | {m['step_cpu_s']:.2f} "
            f"| {mem['selection_mb']:.0f} | {mem['train_mb']:.0f} | {mem['step_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--source-batch", default=None, help='comma list (default "32,64")')
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (256)")
    p.add_argument("--ratio", type=float, default=0.5, help="coreset = ratio x source batch")
    p.add_argument(
        "--coreset-micro-batch",
        type=int,
        default=None,
        help="rows per micro-batch of the coreset (8); the step has coreset / this micro-batches",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma list")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (median; 3)")
    p.add_argument("--model", default=None, help="model name or directory (default SmolLM2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (OMP_NUM_THREADS)")
    p.add_argument("--out", default=None, help="JSON (benchmarks/results/step.json)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per method run")
    p.add_argument("--quick", action="store_true", help="tiny model, batch 8 x 64, 1+1 steps")
    p.add_argument(
        "--wide",
        action="store_true",
        help="full fine-tuning of a 2-layer Llama as wide as Llama-3-8B (value projection "
        "1024 x 4096), built from config: selection's memory against a training step's",
    )
    p.add_argument("--full-finetune", action="store_true", help="no LoRA: train every weight")
    p.add_argument("--feature", default="zo", help="zo or exact (colm and match)")
    p.add_argument(
        "--max-feature-mb",
        default=None,
        help="comma list of SelectorConfig.max_feature_mb values ('none': hold the features "
        "whole); the feature-based methods run once per value",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        spec = json.loads(Path(args.child).read_text())
        result = run_method(spec)
        print("BENCH_STEP_RESULT " + json.dumps(result), flush=True)
        return 0

    q = args.quick
    batches = [int(x) for x in (args.source_batch or ("8" if q else "32,64")).split(",")]
    max_length = args.max_length or (64 if q else 256)
    micro = args.coreset_micro_batch or (2 if q else 8)
    warmup = args.warmup if args.warmup is not None else 1
    repeats = args.repeats if args.repeats is not None else (1 if q else 3)
    threads = args.threads or default_threads()
    name = "step_quick.json" if q else "step_wide.json" if args.wide else "step.json"
    out_path = Path(args.out or ROOT / "benchmarks/results" / name)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")

    methods, skipped = [], {}
    for m in args.methods.split(","):
        m = m.strip()
        if m not in METHODS:
            p.error(f"unknown method {m!r}; expected some of {METHODS}")
        ok, why = method_available(m)
        if ok:
            methods.append(m)
        else:
            skipped[m] = why
            log(f"skipping {m}: {why}")

    work = Path(tempfile.mkdtemp(prefix="bench_step_"))
    model = args.model
    if model is None and q:
        model = str(make_tiny_model_dir(work / "tiny-model"))
    if args.wide:
        from colm.testing import WIDE

        if args.model or q:
            p.error("--wide builds its own model: drop --model and --quick")
        log("building the wide model (2 layers, hidden 4096) ...")
        model = str(make_tiny_model_dir(work / "wide-model", **WIDE))
    lora = not (args.wide or args.full_finetune)
    budgets: list[float | None] = [
        None if x.strip().lower() == "none" else float(x)
        for x in (args.max_feature_mb or "").split(",")
        if x.strip()
    ] or ["default"]
    model = model or "smollm2-135m-instruct"
    from transformers import AutoTokenizer

    from colm.models import DEFAULT_MODEL, default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(
        str(default_model_dir()) if model == DEFAULT_MODEL else model
    )

    plan = []
    for B in batches:
        coreset = max(1, math.floor(args.ratio * B + 0.5))
        n_micro = max(1, coreset // micro)
        if coreset % micro or B % n_micro:
            p.error(
                f"source batch {B}: coreset {coreset} is not a multiple of --coreset-micro-batch "
                f"{micro}, or {B} is not a multiple of the {n_micro} micro-batches"
            )
        plan.append((B, coreset, n_micro))
    n_examples = (warmup + repeats) * max(batches)
    log(f"building {n_examples} examples of {max_length} tokens from the default mixture")
    examples, counts, token_stats = build_examples(tokenizer, max_length, n_examples)
    data_file, counts_file = work / "examples.json", work / "counts.json"
    data_file.write_text(json.dumps(examples))
    counts_file.write_text(json.dumps(counts))

    results, failures = [], {}
    runs = [(m, mb) for m in methods for mb in (budgets if m in ("colm", "match") else ["default"])]
    for B, coreset, n_micro in plan:
        for m, mb in runs:
            variant = variant_name(m, args.feature, mb)
            spec = {
                "method": m,
                "variant": variant,
                "lora": lora,
                "feature": args.feature,
                "source_batch": B,
                "micro_batches": n_micro,
                "ratio": args.ratio,
                "warmup": warmup,
                "repeats": repeats,
                "device": args.device,
                "threads": threads,
                "model": model,
                "data": str(data_file),
                "counts": str(counts_file),
            }
            if mb != "default":
                spec["max_feature_mb"] = mb
            spec_file = work / f"spec-{len(results) + len(failures)}-{B}.json"
            spec_file.write_text(json.dumps(spec))
            log(f"{variant}, source batch {B} (coreset {coreset}, {n_micro} micro-batches) ...")
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(spec_file)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            line = next(
                (x for x in proc.stdout.splitlines() if x.startswith("BENCH_STEP_RESULT ")), None
            )
            if proc.returncode != 0 or line is None:
                failures[f"{variant}@{B}"] = proc.stderr[-3000:]
                log(
                    f"{m}, source batch {B} FAILED (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
                )
                continue
            r = json.loads(line.split(" ", 1)[1])
            r["process_s"] = time.perf_counter() - t0
            results.append(r)
            log(
                f"  step {r['median']['step_s']:.2f} s, step peak {r['memory']['step_mb']:.0f} MB "
                f"({r['process_s']:.0f} s in all)"
            )

    rat = ratios(results)
    what = "SmolLM2 + LoRA r=8 (q,k,v,o)" if lora else "full fine-tuning"
    if args.wide:
        what = "full fine-tuning of a 2-layer Llama of width 4096 (value projection 1024 x 4096)"
    header = (
        f"## One optimizer step, {args.device}: {what} "
        f"[model {model}], ratio {args.ratio}, coreset micro-batch {micro}, "
        f"median of {repeats} after {warmup} warm-up\n\n"
        f"Examples: {token_stats['tokens_mean']:.1f} tokens on average "
        f"(min {token_stats['tokens_min']}, max {token_stats['tokens_max']}; "
        f"{token_stats['label_tokens_mean']:.1f} label tokens).\n"
        f"Path: {PATH_NOTE}."
    )
    print(header + "\n")
    print(table(results))
    print("\n| ratio | source batch | value | target | |\n|---|---:|---:|---:|---|")
    for r in rat:
        print(
            f"| {r['ratio']} | {r['source_batch']} | {r['value']:.2f} | <= {r['target']} "
            f"| {'met' if r['met'] else 'missed'}{' (CPU time, for reference)' if r['informational'] else ''} |"
        )
    if skipped:
        print("\nSkipped: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if failures:
        print("\nFailed: " + ", ".join(failures))
    if results and not all(r["memory"]["phase_reset"] for r in results):
        print("\nNote: /proc/self/clear_refs is not writable: phase peaks are cumulative.")

    payload = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device, threads),
        "path": PATH_NOTE,
        "settings": {
            "model": model,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "targets": "q,k,v,o"} if lora else None,
            "wide": args.wide,
            "feature": args.feature,
            "max_feature_mb": budgets,
            "source_batches": batches,
            "max_length": max_length,
            "ratio": args.ratio,
            "coreset_micro_batch": micro,
            "warmup": warmup,
            "repeats": repeats,
            "memory": "CUDA max_memory_allocated growth"
            if args.device.startswith("cuda")
            else "peak RSS (VmHWM) growth over the loaded model, reset per phase "
            "(after malloc_trim)",
        },
        "tokens": token_stats,
        "methods": results,
        "ratios": rat,
        "skipped": skipped,
        "failed": failures,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {out_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
