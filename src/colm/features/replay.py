"""Capture the last block's inputs once, then replay only the last block + head.

Selection needs per-example losses for several variations of one parameter
block of the last transformer block. Running the whole network for each would
cost a forward pass per variation; instead we run the trunk once without
gradients, stop at the input of the last block (hidden states plus whatever the
block is called with: attention mask, rotary embeddings, position ids), and
recompute only last block -> final norm -> LM head for each variation, with the
varied parameter passed functionally (``torch.func.functional_call``).

Per-example loss is the mean cross-entropy over that example's label tokens
(labels != -100, shifted as in causal LM training), never over the padded
width, and logits are only computed at those positions.

Precision. Zeroth-order features are central differences with eps ~ 1e-3:
the loss change they measure is far below bf16's resolution (8 bits of
mantissa), and in a bf16 replay they are noise (correlation -0.07 with the
exact directional derivative on SmolLM2-135M + LoRA). So when the last block,
final norm or head hold half-precision (bf16 / fp16) weights, the replay runs
in fp32, whatever the model's dtype and whatever autocast is active: the
captured inputs (hidden states, rotary cos/sin, float attention masks) are
upcast, the block and final norm run on fp32 copies of their parameters and
buffers, and the head is applied in fp32 one slab of vocabulary rows at a time.
Cost during selection: one fp32 copy of the last block and final norm (for
Llama-3-8B about 0.9 GB, 1/32 of the model at twice its bf16 size) plus a
64 MiB slab of the head, freed when the features are computed. fp32 models
are replayed as before, with no copies.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import sharding
from .locate import ValueBlock, _unwrap

IGNORE_INDEX = -100
# the dtype the replay computes in when the model's weights are half precision
COMPUTE_DTYPE = torch.float32
# bytes of the LM head upcast at a time (a slab of vocabulary rows)
HEAD_SLAB_BYTES = 64 * 2**20


class _StopForward(Exception):
    """Raised by the capture hook to end the trunk pass at the last block."""


@dataclass
class Captured:
    """Inputs of the last block for one chunk of examples, as the trunk produced
    them, and the autocast the trunk ran under (device type, dtype), if any."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    autocast: tuple[str, torch.dtype] | None = None
    _cast: dict[torch.dtype, tuple[tuple[Any, ...], dict[str, Any]]] = field(
        default_factory=dict, repr=False
    )

    def inputs(self, dtype: torch.dtype | None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) with floating tensors in ``dtype`` (None: as captured);
        cast once per dtype and kept, since every replay of the chunk reuses them."""
        if dtype is None:
            return self.args, self.kwargs
        if dtype not in self._cast:
            self._cast[dtype] = (_cast_floats(self.args, dtype), _cast_floats(self.kwargs, dtype))
        return self._cast[dtype]


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (also inside tuples, lists and
    dicts: rotary (cos, sin), masks per layer type) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _is_half(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.element_size() < 4


def _float_state(
    module: nn.Module, dtype: torch.dtype, whole: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Copies in ``dtype`` of ``module``'s floating parameters and buffers, by name
    relative to ``module`` (for ``functional_call``); detached, so selection never
    builds a graph into the real weights. ``whole``: the module's tensors gathered
    from a sharded model (:func:`colm.sharding.full_tensors`), used instead."""
    if whole is not None:
        state = dict(whole)
    else:
        state = dict(module.named_parameters(remove_duplicate=False))
        state.update(module.named_buffers(remove_duplicate=False))
    return {k: v.detach().to(dtype) for k, v in state.items() if v.is_floating_point()}


