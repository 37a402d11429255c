"""Command line: ``colm train | eval | report | select``."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _console_warnings() -> None:
    """Warnings on one line each (``colm: UserWarning: ...``), without the source line
    that raised them, and without a deprecation the Trainer raises about its own API."""

    def one_line(message, category, filename, lineno, line=None):
        return f"colm: {category.__name__}: {message}\n"

    warnings.formatwarning = one_line
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


def _train(args) -> int:
    from .config import load_config
    from .train import run_training

    if args.resume:
        if args.config is not None:  # with --resume, every positional is an override
            args.overrides = [args.config, *args.overrides]
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise FileNotFoundError(f"{run_dir} is not a colm run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml", args.overrides)
        run = run_training(cfg, resume=True)
    else:
        if args.config is None:
            raise FileNotFoundError("give a config file (colm train CONFIG) or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
        run = run_training(cfg)
    from .distributed import end_process_group

    end_process_group()  # under torchrun / accelerate launch; nothing otherwise
    print(f"run directory  {run}")
    return 0


def _eval(args) -> int:
    from .train import run_eval

    run_eval(Path(args.run_dir))
    return 0


def _report(args) -> int:
    from .report import make_report

    out = Path(args.out)
    path = make_report([Path(r) for r in args.run_dirs], out)
    print(f"report: {path}")
    print(f"plots:  {', '.join(str(p) for p in sorted(out.glob('*.png')))}")
    return 0


def _select(args) -> int:
    """One selection step on the default model and mixture, printing what was picked."""
    import torch

    from . import CoresetSelector, SelectorConfig, find_value_block
    from .data import (
        CoLMCollator,
        MixtureSpec,
        build_default_mixture,
        source_counts,
        tokenize_records,
    )
    from .models import add_lora, load_model

    chosen = {"feature": args.feature, "num_directions": args.directions}
    try:
        cfg = SelectorConfig(
            ratio=args.ratio,
            method=args.method,
            seed=args.seed,
            **{k: v for k, v in chosen.items() if v is not None},
        )
    except ValueError as e:
        print(f"colm select: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    model = add_lora(model)
    print(f"model: {args.model} + LoRA; feature block: {find_value_block(model).describe()}")
    print(
        f"selection: method={cfg.method}"
        + (f", feature={cfg.feature}" if cfg.method in ("colm", "match") else " (no features)")
    )
    mixture = build_default_mixture(MixtureSpec(seed=args.seed))
    gen = torch.Generator().manual_seed(args.seed)
    pool = list(mixture.train)
    if args.pseudo_sources:
        pool = _pseudo_source_pool(args, model, tokenizer, pool, gen)
    counts = source_counts(pool)
    selector = CoresetSelector(cfg, counts)
    what = "the pool" if args.pseudo_sources else "the training mixture"
    print(f"{what} (examples per source; * = small, kept whole):")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {'*' if name in selector.small_sources else ' '} {name:<26} {n:>6}")
    pick = torch.randperm(len(pool), generator=gen)[: args.batch].tolist()
    records = [pool[i] for i in pick]
    examples, _ = tokenize_records(records, tokenizer, max_length=args.max_length)
    batch = CoLMCollator(tokenizer)(examples)
    print(f"\nsource batch {len(examples)}, coreset {cfg.coreset_size(len(examples))}")
    for step in range(args.steps):
        sel = selector.select(model, batch)
        st = sel.stats
        print(
            f"\nstep {step}: features {st['time_features']:.2f} s, "
            f"selection {st['time_selection'] * 1000:.1f} ms"
        )
        print(f"  {'source':<26} {'in batch':>8} {'kept':>5} {'selected':>8}")
        for name, c in sorted(st["sources"].items()):
            print(f"  {name:<26} {c['in_batch']:>8} {c['kept']:>5} {c['selected']:>8}")
    print("\npicked in the last step:")
    for i in sel.indices.tolist()[: args.show]:
        text = records[i]["prompt"].replace("\n", " ")
        print(f"  [{i:>2}] {records[i]['source']:<24} {text[:70]}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def _pseudo_source_pool(args, model, tokenizer, records: list[dict], gen) -> list[dict]:
    """``--pseudo-sources``: a random pool of the mixture with its source labels hidden,
    clustered into pseudo-sources (what ``data.sources: auto`` does with a whole training
    set); prints each cluster with its typical example and how it matches the hidden
    labels. Returns the pool's records with ``source`` set to their cluster."""
    import torch

    from .data import tokenize_records
    from .data.pseudo_sources import adjusted_rand_index, first_words, pseudo_sources
    from .data.records import UNLABELLED

    n = min(args.pool, len(records))
    pool = [records[i] for i in torch.randperm(len(records), generator=gen)[:n].tolist()]
    truth = [r["source"] for r in pool]
    hidden = [{**r, "source": UNLABELLED} for r in pool]
    rows, _ = tokenize_records(hidden, tokenizer, max_length=args.max_length)
    print(f"\npseudo-sources: embedding {n} examples with their source labels hidden ...")
    result = pseudo_sources(model, rows, k=args.num_sources, seed=args.seed)
    words = first_words(tokenizer, rows, result.typical)
    how = "given" if args.num_sources else "found by density clustering"
    print(
        f"k = {result.k} ({how}); adjusted Rand index against the hidden labels: "
        f"{adjusted_rand_index(truth, result.labels):.3f}"
    )
    print(f"  {'cluster':<12} {'examples':>8}  {'most common hidden source':<30} typical example")
    for name, size in result.sizes.items():
        members = [t for t, c in zip(truth, result.labels) if c == name]
        top = max(set(members), key=members.count)
        share = f"{top} ({members.count(top) / len(members):.0%})"
        print(f"  {name:<12} {size:>8}  {share:<30} {words[name][:60]}")
    print()
    return [{**r, "source": c} for r, c in zip(pool, result.labels)]


