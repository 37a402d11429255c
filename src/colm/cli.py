"""Command line: ``colm demo`` (selection on the default model and mixture)."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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

    torch.manual_seed(args.seed)  # LoRA initialisation
    print("colm demo: one CoLM selection step on the default model and data mixture\n")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    model = add_lora(model)
    block = find_value_block(model)
    print(f"model: {args.model} + LoRA; feature block: {block.describe()}")

    mixture = build_default_mixture(MixtureSpec(seed=args.seed))
    counts = source_counts(mixture.train)
    selector = CoresetSelector(
        SelectorConfig(
            ratio=args.ratio, feature=args.feature, num_directions=args.directions, seed=args.seed
        ),
        counts,
    )
    small = selector.small_sources
    print("training mixture (examples per source; * = small, kept whole):")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {'*' if name in small else ' '} {name:<28} {n:>6}")

    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(mixture.train), generator=gen)[: args.batch].tolist()
    records = [mixture.train[i] for i in pick]
    examples, _ = tokenize_records(records, tokenizer, max_length=args.max_length)
    batch = CoLMCollator(tokenizer)(examples)
    print(
        f"\nsource batch: {len(examples)} random examples; coreset: "
        f"{SelectorConfig(ratio=args.ratio).coreset_size(len(examples))}"
    )

    for step in range(args.steps):
        sel = selector.select(model, batch)
        st = sel.stats
        print(
            f"\nstep {step}: features {st['time_features']:.2f} s, "
            f"selection {st['time_selection'] * 1000:.1f} ms"
        )
        print(f"  {'source':<28} {'in batch':>8} {'kept':>5} {'selected':>8}")
        for name, c in sorted(st["sources"].items()):
            print(f"  {name:<28} {c['in_batch']:>8} {c['kept']:>5} {c['selected']:>8}")
    print("\npicked in the last step:")
    for i in sel.indices.tolist()[: args.show]:
        text = records[i]["prompt"].replace("\n", " ")
        print(f"  [{i:>2}] {records[i]['source']:<24} {text[:70]}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="colm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="one selection step on the default model and mixture")
    demo.add_argument("--model", default="smollm2-135m-instruct")
    demo.add_argument("--batch", type=int, default=32, help="source batch size")
    demo.add_argument("--ratio", type=float, default=0.5)
    demo.add_argument("--feature", default="zo", choices=["zo", "exact"])
    demo.add_argument("--directions", type=int, default=1)
    demo.add_argument("--max-length", type=int, default=256)
    demo.add_argument("--steps", type=int, default=2)
    demo.add_argument("--show", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