class _SlabLinear(torch.autograd.Function):
    """``x @ weight.T`` in ``x``'s dtype for a half-precision ``weight`` (the LM head),
    upcasting ``rows`` vocabulary rows at a time in forward and backward, so that
    no full fp32 copy of the head exists. No gradient for the weight: selection
    differentiates only the value block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.rows = rows
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for start in range(0, weight.shape[0], rows):
            out[..., start : start + rows] = x @ weight[start : start + rows].to(x.dtype).T
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        gx = None
        for start in range(0, weight.shape[0], ctx.rows):
            part = grad[..., start : start + ctx.rows] @ weight[start : start + ctx.rows].to(
                grad.dtype
            )
            gx = part if gx is None else gx + part
        return gx, None, None


class ReplayMismatchError(RuntimeError):
    """The replayed last block does not reproduce the full model's loss."""


def _final_norm(block: ValueBlock) -> nn.Module | None:
    """The module applied between the last block and the LM head: the first child
    registered after the block list that has parameters (final RMSNorm/LayerNorm)."""
    names = list(block.layers_parent._modules)
    after = names[names.index(block.layers_attr) + 1 :]
    for name in after:
        mod = block.layers_parent._modules[name]
        if mod is not None and any(True for _ in mod.parameters(recurse=True)):
            return mod
    return None


@contextmanager
def _no_checkpointing(layer: nn.Module) -> Iterator[None]:
    """Run the last block without gradient checkpointing (transformers'
    ``GradientCheckpointingLayer`` checkpoints when ``gradient_checkpointing`` and
    ``training`` are set). Checkpointing would save nothing here, as selection
    replays one block of one chunk; and reentrant checkpointing of a block whose
    inputs need no gradient returns outputs without a graph, so the exact
    features' backward would find nothing to differentiate."""
    if not getattr(layer, "gradient_checkpointing", False):
        yield
        return
    layer.gradient_checkpointing = False
    try:
        yield
    finally:
        layer.gradient_checkpointing = True


