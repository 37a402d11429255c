"""Command line: ``colm train | eval | report | select``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    model = add_lora(model)
    print(f"model: {args.model} + LoRA; feature block: {find_value_block(model).describe()}")
    mixture = build_default_mixture(MixtureSpec(seed=args.seed))
    counts = source_counts(mixture.train)
    cfg = SelectorConfig(
        ratio=args.ratio, feature=args.feature, num_directions=args.directions, seed=args.seed
    )
    selector = CoresetSelector(cfg, counts)
    print("training mixture (examples per source; * = small, kept whole):")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {'*' if name in selector.small_sources else ' '} {name:<26} {n:>6}")
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(mixture.train), generator=gen)[: args.batch].tolist()
    records = [mixture.train[i] for i in pick]
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


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--feature", default="zo", choices=["zo", "exact"])
    p.add_argument("--directions", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--show", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_select)

    args = parser.parse_args(argv)
    _offline()
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
