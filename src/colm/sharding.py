"""Gradient features of a sharded model: FSDP2 (``fully_shard``), DeepSpeed ZeRO-3, and
why not FSDP1.

Under FSDP2 every rank holds a shard of each parameter (a ``DTensor``) and a
wrapped module gathers its parameters in its forward pre-hook and frees them
after. Under ZeRO-3 every rank holds a partition of each parameter (the
parameter's own ``data`` is empty) and DeepSpeed gathers a module's parameters in
hooks around the forward of every module. Selection needs whole tensors of only
three parts of the model: the last transformer block, the final norm and the LM
head (the replay of :mod:`colm.features.replay`). So:

- the trunk pass that captures the last block's inputs runs through the sharded
  model as usual. Under FSDP2 it is stopped before the last block gathers
  anything, and FSDP's per-iteration state is then reset
  (``FSDPModule.reset_iter_state``), as after any forward that ended in an
  exception. Under ZeRO-3 it runs to the end (DeepSpeed's hooks keep no state
  that a stopped forward could be reset from), with the logits of one position
  only where the model takes ``logits_to_keep``;
- :func:`full_tensors` gathers the whole parameters and buffers of those three
  parts (one all-gather per sharded tensor: ``DTensor.full_tensor`` under FSDP2,
  ``deepspeed.zero.GatheredParameters`` under ZeRO-3, copied out before DeepSpeed
  partitions them again), once per selection step; the replay holds them while it
  computes the step's features and drops them after, so they are freed: the rest
  of the model is never gathered by selection;
- the replay calls those modules' ``forward`` directly (:func:`call_unhooked`), so
  FSDP's hooks, which would gather again and reduce gradients, never run in it;
  under ZeRO-3, DeepSpeed's hooks on the modules inside them are suspended for the
  replay too.

Every all-gather is a collective: all ranks must make the same calls in the
same order. The selector makes sure of it by giving every rank the same number
of rows to compute (:func:`even_share`), so all ranks run the same trunk passes
and gather the same tensors, whatever their share of the batch.

FSDP1 (``FullyShardedDataParallel``, which accelerate configures for the
Trainer by default) keeps parameters in flat buffers whose shards are views, and
is refused with a message naming what works (:func:`refuse_unsupported`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

FSDP2 = "fsdp2"
FSDP1 = "fsdp1"
ZERO3 = "zero3"

# what works, for the messages that refuse the other sharding modes
_WHAT_WORKS = (
    "colm's gradient features work with FSDP2 (torch.distributed.fsdp.fully_shard on each "
    "decoder layer, then on the model), DDP and DeepSpeed ZeRO-1/2/3; with any sharding, "
    "method='random' and 'random_big' need no features"
)


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" or (
        isinstance(getattr(t, "data", None), torch.Tensor) and type(t.data).__name__ == "DTensor"
    )


def tensor_sharding(t: torch.Tensor) -> str | None:
    """How one parameter is sharded: ``"fsdp2"`` (a DTensor), ``"zero3"`` (a DeepSpeed
    ZeRO-3 partitioned parameter), ``"fsdp1"`` (FSDP1's flat parameter sharded away or
    a view of one), or None (a whole tensor)."""
    if is_zero3(t):
        return ZERO3
    if _is_dtensor(t):
        return FSDP2
    if getattr(t, "_is_flat_param", False) or t.numel() == 0:
        return FSDP1
    return None


def model_sharding(model: nn.Module) -> str | None:
    """How ``model`` is sharded (see :func:`tensor_sharding`), from its modules and
    parameters; None when it is not (plain, DDP, DeepSpeed ZeRO-1/2)."""
    for module in model.modules():
        kind = type(module).__name__
        if kind == "FullyShardedDataParallel":
            return FSDP1
        if _is_fsdp_module(module):
            return FSDP2
    for p in model.parameters():
        kind = tensor_sharding(p)
        # an empty parameter alone does not make a model FSDP1 (its modules would)
        if kind is not None and (kind != FSDP1 or getattr(p, "_is_flat_param", False)):
            return kind
    return None


def refuse_unsupported(kind: str | None, name: str) -> None:
    """Raise for the sharding mode whose parameters colm does not gather for the
    replay (FSDP1), saying why and what works instead."""
    from .features.locate import BlockNotFoundError

    if kind == FSDP1:
        raise BlockNotFoundError(
            f"{name} is sharded across processes by FSDP1 (FullyShardedDataParallel, the FSDP "
            "that accelerate and the Trainer use unless told fsdp_version=2): FSDP1 keeps "
            "parameters in flat buffers, and colm gathers the last block, final norm and head "
            "for its replay only from FSDP2's per-parameter shards and DeepSpeed ZeRO-3's "
            "partitions. " + _WHAT_WORKS
        )


def is_zero3(t: Any) -> bool:
    """``t`` is a parameter partitioned by DeepSpeed ZeRO-3."""
    return hasattr(t, "ds_numel") or hasattr(t, "ds_id")


def logical_shape(t: torch.Tensor) -> torch.Size:
    """The shape of the whole tensor: a ZeRO-3 parameter's own ``data`` is empty
    between DeepSpeed's gathers (its whole shape is ``ds_shape``); a DTensor's
    ``shape`` is the whole one already."""
    shape = getattr(t, "ds_shape", None)
    return torch.Size(shape) if shape is not None else t.shape


def check_replayable(modules: Sequence[nn.Module | None], dora: bool) -> None:
    """Under FSDP2 the replayed modules (last block, final norm, head) must each be
    inside one FSDP unit: a unit wrapped around part of them would gather in the
    replay, on some ranks only. On any sharded model (FSDP2, ZeRO-3) DoRA (``dora``)
    is refused: the replay reads its weight norm from the module itself, outside the
    functional call."""
    from .features.locate import BlockNotFoundError

    for module in modules:
        if module is None:
            continue
        for name, sub in module.named_modules():
            if name and _is_fsdp_module(sub):
                raise BlockNotFoundError(
                    f"{type(sub).__name__} {name!r} inside {type(module).__name__} is wrapped "
                    "by fully_shard on its own; colm gathers the last decoder layer, the "
                    "final norm and the LM head whole: apply fully_shard to whole decoder "
                    "layers (and the model), not to modules inside them"
                )
    if dora:
        raise BlockNotFoundError(
            "DoRA (LoraConfig(use_dora=True)) is not supported on a model sharded by FSDP2 or "
            "ZeRO-3: colm's replay reads DoRA's weight norm from the module itself. Use plain LoRA "
            "on a sharded model, or DoRA under DDP"
        )


def _is_fsdp_module(module: nn.Module) -> bool:
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


def full(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a DTensor all-gathered, a ZeRO-3 parameter gathered and copied out
    (collectives: every rank must call it), else ``t`` itself."""
    if _is_dtensor(t):
        return t.full_tensor()
    if is_zero3(t):
        return _zero3_copies([("t", t)])["t"]
    return t


