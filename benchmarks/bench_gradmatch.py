"""Does the coreset's gradient match the source batch's gradient? (issue 6, item 4)

On SmolLM2-135M-Instruct + LoRA (r=8 on q_proj, v_proj) and the default
mixture, for source batches of ``--source-batch`` examples drawn at random
from the training set (as a shuffled data loader draws them) it measures, at
the training steps ``--points``:

(a) the exact per-example gradient g_i of ALL trainable LoRA parameters (the
    gradient of example i's mean token loss over its label tokens, eval mode:
    no dropout), and the source batch's gradient as training computes it: the
    training loss is the token-level mean over the batch's label tokens, so
    g_batch = sum_i n_i g_i / sum_i n_i with n_i the label tokens of example i;
(b) for each selector variant, the coreset's gradient, weighted like
    training (sum_i w_i n_i g_i / sum_i w_i n_i, w the selection's weights),
    and its relative error ||g_coreset - g_batch|| / ||g_batch||;
(c) the same error for ``--random-subsets`` random *stratified* subsets with
    colm's per-source counts (small sources kept whole, big sources sampled
    uniformly), and each method's percentile in that distribution: the share
    of random subsets with a LOWER error (lower = better; 50 = a typical
    random subset);
(d) the error per source: small sources (kept whole: should be 0) and each big
    source (against its own gradient), with the random subsets' median;
(e) how well the selector's features preserve distances: Spearman rank
    correlation, over pairs of examples of the same big source, of the L1
    distances of the features (zo q=1, zo q=8, exact value block; raw, and as
    the selector uses them: Adam-normalised with the selector's moments and
    restricted to the source's top-h coordinates) with the L2 distances of the
    full-LoRA exact gradients;
(f) what each selector picks among the big sources: mean loss, length and
    label tokens of picked vs all big-source examples, and each source's
    share of the coreset vs of the batch.

Between points the model is trained with colm's plain loop
(``colm.integrations.loop.coreset_step``, colm selector zo q=1, AdamW lr
3e-4, no weight decay), so later points see a trained model. Every variant's
selector keeps its own Adam moments: besides the training selector, one
"shadow" selector per (method, feature, directions) selects on every training
batch too (selection only, no training), so that e.g. the exact-feature
variant is normalised with exact-feature moments at step 20.

    HF_HUB_OFFLINE=1 python benchmarks/bench_gradmatch.py            # SmolLM2, CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_gradmatch.py --quick    # tiny model, < 60 s

Writes ``--out`` (JSON, default benchmarks/results/gradmatch.json) and a PNG
next to it (random-subset error histogram with each method's error marked,
and every method's percentile per batch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

IGNORE_INDEX = -100
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gradmatch" / "gradmatch.json"


# --------------------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny random Llama, small batches")
    p.add_argument("--source-batch", type=int, default=None, help="default 32 (quick: 16)")
    p.add_argument("--ratio", type=float, default=0.5, help="coreset ratio")
    p.add_argument(
        "--batches", type=int, default=None, help="batches per point (default 16, quick 1)"
    )
    p.add_argument("--random-subsets", type=int, default=None, help="default 1000 (quick: 50)")
    p.add_argument(
        "--points", default=None, help='training steps to measure at (default "0,10,40")'
    )
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-length", type=int, default=None, help="default 128")
    p.add_argument("--topk-dims", type=int, default=2560, help="h of the selector")
    p.add_argument("--micro-batches", type=int, default=2, help="of the training step")
    p.add_argument("--grad-method", choices=("hooks", "loop"), default="hooks")
    p.add_argument("--check-examples", type=int, default=2, help="hooks vs autograd loop")
    p.add_argument(
        "--shadow",
        action="store_true",
        help="selectors with their own moments select on every training batch too (slow)",
    )
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated name prefixes of the selector variants to run (default: all), "
        "e.g. colm_zo1,colm_exact,match_zo1,random",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder of finished batch-points, reused by a later run with the same settings "
        "(default: batches/ beside --out)",
    )
    p.add_argument("--force", action="store_true", help="measure cached batch-points again")
    args = p.parse_args(argv)
    q = args.quick
    if args.source_batch is None:
        args.source_batch = 16 if q else 32
    if args.batches is None:
        args.batches = 1 if q else 16
    if args.random_subsets is None:
        args.random_subsets = 50 if q else 1000
    if args.max_length is None:
        args.max_length = 128
    if args.points is None:
        args.points = "0" if q else "0,10,40"
    if args.cache is None:
        args.cache = args.out.parent / f"{args.out.stem}_batches"
    args.point_list = sorted({int(s) for s in str(args.points).split(",") if s.strip()})
    if not args.point_list or args.point_list[0] < 0:
        p.error(f"--points must list steps >= 0, got {args.points!r}")
    return args


def _offline_tokenizer():
    """SmolLM2's tokenizer: from colm's converted model cache, else from the GGUF."""
    from transformers import AutoTokenizer

    from colm.models import _GGUF_FILE, _GGUF_PACKAGE, cache_dir

    cached = cache_dir() / "SmolLM2-135M-Instruct-fp32"
    if (cached / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(cached))
    else:
        from importlib.metadata import distribution

        path = Path(distribution(_GGUF_PACKAGE).locate_file(_GGUF_FILE))
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _tiny_llama(tokenizer, max_length: int, seed: int):
    """A tiny random Llama with the tokenizer's vocabulary (:mod:`colm.testing`)."""
    from colm.testing import tiny_llama

    return tiny_llama(tokenizer, seed=seed, max_positions=max(1024, max_length))