def main(argv: list[str] | None = None) -> int:
    from .selector_config import FEATURES, METHODS, SelectorConfig

    parser = argparse.ArgumentParser(prog="colm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train as configured: colm train CONFIG [key=value ...]")
    p.add_argument("config", nargs="?", help="YAML config, e.g. configs/default.yaml")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument(
        "overrides", nargs="*", help="overrides such as train.steps=10 train.method=random"
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate a run's final adapter: colm eval RUN_DIR")
    p.add_argument("run_dir")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="compare runs: colm report RUN_DIR... [--out DIR]")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="runs/report")
    p.set_defaults(func=_report)

    p = sub.add_parser("select", help="one selection step on the default model and mixture")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=32, help="source batch size")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument(
        "--method",
        default=SelectorConfig().method,
        choices=list(METHODS),
        help="selection (default %(default)s; colm: the paper's facility location on features)",
    )
    p.add_argument("--feature", default=None, choices=list(FEATURES), help="colm/match: zo")
    p.add_argument("--directions", type=int, default=None, help="zo directions (colm/match: 1)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--show", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pseudo-sources",
        action="store_true",
        help="hide the mixture's source labels and select on pseudo-sources (k-means on the "
        "model's hidden states) of a random pool of it",
    )
    p.add_argument("--pool", type=int, default=256, help="examples clustered (--pseudo-sources)")
    p.add_argument(
        "--num-sources", type=int, default=None, help="k (default: found by density clustering)"
    )
    p.set_defaults(func=_select)

    args = parser.parse_args(argv)
    _offline()
    _console_warnings()
    from .config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # configuration and data errors are written to be read by a person;
        # COLM_DEBUG=1 shows the traceback instead
        if os.environ.get("COLM_DEBUG"):
            raise
        print(f"colm: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .selector import SelectionOutOfMemoryError
        from .train import NonFiniteLossError

        # training diverged (NaN / inf): the message says where the last good state is;
        # selection ran out of memory: the message names the setting to lower
        known = (NonFiniteLossError, SelectionOutOfMemoryError)
        if not isinstance(e, known) or os.environ.get("COLM_DEBUG"):
            raise
        print(f"colm: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