def full_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name, whole and detached, in memory
    of their own, for ``functional_call``. A collective under FSDP2 and ZeRO-3: every
    rank must call it with the same modules in the same order. A parameter held
    unsharded at the time (by FSDP after a forward, or a ZeRO-3 parameter DeepSpeed
    keeps whole) is copied: it is freed or partitioned again later."""
    named = list(itertools.chain(module.named_parameters(), module.named_buffers()))
    zero3 = [(name, t) for name, t in named if is_zero3(t)]
    whole = _zero3_copies(zero3) if zero3 else {}
    for name, t in named:
        if name not in whole:
            whole[name] = t.detach().full_tensor() if _is_dtensor(t) else t.detach().clone()
    return {name: whole[name] for name, _ in named}


def _zero3_copies(named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Copies of ZeRO-3 parameters, whole: gathered together by DeepSpeed (one
    collective for all of them), copied, then partitioned again on leaving."""
    import deepspeed

    params = [t for _, t in named]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {name: t.detach().clone() for name, t in named}


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes held by ``tensors`` (what one rank gathered)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _Direct(nn.Module):
    """Calls ``inner.forward`` itself, not ``inner(...)``: FSDP's forward hooks on
    ``inner`` (gather, reshard, backward registration) do not run."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(*args, **kwargs)


def call_unhooked(
    module: nn.Module,
    weights: dict[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """``functional_call(module, weights, args, kwargs)`` without ``module``'s own
    forward hooks (FSDP2's) and without DeepSpeed's hooks on any module inside it
    (ZeRO-3's, which would gather the partitions again). ``weights`` must hold every
    parameter and buffer of ``module`` that the forward reads, whole (see
    :func:`full_tensors`); other hooks of modules inside it still run."""
    direct = _Direct(module)
    prefixed = {f"inner.{k}": v for k, v in weights.items()}
    with _deepspeed_hooks_suspended(module):
        return functional_call(direct, prefixed, args, kwargs or {}, strict=False)


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _is_deepspeed_hook(hook: Any) -> bool:
    fn = getattr(hook, "__func__", hook)
    return str(getattr(fn, "__module__", "") or "").startswith("deepspeed")


@contextlib.contextmanager
def _deepspeed_hooks_suspended(module: nn.Module) -> Iterator[None]:
    """Within: the hooks DeepSpeed registered on ``module`` and the modules inside
    it are taken out (restored on leaving, in their order). A no-op without them."""
    taken: list[tuple[dict, dict]] = []
    for sub in module.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(sub, attr, None)
            if not hooks:
                continue
            ours = {k: h for k, h in hooks.items() if _is_deepspeed_hook(h)}
            if ours:
                taken.append((hooks, dict(hooks)))
                for k in ours:
                    del hooks[k]
    try:
        yield
    finally:
        for hooks, before in taken:
            hooks.clear()
            hooks.update(before)


def compute_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype FSDP2 computes ``module`` in under a ``MixedPrecisionPolicy`` with a
    ``param_dtype`` (e.g. bf16 for fp32 parameters), or None (the parameters' own)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None:
        return None
    policy = getattr(get_state(), "_mp_policy", None)
    return getattr(policy, "param_dtype", None)


def fsdp_root(model: nn.Module) -> nn.Module | None:
    """The outermost FSDP2 module of ``model`` (the one ``fully_shard`` was applied
    to last), or None."""
    return next((m for m in model.modules() if _is_fsdp_module(m)), None)


def end_interrupted_forward(model: nn.Module) -> None:
    """Reset FSDP2's per-iteration state after a forward that was stopped by an
    exception (the trunk pass of :meth:`LastBlockReplay.capture`): the units it
    gathered are resharded and the next forward starts clean. A no-op without FSDP2."""
    root = fsdp_root(model)
    if root is None:
        return
    reset = getattr(root, "reset_iter_state", None)
    if reset is not None:
        reset()
        return
    # torch before reset_iter_state: complete the root's forward as its post-hook would
    state = root._get_fsdp_state()
    state._post_forward(root, (), None)


def even_share(mine: list[int], rows: Sequence[int], world: int, streamed: bool) -> list[int]:
    """``mine`` padded with copies of a row to ``ceil(len(rows) / world)`` rows, the
    largest share: under FSDP2 and ZeRO-3 every rank must run the same trunk passes, as
    each pass all-gathers the layers. The caller drops the features of the padding rows.
    ``streamed``: exact features streamed in several passes over chunks of different
    sizes per rank, which cannot be kept in step, and are refused."""
    if streamed:
        raise ValueError(
            "streamed exact features (the block's features exceed max_feature_mb) are not "
            "supported on a model sharded by FSDP2 or ZeRO-3: raise "
            "SelectorConfig.max_feature_mb, "
            "or use feature='zo', whose features are never streamed per rank"
        )
    size = -(-len(rows) // world)
    pad = mine[-1] if mine else rows[0]
    return list(mine) + [pad] * (size - len(mine))