class LastBlockReplay:
    """Replays last block + final norm + LM head of a causal LM.

    >>> replay = LastBlockReplay(model, find_value_block(model))      # doctest: +SKIP
    >>> cap = replay.capture(input_ids, attention_mask)                 # doctest: +SKIP
    >>> losses = replay.losses(cap, labels)                             # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, block: ValueBlock):
        self.model = model
        self.block = block
        inner = _unwrap(model)
        get_head = getattr(inner, "get_output_embeddings", None)
        self.head = get_head() if get_head is not None else None
        if self.head is None:
            raise ReplayMismatchError(
                f"{type(inner).__name__} has no output embeddings (LM head); colm needs a causal LM"
            )
        self.norm = _final_norm(block)
        cfg = getattr(inner, "config", None)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
        self.logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite divides
        # FSDP2 / ZeRO-3: the replayed modules' parameters are shards; the replay gathers
        # them whole (see colm.sharding) and never runs FSDP's or DeepSpeed's hooks
        kind = sharding.model_sharding(model)
        self.sharded = kind in (sharding.FSDP2, sharding.ZERO3)
        self.zero3 = kind == sharding.ZERO3
        # the trunk pass under ZeRO-3 runs to the end: ask for one position's logits
        params = _forward_parameters(inner)
        self._trunk_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        if self.sharded:
            sharding.check_replayable(
                [block.layer, self.norm, self.head], dora=block._dora_layer() is not None
            )
        # the dtype FSDP2's MixedPrecisionPolicy computes in (None: the parameters')
        self.model_dtype = sharding.compute_dtype(block.layer) if self.sharded else None
        # fp32 replay for half-precision weights (see the module docstring); None: as is
        tensors = [*block.layer.parameters(), *block.layer.buffers(), *self.head.parameters()]
        if self.norm is not None:
            tensors += [*self.norm.parameters(), *self.norm.buffers()]
        half = any(map(_is_half, tensors)) or (
            self.model_dtype is not None and self.model_dtype.itemsize < 4
        )
        self.dtype: torch.dtype | None = COMPUTE_DTYPE if half else None
        if self.dtype is not None and "flash" in str(getattr(cfg, "_attn_implementation", "")):
            # flash-attention kernels take fp16 / bf16 only (transformers picks the
            # kernel's dtype from the block's weights, which would be fp32 copies)
            warnings.warn(
                f"{type(inner).__name__} uses {cfg._attn_implementation}, which computes in "
                "half precision only, so colm replays the last block in the model's dtype, "
                "where zeroth-order features are noisy; for fp32 selection load the model "
                "with attn_implementation='sdpa', or use SelectorConfig(feature='exact')",
                RuntimeWarning,
                stacklevel=3,
            )
            self.dtype = None
        self._state: dict[str, dict[str, torch.Tensor]] | None = None
        self._whole: dict[str, dict[str, torch.Tensor]] | None = None
        self._held = False
        self.gathered_bytes = 0  # bytes of whole tensors the last gather held (sharded)

    # -- precision -----------------------------------------------------------
    @contextmanager
    def upcast(self) -> Iterator[None]:
        """Hold what the replays inside (one selection step's chunks) compute with,
        instead of making it per replay: the fp32 copies of the last block and final
        norm of a half-precision model, and, for a model sharded by FSDP2, the whole
        parameters of the last block, final norm and head, gathered on entry (a
        collective: every rank enters) and freed on exit. A no-op for an unsharded
        model whose weights are fp32 already."""
        if self._held or (self.dtype is None and not self.sharded):
            yield
            return
        if self.sharded:
            self._whole = self._gather()
        if self.dtype is not None:
            self._state = self._make_state()
        self._held = True
        try:
            yield
        finally:
            self._state = None
            self._whole = None
            self._held = False

    def _gather(self) -> dict[str, dict[str, torch.Tensor]]:
        """The whole parameters and buffers of the last block, final norm and head
        of a sharded model, in the model's dtype (all-gathers, in a fixed order)."""
        parts = {"layer": self.block.layer, "norm": self.norm, "head": self.head}
        whole = {k: sharding.full_tensors(m) for k, m in parts.items() if m is not None}
        self.gathered_bytes = sum(sharding.nbytes(t) for t in whole.values())
        return whole

    def _whole_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The gathered whole tensors: those of :meth:`upcast`, or gathered for this
        replay only."""
        return self._whole if self._whole is not None else self._gather()

    def _as_model(self, part: str) -> dict[str, torch.Tensor]:
        """The whole tensors of ``part`` as the sharded model computes with them: cast
        to the dtype of FSDP2's mixed precision policy, if it has one."""
        whole = self._whole_state()[part]
        if self.model_dtype is None:
            return whole
        return {k: v.to(self.model_dtype) if v.is_floating_point() else v for k, v in whole.items()}

    def _call(self, module: nn.Module, weights: dict[str, torch.Tensor], args, kwargs=None) -> Any:
        """``module`` run with ``weights`` substituted; on a sharded model without its
        own FSDP hooks (the weights are whole already)."""
        if self.sharded:
            return sharding.call_unhooked(module, weights, args, kwargs)
        return functional_call(module, weights, args, kwargs or {}, strict=False)

    def _fp32_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The fp32 copies: those of :meth:`upcast`, or made for this replay only."""
        return self._state if self._state is not None else self._make_state()

    def _make_state(self) -> dict[str, dict[str, torch.Tensor]]:
        whole = self._whole_state() if self.sharded else {}
        state = {"layer": _float_state(self.block.layer, self.dtype, whole.get("layer"))}
        if self.norm is not None:
            state["norm"] = _float_state(self.norm, self.dtype, whole.get("norm"))
        if not self._slab_head():
            state["head"] = _float_state(self.head, self.dtype, whole.get("head"))
        return state

    def _slab_head(self) -> bool:
        """A plain ``nn.Linear`` head is upcast slab by slab; any other head
        (an adapter on it, say) runs on a full fp32 copy."""
        return type(self.head) is nn.Linear

    def parameter(self) -> torch.Tensor:
        """The block's parameter as the replay computes with it (fp32 for a
        half-precision model; the parameter itself otherwise; whole, on a sharded
        model)."""
        if self.sharded:
            p = self._whole_state()["layer"][self.block.param_name]
        else:
            p = self.block.parameter
        return p if self.dtype is None else p.detach().to(self.dtype)

    def perturbed(self, delta: torch.Tensor) -> torch.Tensor:
        """:meth:`ValueBlock.perturbed` in the replay's dtype: ``delta`` is added in
        fp32 to a half-precision model's block, where bf16 would round it away."""
        return self.block.perturbed(delta, base=self.parameter())

    @contextmanager
    def _numerics(self, captured: Captured, as_model: bool) -> Iterator[None]:
        """The precision to replay in: the model's own (``as_model``: its dtype and
        the autocast the trunk ran under, to compare with the model's forward), or
        the selection's (fp32 for half-precision weights, never autocast)."""
        device = self.block.parameter.device.type
        if as_model and captured.autocast is not None:
            with torch.autocast(captured.autocast[0], dtype=captured.autocast[1]):
                yield
        elif as_model:
            yield
        else:
            with torch.autocast(device, enabled=False):
                yield

    # -- trunk ---------------------------------------------------------------
    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Captured:
        """Run the model up to the last block (no grad) and return its inputs."""
        store: dict[str, Any] = {}

        def hook(_module, args, kwargs):
            store["args"], store["kwargs"] = args, dict(kwargs)
            device = self.block.parameter.device.type
            if torch.is_autocast_enabled(device):  # e.g. the Trainer's bf16 / fp16 AMP
                store["autocast"] = (device, torch.get_autocast_dtype(device))
            raise _StopForward

        def record(_module, args, kwargs):
            with contextlib.suppress(_StopForward):
                hook(_module, args, kwargs)

        # on a sharded model, stop before FSDP's own pre-hook gathers the last block;
        # under ZeRO-3 run to the end (see colm.sharding), recording the inputs only
        handle = self.block.layer.register_forward_pre_hook(
            record if self.zero3 else hook, with_kwargs=True, prepend=self.sharded
        )
        extra = self._trunk_kwargs if self.zero3 else {}
        try:
            with _no_checkpointing(self.block.layer):  # stop before any checkpoint is set up
                self.model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
                )
        except _StopForward:
            if self.sharded:
                sharding.end_interrupted_forward(self.model)
        finally:
            handle.remove()
        if "args" not in store:
            raise ReplayMismatchError(
                f"the forward pass never reached the last block {self.block.layer_name}"
            )
        kwargs = store["kwargs"]
        # a cache object must not be shared between replays
        for key in ("past_key_values", "cache", "layer_past"):
            if key in kwargs:
                kwargs[key] = None
        args = tuple(None if type(a).__name__.endswith("Cache") else a for a in store["args"])
        return Captured(args=args, kwargs=kwargs, autocast=store.get("autocast"))

    # -- replay --------------------------------------------------------------
    def hidden(
        self,
        captured: Captured,
        overrides: dict[str, torch.Tensor] | None = None,
        as_model: bool = False,
    ) -> torch.Tensor:
        """Output hidden states of the last block, with ``overrides`` (parameter
        name relative to the block -> tensor) substituted functionally. DoRA's
        weight norm stays at the real parameters' value, as in training's
        gradient (see :meth:`ValueBlock.frozen_dora_norm`). In fp32 for a
        half-precision model unless ``as_model``."""
        dtype = None if as_model else self.dtype
        args, kwargs = captured.inputs(dtype)
        weights = dict(overrides or {})
        if dtype is not None:
            weights = {**self._fp32_state()["layer"], **weights}
        elif self.sharded:
            weights = {**self._as_model("layer"), **weights}
        with (
            self._numerics(captured, as_model),
            self.block.frozen_dora_norm(),
            _no_checkpointing(self.block.layer),
        ):
            out = self._call(self.block.layer, weights, args, kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def logits(self, hidden: torch.Tensor, as_model: bool = False) -> torch.Tensor:
        """Final norm + LM head (+ the model's logit scaling), in float32."""
        if (as_model or self.dtype is None) and self.sharded:
            if self.norm is not None:
                hidden = self._call(self.norm, self._as_model("norm"), (hidden,))
            logits = self._call(self.head, self._as_model("head"), (hidden,)).float()
        elif as_model or self.dtype is None:
            if self.norm is not None:
                hidden = self.norm(hidden)
            logits = self.head(hidden).float()
        else:
            state = self._fp32_state()
            hidden = hidden.to(self.dtype)
            if self.norm is not None:
                hidden = self._call(self.norm, state["norm"], (hidden,))
            if self._slab_head():
                head = (
                    self._whole_state()["head"]
                    if self.sharded
                    else dict(self.head.named_parameters())
                )
                w = head["weight"]
                rows = max(1, HEAD_SLAB_BYTES // (w.shape[1] * hidden.element_size()))
                logits = _SlabLinear.apply(hidden, w, rows)
                if head.get("bias") is not None:
                    logits = logits + head["bias"].to(self.dtype)
            else:
                logits = self._call(self.head, state["head"], (hidden,))
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def losses(
        self,
        captured: Captured,
        labels: torch.Tensor,
        overrides: dict[str, torch.Tensor] | None = None,
        as_model: bool = False,
    ) -> torch.Tensor:
        """Per-example mean label-token loss [B] after the last block: in the
        selection's precision, or, ``as_model``, as the model's forward computes it."""
        with self._numerics(captured, as_model):
            hidden = self.hidden(captured, overrides, as_model)
            return per_example_loss(hidden, labels, lambda h: self.logits(h, as_model))


def per_example_loss(
    hidden: torch.Tensor, labels: torch.Tensor, logits_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Mean cross-entropy over each example's label tokens.

    ``hidden`` [B, T, H] are the states that predict the next token; logits are
    computed only at positions whose next-token label is not -100. Examples
    without label tokens get loss 0.
    """
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    logits = logits_fn(hidden[:, :-1][mask])
    ce = F.cross_entropy(logits, target[mask], reduction="none")
    total = torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, rows, ce)
    count = mask.sum(1).clamp(min=1).to(ce.dtype)
    return total / count


def full_model_losses(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels
) -> torch.Tensor:
    """Per-example loss from the full model's logits: the reference for the replay."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return per_example_loss_from_logits(logits, labels)


def per_example_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    target = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    count = (target != IGNORE_INDEX).sum(1).clamp(min=1)
    return ce.sum(1) / count


def _forward_parameters(model: nn.Module) -> set[str]:
    """The names ``model``'s forward (the innermost, under PEFT wrappers) accepts."""
    import inspect

    get_base = getattr(model, "get_base_model", None)  # PEFT passes the rest through
    inner = get_base() if callable(get_base) else model
    try:
        return set(inspect.signature(inner.forward).parameters)
    except (TypeError, ValueError):
        return set()


@torch.no_grad()
def check_replay(
    replay: LastBlockReplay,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> float:
    """Compare replayed per-example losses with the full model's; raise on mismatch.

    Returns the largest absolute difference. Guards against architectures whose
    last block or head does something the replay does not reproduce. The replay
    runs as the model does here (its dtype, its autocast), so that the check
    compares structure, not precision.
    """
    ref = full_model_losses(replay.model, input_ids, attention_mask, labels)
    # a sharded model's last block, norm and head: gathered once for the check
    with replay.upcast() if replay.sharded else contextlib.nullcontext():
        got = replay.losses(replay.capture(input_ids, attention_mask), labels, as_model=True)
    diff = (ref - got).abs()
    if not torch.all(diff <= atol + rtol * ref.abs()):
        raise ReplayMismatchError(
            f"replaying {replay.block.layer_name} + head gives per-example losses "
            f"{got.tolist()} but the full model gives {ref.tolist()}; this architecture "
            "computes something after its last block that colm does not reproduce. "
            "Please report it; SelectorConfig(check_replay=False) skips this check."
        )
    return float(diff.max())