def setup(args):
    from colm.data import MixtureSpec, SourceSpec, build_default_mixture, tokenize_records
    from colm.models import add_lora, load_model

    default = MixtureSpec().train
    if args.quick:  # a fifth of every source: same big/small structure, fast to generate
        train = [SourceSpec(s.name, max(2, s.size // 5), dict(s.config)) for s in default]
        spec = MixtureSpec(train=train, test_per_source=0, ood=[], seed=args.seed)
        tokenizer = _offline_tokenizer()
        model = _tiny_llama(tokenizer, args.max_length, args.seed)
        model_name = "tiny random Llama (2 layers, hidden 32) + SmolLM2 tokenizer"
    else:
        spec = MixtureSpec(test_per_source=0, ood=[], seed=args.seed)
        model, tokenizer = load_model()
        model_name = "SmolLM2-135M-Instruct (fp32)"
    model.config.use_cache = False
    torch.manual_seed(args.seed)  # LoRA initialisation
    model = add_lora(model, r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    model.to(args.device)
    records = build_default_mixture(spec).train
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation notice; counted in the report
        examples, report = tokenize_records(records, tokenizer, max_length=args.max_length)
    return model, tokenizer, examples, report, model_name


class BatchStream:
    """Source batches drawn at random without replacement (epoch after epoch)."""

    def __init__(self, examples, collator, size: int, seed: int):
        self.examples, self.collator, self.size = examples, collator, size
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> dict[str, Any]:
        if len(self.order) < self.size:
            self.order += torch.randperm(len(self.examples), generator=self.gen).tolist()
        take, self.order = self.order[: self.size], self.order[self.size :]
        return self.collator([self.examples[i] for i in take])


# --------------------------------------------------------------------------- (a) gradients


def _rows(batch, i, device):
    am = batch["attention_mask"][i]
    end = int(am.nonzero().max()) + 1 if bool(am.any()) else 1
    return (
        batch["input_ids"][i : i + 1, :end].to(device),
        am[None, :end].to(device),
        batch["labels"][i : i + 1, :end].to(device),
    )


def _example_loss(logits, labels):
    """Mean next-token loss over each row's label tokens (and the token counts)."""
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),
        labels[:, 1:],
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).sum(1)
    ntok = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    return ce / ntok.clamp(min=1), ntok


def label_losses(model, ids, am, lab):
    """Per-example mean label-token losses, computing logits at label positions only
    (the LM head over every position of a 49k vocabulary dominates otherwise)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        return _example_loss(model(input_ids=ids, attention_mask=am).logits, lab)
    hidden = decoder(input_ids=ids, attention_mask=am).last_hidden_state
    target = lab[:, 1:]
    mask = target != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask]).float()
    ce = F.cross_entropy(logits, target[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    total = torch.zeros(len(ids), dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    ntok = mask.sum(1)
    return total / ntok.clamp(min=1), ntok


def grads_loop(model, batch, params, device, rows=None):
    """Per-example gradients by one autograd.grad per example (the reference)."""
    model.eval()
    rows = range(len(batch["input_ids"])) if rows is None else rows
    out, losses, ntoks = [], [], []
    for i in rows:
        ids, am, lab = _rows(batch, i, device)
        loss, ntok = _example_loss(model(input_ids=ids, attention_mask=am).logits, lab)
        grads = torch.autograd.grad(loss.sum(), params)
        out.append(torch.cat([g.reshape(-1) for g in grads]).float().cpu())
        losses.append(loss.item())
        ntoks.append(int(ntok))
    return torch.stack(out), torch.tensor(losses), torch.tensor(ntoks, dtype=torch.float64)


def length_chunks(lengths: torch.Tensor, max_rows: int = 16, waste: float = 0.25):
    """Row groups, longest first, each padded at most ``waste`` beyond its real tokens."""
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    chunks: list[list[int]] = []
    for i in order:
        cur = chunks[-1] if chunks else None
        if cur is not None and len(cur) < max_rows:
            width = int(lengths[cur[0]])
            real = sum(int(lengths[j]) for j in cur) + int(lengths[i])
            if (len(cur) + 1) * width <= (1 + waste) * real:
                cur.append(i)
                continue
        chunks.append([i])
    return [torch.tensor(c, dtype=torch.long) for c in chunks]


def grads_hooks(model, batch, params, device, max_rows: int = 16):
    """Per-example gradients of every LoRA matrix from batched backward passes.

    Examples do not interact (right padding, causal attention), so one backward
    of the summed per-example losses gives each example its own gradient at
    every LoRA module's output; the per-example weight gradient is the outer
    product of that output gradient with the module's input, summed over the
    example's tokens. Chunks are formed by length to limit padding (on a CPU the
    padded tokens cost as much as real ones)."""
    model.eval()
    by_param = {id(p): j for j, p in enumerate(params)}
    modules = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and id(m.weight) in by_param and m.bias is None
    ]
    if len(modules) != len(params):
        raise RuntimeError("every trainable parameter must be a bias-free Linear weight")
    n = len(batch["input_ids"])
    sizes = [p.numel() for p in params]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    G = torch.empty(n, offsets[-1])
    losses = torch.empty(n)
    ntoks = torch.empty(n, dtype=torch.float64)
    lengths = batch["attention_mask"].sum(1)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod, inputs, output):
        seen[id(mod)] = (inputs[0], output)

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        for part in length_chunks(lengths, max_rows):
            width = int(lengths[part].max())
            ids = batch["input_ids"][part, :width].to(device)
            am = batch["attention_mask"][part, :width].to(device)
            lab = batch["labels"][part, :width].to(device)
            seen.clear()
            loss, ntok = label_losses(model, ids, am, lab)
            outs = [seen[id(m)][1] for m in modules]
            gys = torch.autograd.grad(loss.sum(), outs)
            for m, gy in zip(modules, gys):
                x = seen[id(m)][0].detach().float()
                g = torch.einsum("bto,bti->boi", gy.float(), x)  # [b, out, in] = weight shape
                j = by_param[id(m.weight)]
                G[part, offsets[j] : offsets[j + 1]] = g.reshape(len(part), -1).cpu()
            losses[part] = loss.detach().float().cpu()
            ntoks[part] = ntok.double().cpu()
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    return G, losses, ntoks


def batch_gradient_autograd(model, batch, params, device) -> torch.Tensor:
    """The training loss's gradient (token-level mean over the batch), for a check
    of the per-example assembly and the token weighting."""
    model.eval()
    ids = batch["input_ids"].to(device)
    am = batch["attention_mask"].to(device)
    lab = batch["labels"].to(device)
    loss, ntok = label_losses(model, ids, am, lab)
    total = (loss * ntok).sum() / ntok.sum()
    grads = torch.autograd.grad(total, params)
    return torch.cat([g.reshape(-1) for g in grads]).float().cpu()


# --------------------------------------------------------------------------- errors


def mixing(ntok: torch.Tensor, index, weights=None, n: int | None = None) -> torch.Tensor:
    """The [n] vector a with g_coreset = sum_i a_i g_i (training's token weighting)."""
    n = len(ntok) if n is None else n
    a = torch.zeros(n, dtype=torch.float64)
    idx = torch.as_tensor(index, dtype=torch.long)
    w = torch.ones(len(idx), dtype=torch.float64) if weights is None else weights.double()
    a[idx] = w * ntok[idx]
    s = a.sum()
    return a / s if s > 0 else a


def rel_errors(K: torch.Tensor, A: torch.Tensor, a_ref: torch.Tensor) -> torch.Tensor:
    """||G'(A_r - a_ref)|| / ||G' a_ref|| for every row A_r, from the Gram matrix K = G G'."""
    D = A - a_ref
    num = ((D @ K) * D).sum(1).clamp(min=0).sqrt()
    den = float(a_ref @ K @ a_ref) ** 0.5
    return num / den if den > 0 else num


def random_stratified(groups: dict[str, list[int]], counts: dict[str, int], R: int, gen):
    """R index sets with counts[s] examples of each source s, drawn uniformly."""
    sets = []
    for _ in range(R):
        idx: list[int] = []
        for s, ix in groups.items():
            c = counts.get(s, 0)
            if c >= len(ix):
                idx += ix
            elif c > 0:
                pick = torch.randperm(len(ix), generator=gen)[:c]
                idx += [ix[int(j)] for j in pick]
        sets.append(sorted(idx))
    return sets


def percentile(value: float, dist: torch.Tensor) -> float:
    """% of ``dist`` below ``value`` (ties count half)."""
    below = float((dist < value).double().mean())
    tied = float((dist == value).double().mean())
    return 100 * (below + tied / 2)


# --------------------------------------------------------------------------- (e) Spearman


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank."""
    vals, order = torch.sort(x, stable=True)
    _, inv, counts = torch.unique_consecutive(vals, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() + 1) / 2
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = avg[inv]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = rankdata(a.double()), rankdata(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else float("nan")


def _upper(d: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(len(d), len(d), 1)
    return d[i, j]


# --------------------------------------------------------------------------- selectors


FEATURE_KINDS = {
    "zo1": {"feature": "zo", "num_directions": 1},
    "zo8": {"feature": "zo", "num_directions": 8},
    "exact": {"feature": "exact"},
}
MOMENT_KINDS = {"fresh": "fresh", "warm": "warm", "opt": "optimizer", "raw": None}
REFERENCE = "colm_zo1_fresh"  # the paper's selector
PAIRED_WITH = "random_big"


def variant_specs(args) -> tuple[list[tuple[str, dict]], list[str]]:
    """(name, SelectorConfig kwargs) of every variant.

    ``{colm,match}_{zo1,zo8,exact}_{fresh,warm,opt}``: facility location (colm) or
    gradient matching (match) per source on zeroth-order (1 or 8 directions) or exact
    value-block gradients, Adam-normalised with the selector's own moments from zero
    (fresh, the paper's), from the batch's statistics (warm) or with the training
    optimizer's Adam state (opt), or not normalised (raw); uniform weights. ``colm_zo1_cluster`` (cluster-size
    weights), the paper's Table 2 ablations of ``colm_zo1_fresh`` (``ablate_*``),
    ``random_big`` (small sources kept, colm's budgets, big sources at random) and
    ``random`` (uniform over the batch).
    """
    specs: list[tuple[str, dict]] = []
    for method in ("colm", "match"):
        for ftag, feat in FEATURE_KINDS.items():
            for mtag, moments in MOMENT_KINDS.items():
                norm = {"moments": moments} if moments else {"adam": False}
                kw = {"method": method, **feat, **norm, "weights": "uniform"}
                specs.append((f"{method}_{ftag}_{mtag}", kw))
    zo1 = {"method": "colm", "feature": "zo", "num_directions": 1, "weights": "uniform"}
    specs += [
        ("colm_zo1_cluster", {**zo1, "weights": "cluster"}),
        ("ablate_no_adam", {**zo1, "adam": False}),
        ("ablate_joint", {**zo1, "per_source": False}),
        ("ablate_no_small", {**zo1, "small_sources": []}),
        ("random_big", {"method": "random_big"}),
        ("random", {"method": "random"}),
    ]
    if args.variants:
        wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
        specs = [(n, kw) for n, kw in specs if any(n.startswith(w) for w in wanted)]
    # the reference (budgets, random subsets' counts) and the paired baseline: always
    for name, kw in (
        (PAIRED_WITH, {"method": "random_big"}),
        (REFERENCE, {**zo1, "moments": "fresh"}),
    ):
        if not any(n == name for n, _ in specs):
            specs.insert(0, (name, kw))
    return specs, []


def state_key(kw: dict) -> tuple:
    return (
        kw.get("method"),
        kw.get("feature", "zo"),
        kw.get("num_directions", 1),
        kw.get("moments", "fresh") if kw.get("adam", True) else "raw",
    )


TRAIN_KEY = ("colm", "zo", 1, "fresh")  # the training selector's kind


def state_for(ctx, key: tuple):
    """A variant's own moments: its shadow's (with --shadow), else the training
    selector's if it is of the same kind, else none (fresh: zero; warm: the batch)."""
    state = ctx["states"].get(key)
    if state is None and key == TRAIN_KEY:
        state = ctx["states"].get(TRAIN_KEY)
    return state


def make_selector(args, kw, counts, state=None, seed=None, check_replay=False):
    """A selector of variant ``kw``; the replay check runs once per run (it is
    the same model and block for every variant)."""
    from colm.selector import CoresetSelector, SelectorConfig

    cfg = SelectorConfig(
        ratio=args.ratio,
        topk_dims=args.topk_dims,
        seed=args.seed if seed is None else seed,
        check_replay=check_replay,
        **kw,
    )
    sel = CoresetSelector(cfg, counts)
    if state is not None:  # the Adam moments of this kind of selector (copied)
        sel.normalizer.load_state_dict(
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        )
    return sel


def share_features(sel, store: dict) -> None:
    """Make ``sel`` reuse the features another variant of the same kind computed for the
    same rows of this batch (same seed: the same zo directions), instead of recomputing."""
    cfg = sel.config
    kind = (cfg.feature, cfg.num_directions if cfg.feature == "zo" else 0)
    compute = sel._feature_table

    def cached(model, batch, rows, b, info, stats):
        key = (kind, tuple(rows))
        if key not in store:
            t0 = time.perf_counter()
            store[key] = compute(model, batch, rows, b, info, stats)
            store[("seconds", *key)] = time.perf_counter() - t0
        return store[key]

    sel._feature_table = cached


# --------------------------------------------------------------------------- one batch


def progress(what: str, seconds: float) -> None:
    """A progress line on stderr (elapsed seconds of the phase so far)."""
    print(f"    .. {what} ({seconds:.1f} s)", file=sys.stderr, flush=True)


def measure_batch(ctx, batch, seed: int) -> dict[str, Any]:
    from colm.features import GradientFeatures, find_value_block, top_dims

    args, model, params, device = ctx["args"], ctx["model"], ctx["params"], ctx["device"]
    counts, small = ctx["counts"], ctx["small"]
    sources = list(batch["source"])
    n = len(sources)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sources):
        groups.setdefault(s, []).append(i)
    out: dict[str, Any] = {"n": n, "sources_in_batch": {s: len(ix) for s, ix in groups.items()}}
    timings: dict[str, float] = {}

    # (a) per-example gradients of all LoRA parameters, and the batch gradient
    t0 = time.perf_counter()
    if args.grad_method == "hooks":
        G, loss, ntok = grads_hooks(model, batch, params, device)
    else:
        G, loss, ntok = grads_loop(model, batch, params, device)
    timings["per_example_grads"] = time.perf_counter() - t0
    progress(f"per-example gradients {G.shape[0]} x {G.shape[1]}", timings["per_example_grads"])
    a_batch = mixing(ntok, list(range(n)))
    g_batch = (a_batch.float() @ G).double()
    checks: dict[str, float] = {}
    first = ctx.pop("check_pending", False)
    if first:  # once per run: the gradients are right
        m = min(args.check_examples, n)
        ref, _, _ = grads_loop(model, batch, params, device, rows=range(m))
        checks["per_example_vs_autograd_rel"] = float((G[:m] - ref).norm() / ref.norm())
        full = batch_gradient_autograd(model, batch, params, device).double()
        checks["batch_grad_vs_autograd_rel"] = float((g_batch - full).norm() / full.norm())
        vb = find_value_block(model)
        j = next(j for j, p in enumerate(params) if p is vb.parameter)
        off = sum(p.numel() for p in params[:j])
        shape = vb.parameter.shape
        block_grads = torch.stack(
            [vb.view(G[i, off : off + vb.parameter.numel()].reshape(shape)) for i in range(n)]
        )
        feats = GradientFeatures(model, chunk_size=n)
        model.eval()
        exact_vb = feats.compute(
            batch["input_ids"], batch["attention_mask"], batch["labels"], "exact"
        )
        checks["value_block_feature_vs_G_rel"] = float(
            (exact_vb.cpu() - block_grads.reshape(n, -1)).norm() / block_grads.norm()
        )
    out["checks"] = checks
    t0 = time.perf_counter()
    K = G.double() @ G.double().T
    timings["gram"] = time.perf_counter() - t0
    out["batch_grad_norm"] = float(a_batch @ K @ a_batch) ** 0.5

    def per_source(a_sel: torch.Tensor) -> dict[str, float]:
        """Each source's own error: its examples' part of the coreset vs of the batch."""
        res = {}
        for s, ix in groups.items():
            ref = torch.zeros(n, dtype=torch.float64)
            ref[ix] = ntok[ix] / ntok[ix].sum()
            part = torch.zeros(n, dtype=torch.float64)
            part[ix] = a_sel[ix]
            if part.sum() <= 0:
                res[s] = 1.0  # source missing from the coreset: its gradient is 0
                continue
            part = part / part.sum()
            res[s] = float(rel_errors(K, part[None], ref)[0])
        return res

    # (b) selector variants (features computed once per kind and shared)
    methods: dict[str, Any] = {}
    t0 = time.perf_counter()
    store: dict = {}
    checked = False
    for name, kw in ctx["specs"]:
        sel = make_selector(
            args,
            kw,
            counts,
            state_for(ctx, state_key(kw)),
            seed=seed,
            check_replay=first and not checked and kw["method"] != "random",
        )
        checked = checked or (first and kw["method"] not in ("random", "random_big"))
        share_features(sel, store)
        selection = sel.select(model, batch, optimizer=ctx["optimizer"])
        idx, w = selection.indices, selection.weights
        kind = (sel.config.feature, sel.config.num_directions if sel.config.feature == "zo" else 0)
        seconds = [v for k, v in store.items() if k[0] == "seconds" and k[1] == kind]
        a = mixing(ntok, idx, w, n)
        err = float(rel_errors(K, a[None], a_batch)[0])
        progress(f"selector {name}: error {err:.4f}", time.perf_counter() - t0)
        picked_big = [int(i) for i in idx if sources[int(i)] not in small]
        all_big = [i for i in range(n) if sources[i] not in small]
        lengths = batch["attention_mask"].sum(1).double()

        def mean_of(v, ix):
            return float(v[ix].double().mean()) if ix else float("nan")

        methods[name] = {
            "indices": idx.tolist(),
            "weights": w.tolist(),
            "rel_error": err,
            "per_source": per_source(a),
            "selected_per_source": {
                s: sum(1 for i in idx.tolist() if sources[i] == s) for s in groups
            },
            "describe": {
                "loss_picked_big": mean_of(loss, picked_big),
                "loss_all_big": mean_of(loss, all_big),
                "length_picked_big": mean_of(lengths, picked_big),
                "length_all_big": mean_of(lengths, all_big),
                "label_tokens_picked_big": mean_of(ntok, picked_big),
                "label_tokens_all_big": mean_of(ntok, all_big),
                "share_coreset": {
                    s: sum(1 for i in idx.tolist() if sources[i] == s) / len(idx) for s in groups
                },
                "share_batch": {s: len(ix) / n for s, ix in groups.items()},
            },
            # the feature pass as this variant would pay it (computed once, shared)
            "time_features": sum(seconds) if kw["method"] not in ("random", "random_big") else 0.0,
            "time_selection": selection.stats.get("time_selection", 0.0),
        }
    timings["selectors"] = time.perf_counter() - t0

    # oracle: gradient matching on the exact full-LoRA gradients (same budgets)
    from colm.matching import gradient_match

    ref_counts = methods[REFERENCE]["selected_per_source"]
    for wmode in ("uniform", "fit"):
        idx, wts = [], []
        for s, ix in groups.items():
            c = ref_counts.get(s, 0)
            if s in small or c >= len(ix):
                idx += ix[:c] if c < len(ix) else ix
                wts += [1.0] * min(c, len(ix))
            elif c > 0:
                r = gradient_match(G[ix], c, wmode)
                idx += [ix[int(j)] for j in r.indices]
                # as the selector's conventions: uniform = weight 1 per pick (like
                # colm uniform); fit = each pick stands for weights[i] examples
                # (sum = the source's count, like cluster weights)
                wts += [1.0] * c if wmode == "uniform" else r.weights.tolist()
        order = sorted(range(len(idx)), key=lambda t: idx[t])
        idx = [idx[t] for t in order]
        wt = torch.tensor([wts[t] for t in order], dtype=torch.float64)
        a = mixing(ntok, idx, wt, n)
        methods[f"oracle_match_fullgrad_{wmode}"] = {
            "indices": idx,
            "weights": wt.tolist(),
            "rel_error": float(rel_errors(K, a[None], a_batch)[0]),
            "per_source": per_source(a),
        }

    # (c) random stratified subsets with colm's per-source counts
    gen = torch.Generator().manual_seed(seed + 7)
    sets = random_stratified(groups, ref_counts, args.random_subsets, gen)
    A = torch.stack([mixing(ntok, s_, None, n) for s_ in sets])
    rand_err = rel_errors(K, A, a_batch)
    out["random_subsets"] = {
        "errors": rand_err.tolist(),
        "median": float(rand_err.median()),
        "p10": float(rand_err.quantile(0.1)),
        "p90": float(rand_err.quantile(0.9)),
    }
    rand_src: dict[str, torch.Tensor] = {}
    for s, ix in groups.items():
        if s in small:
            continue
        ref = torch.zeros(n, dtype=torch.float64)
        ref[ix] = ntok[ix] / ntok[ix].sum()
        P = torch.zeros_like(A)
        P[:, ix] = A[:, ix]
        P = P / P.sum(1, keepdim=True).clamp(min=1e-300)
        rand_src[s] = rel_errors(K, P, ref)
    out["random_subsets"]["per_source_median"] = {s: float(v.median()) for s, v in rand_src.items()}
    for m in methods.values():
        m["percentile"] = percentile(m["rel_error"], rand_err)
        m["per_source_percentile"] = {
            s: percentile(m["per_source"][s], v) for s, v in rand_src.items()
        }
    out["methods"] = methods

    # (e) distances of the features (as computed for the selectors above) vs distances of
    # the full-LoRA gradients, within each big source
    from colm.features import adam_features, batch_moments, find_value_block, optimizer_moments

    t0 = time.perf_counter()
    spear: dict[str, Any] = {}
    opt_m = optimizer_moments(ctx["optimizer"], find_value_block(model))
    for tag, feat in FEATURE_KINDS.items():
        kind = (feat["feature"], feat.get("num_directions", 0) if feat["feature"] == "zo" else 0)
        entries = [(k[1], v) for k, v in store.items() if k[0] == kind]
        if not entries:
            continue
        rows, table = max(entries, key=lambda e: len(e[0]))
        raw = table.g.cpu().float()  # a DenseFeatures: LoRA blocks are never streamed
        pos = {r: t for t, r in enumerate(rows)}
        views = {
            "raw_l1": raw,
            "warm_l1": adam_features(raw, batch_moments(raw, 0.9, 0.999, 1e-8)),
            "opt_l1": adam_features(raw, opt_m) if opt_m is not None else None,
        }
        pooled: dict[str, list[torch.Tensor]] = {k: [] for k in (*views, "raw_l2", "ref")}
        for s_, ix in groups.items():
            ix = [i for i in ix if i in pos]
            if s_ in small or len(ix) < 3:
                continue
            r = [pos[i] for i in ix]
            pooled["ref"].append(_upper(torch.cdist(G[ix].double(), G[ix].double())))
            pooled["raw_l2"].append(_upper(torch.cdist(raw[r].double(), raw[r].double())))
            for k_, f in views.items():
                if f is not None:
                    fs = f[r]
                    fs = fs[:, top_dims(fs, args.topk_dims)] if k_ != "raw_l1" else fs
                    pooled[k_].append(_upper(torch.cdist(fs.double(), fs.double(), p=1)))
        entry: dict[str, Any] = {}
        if pooled["ref"]:
            ref = torch.cat(pooled["ref"])
            for k_, parts in pooled.items():
                if k_ != "ref" and parts:
                    entry[k_] = spearman(torch.cat(parts), ref)
            entry["pairs"] = int(ref.numel())
        spear[tag] = entry
    out["spearman"] = spear
    timings["spearman"] = time.perf_counter() - t0
    progress("features for Spearman", timings["spearman"])
    out["timings"] = timings
    out["loss_mean"] = float(loss.mean())
    return out


# --------------------------------------------------------------------------- training


def train_steps(ctx, stream, steps: int, log: list) -> None:
    from colm.integrations.loop import coreset_step

    args, model = ctx["args"], ctx["model"]
    for _ in range(steps):
        batch = stream.next()
        t0 = time.perf_counter()
        for key, shadow in ctx["shadows"].items():  # selection only, for their moments
            shadow.select(model, batch, optimizer=ctx["optimizer"])
            ctx["states"][key] = shadow.normalizer.state_dict()
        res = coreset_step(
            model, ctx["optimizer"], ctx["train_selector"], batch, micro_batches=args.micro_batches
        )
        ctx["states"][TRAIN_KEY] = ctx["train_selector"].normalizer.state_dict()
        ctx["step"] += 1
        log.append({"step": ctx["step"], "loss": res.loss, "time": time.perf_counter() - t0})
        print(
            f"  train step {ctx['step']}: loss {res.loss:.4f} ({log[-1]['time']:.1f} s)", flush=True
        )


# --------------------------------------------------------------------------- report


def _med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def summarise(batches: list[dict], small: set[str]) -> dict[str, Any]:
    """Per variant over ``batches`` (batch-points): median error and percentile, the share
    of batch-points below the 50th percentile with a one-sided sign test against chance,
    and the paired difference from random_big on the same batches (error and percentile)."""
    from stats import paired_ci, sign_test_below

    names = [n for n in batches[0]["methods"] if all(n in b["methods"] for b in batches)]
    summary: dict[str, Any] = {"methods": {}, "batch_points": len(batches)}
    for name in names:
        ms = [b["methods"][name] for b in batches]
        pct = [m.get("percentile", float("nan")) for m in ms]
        small_err = [e for m in ms for s, e in m["per_source"].items() if s in small]
        big_err = [e for m in ms for s, e in m["per_source"].items() if s not in small]
        row = {
            "median_rel_error": _med([m["rel_error"] for m in ms]),
            "median_percentile": _med(pct),
            "below_50": sum(p < 50 for p in pct) / len(pct),
            "sign_test": sign_test_below(pct),
            "median_big_source_error": _med(big_err),
            "max_small_source_error": max(small_err) if small_err else float("nan"),
            "time_features": _med([m.get("time_features", float("nan")) for m in ms]),
        }
        if PAIRED_WITH in batches[0]["methods"] and name != PAIRED_WITH:
            ref = [b["methods"][PAIRED_WITH] for b in batches]
            row["vs_random_big_error"] = paired_ci(
                [m["rel_error"] - r["rel_error"] for m, r in zip(ms, ref)]
            )
            row["vs_random_big_percentile"] = paired_ci(
                [m["percentile"] - r["percentile"] for m, r in zip(ms, ref)]
            )
        summary["methods"][name] = row
    summary["random_median_rel_error"] = _med([b["random_subsets"]["median"] for b in batches])
    sp: dict[str, dict[str, float]] = {}
    for tag in FEATURE_KINDS:
        entries = [b.get("spearman", {}).get(tag, {}) for b in batches]
        keys = sorted({k for e in entries for k in e if k != "pairs"})
        if keys:
            sp[tag] = {k: _med([e.get(k, float("nan")) for e in entries]) for k in keys}
    summary["spearman"] = sp
    return summary


def _f(x: float, fmt: str = ".4f") -> str:
    return "-" if x != x else format(x, fmt)


def markdown_table(title: str, summary: dict) -> str:
    """One table: a row per variant, lower percentile is better, 50 is chance."""
    from stats import fmt_ci

    nb = summary["batch_points"]
    lines = [
        f"### {title} ({nb} batch-points)",
        "",
        f"Random stratified subsets: median relative error "
        f"{summary['random_median_rel_error']:.4f}. Percentile: share of random stratified "
        "subsets with a lower error (lower is better, 50 is chance); sign test: one-sided, "
        "that the variant lands below 50 more often than chance; paired: variant minus "
        f"{PAIRED_WITH} on the same batches, mean [95% CI].",
        "",
        "| variant | error | percentile | below 50 | sign test p | − random_big, error "
        "| − random_big, percentile | features (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary["methods"].items():
        st = m["sign_test"]
        lines.append(
            f"| {name} | {_f(m['median_rel_error'])} | {_f(m['median_percentile'], '.1f')} | "
            f"{st['below']}/{st['n']} | {st['p']:.3g} | "
            f"{fmt_ci(m.get('vs_random_big_error') or {}, 4)} | "
            f"{fmt_ci(m.get('vs_random_big_percentile') or {}, 1)} | "
            f"{_f(m['time_features'], '.1f')} |"
        )
    if summary["spearman"]:
        lines += [
            "",
            "Spearman correlation of feature distances with full-LoRA gradient distances "
            "(within big sources; medians over batch-points): raw L1 / L2, and L1 after Adam "
            "normalisation with the batch's statistics (warm) or the optimizer's state (opt), "
            "on the top-h coordinates:",
            "",
            "| features | raw L1 | raw L2 | warm L1 | opt L1 |",
            "|---|---:|---:|---:|---:|",
        ]
        for tag, v in summary["spearman"].items():
            cells = [
                _f(v.get(k, float("nan")), ".3f") for k in ("raw_l1", "raw_l2", "warm_l1", "opt_l1")
            ]
            lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Every variant's percentile at every batch-point, one panel per training point."""
    from matplotlib.figure import Figure

    points = result["points"]
    fig = Figure(figsize=(max(8, 0.45 * len(result["variants"]) + 3), 3.6 * len(points)), dpi=110)
    axes = fig.subplots(len(points), 1, squeeze=False)
    for ax, point in zip(axes[:, 0], points):
        names = list(point["summary"]["methods"])
        for j, name in enumerate(names):
            ys = [b["methods"][name].get("percentile", float("nan")) for b in point["batches"]]
            ax.scatter([j] * len(ys), ys, s=10, alpha=0.6)
            ax.plot([j - 0.3, j + 0.3], [_med(ys)] * 2, color="k", lw=1.5)
        ax.axhline(50, color="0.5", ls="--", lw=1)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("percentile (lower = better)")
        ax.set_title(f"step {point['step']}: {len(point['batches'])} batches")
        ax.set_ylim(-2, 102)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- main


def settings_key(args, model_name: str) -> dict[str, Any]:
    """What a cached batch-point's numbers depend on (the variants aside)."""
    keep = (
        "quick",
        "source_batch",
        "ratio",
        "random_subsets",
        "lr",
        "max_length",
        "topk_dims",
        "micro_batches",
        "grad_method",
        "shadow",
        "seed",
        "device",
    )
    return {"model": model_name, **{k: getattr(args, k) for k in keep}}


def _slim(res: dict[str, Any]) -> dict[str, Any]:
    """A batch-point's record without the random subsets' raw errors (quantiles stay)."""
    out = dict(res)
    out["random_subsets"] = {k: v for k, v in res["random_subsets"].items() if k != "errors"}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    from colm.data import CoLMCollator, source_counts
    from colm.selector import CoresetSelector, SelectorConfig
    from colm.sources import find_small_sources

    model, tokenizer, examples, report, model_name = setup(args)
    counts = source_counts(examples)
    small = find_small_sources(counts, "below_mean")
    params = [p for p in model.parameters() if p.requires_grad]
    specs, notes = variant_specs(args)
    names = [n for n, _ in specs]
    print(
        f"# gradient matching: {model_name}, LoRA r=8 (q,v), {sum(p.numel() for p in params)} "
        f"trainable numbers; {len(examples)} examples, small sources {sorted(small)}; "
        f"source batch {args.source_batch}, ratio {args.ratio}, points {args.point_list}",
        flush=True,
    )
    key = settings_key(args, model_name)
    args.cache.mkdir(parents=True, exist_ok=True)

    def cached(step: int, b: int) -> dict | None:
        path = args.cache / f"step{step}-batch{b}.json"
        if args.force or not path.exists():
            return None
        rec = json.loads(path.read_text())
        if rec.get("settings") != key or not set(names) <= set(rec["result"]["methods"]):
            return None
        return rec["result"]

    todo = {
        (step, b)
        for step in args.point_list
        for b in range(args.batches)
        if cached(step, b) is None
    }
    train_selector = CoresetSelector(
        SelectorConfig(ratio=args.ratio, topk_dims=args.topk_dims, seed=args.seed), counts
    )
    shadows = {}
    if args.shadow:
        for _, kw in specs:
            skey = state_key(kw)
            if kw["method"].startswith("random") or skey == TRAIN_KEY or skey in shadows:
                continue
            shadows[skey] = make_selector(args, kw, counts, seed=args.seed + 1)
    ctx: dict[str, Any] = {
        "args": args,
        "model": model,
        "params": params,
        "device": args.device,
        "counts": counts,
        "small": small,
        "specs": specs,
        "states": {},
        "shadows": shadows,
        "train_selector": train_selector,
        "optimizer": torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
        "step": 0,
        "check_pending": True,
    }
    collator = CoLMCollator(tokenizer)
    train_stream = BatchStream(examples, collator, args.source_batch, args.seed + 1)
    points, train_log = [], []
    last_needed = max((step for step, _ in todo), default=-1)
    for step in args.point_list:
        if step > last_needed:
            batches = [cached(step, b) for b in range(args.batches)]
            points.append({"step": step, "batches": batches})
            continue
        if step > ctx["step"]:
            print(f"training {step - ctx['step']} steps ...", flush=True)
            train_steps(ctx, train_stream, step - ctx["step"], train_log)
        # the measured batches of a point are the same whatever else was measured before
        measure_stream = BatchStream(examples, collator, args.source_batch, args.seed + 2 + step)
        batches = []
        for b in range(args.batches):
            batch = measure_stream.next()
            res = cached(step, b)
            if res is None:
                t0 = time.perf_counter()
                res = _slim(measure_batch(ctx, batch, seed=args.seed * 100_003 + step * 1000 + b))
                res["time"] = time.perf_counter() - t0
                (args.cache / f"step{step}-batch{b}.json").write_text(
                    json.dumps({"settings": key, "result": res})
                )
                m = res["methods"][REFERENCE]
                print(
                    f"  step {step} batch {b}: {REFERENCE} error {m['rel_error']:.4f} "
                    f"(percentile {m['percentile']:.1f}), random median "
                    f"{res['random_subsets']['median']:.4f} ({res['time']:.1f} s: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in res["timings"].items())
                    + ")",
                    flush=True,
                )
            batches.append(res)
        points.append({"step": step, "batches": batches})
    for point in points:
        point["summary"] = summarise(point["batches"], small)
    pooled = summarise([b for p in points for b in p["batches"]], small)
    md = [
        f"## Gradient matching: {model_name}, source batch {args.source_batch} -> coreset "
        f"ratio {args.ratio}, {args.max_length} tokens, {args.random_subsets} random "
        f"stratified subsets per batch",
        "",
        markdown_table(f"All points (steps {', '.join(str(p['step']) for p in points)})", pooled),
    ]
    md += [markdown_table(f"Step {p['step']}", p["summary"]) for p in points]
    text = "\n".join(md)
    print(text)

    elapsed = time.perf_counter() - t_start
    result = {
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "device": args.device,
        },
        "model": model_name,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "settings": key,
        "gradient_target": (
            "token-weighted: g_batch = sum_i n_i g_i / sum_i n_i, g_i = gradient of example "
            "i's mean label-token loss, n_i its label tokens (the training loss's gradient)"
        ),
        "percentile_meaning": "% of random stratified subsets with a lower error; lower = better",
        "source_counts": counts,
        "small_sources": sorted(small),
        "tokenization": report.as_dict(),
        "variants": names,
        "variant_notes": {
            "fresh": "the selector's own moments: the training selector's (colm_zo1_fresh, "
            "the kind that trains), else zero at every measurement unless --shadow",
            "warm": "the selector's own moments started from the batch's statistics (with "
            "no --shadow: the measured batch's own statistics)",
            "opt": "the training optimizer's Adam state of the value block (the batch's "
            "statistics before its first step)",
            "random": "uniform over the whole batch (small sources not kept)",
            "oracle_match_fullgrad_*": "gradient_match on the exact full-LoRA gradients, "
            "colm's per-source budgets, small sources kept (not a selector: needs every "
            "example's full gradient)",
        },
        "train_log": train_log,
        "pooled": pooled,
        "points": points,
        "elapsed_s": elapsed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(text)
    png = args.out.with_suffix(".png")
    plot(result, png)
    checks = {k: v for p in points for b in p["batches"] for k, v in b["checks"].items()}
    print(f"\nchecks: {json.dumps(checks)}")
    print(f"wrote {args.out}, its .md and {png} in {elapsed:.1f} s", flush=True)
    return result


if __name__ == "__main__":
    main()
