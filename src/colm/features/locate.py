"""Find the parameter block whose gradient is the selection feature.

CoLM's feature is the gradient of the value projection of the LAST transformer
block (with LoRA: that projection's LoRA B matrix). We find it from the model's
structure rather than from hard-coded layer numbers or a name substring:

1. the transformer blocks are the largest ``nn.ModuleList`` of identical
   blocks; the last one is the block we replay;
2. inside it, the attention module's value projection is either a separate
   projection (``v_proj``, ...) or the V part of a fused QKV projection
   (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``, GPT-NeoX ``query_key_value``), whose
   V rows are worked out from the attention layout;
3. with PEFT LoRA on that projection (also DoRA and rsLoRA), the block is the
   active adapter's ``lora_B`` weight (rows restricted to V for fused
   projections). Other PEFT adapters on it (IA3, LoHa, LoKr, AdaLoRA, ...) are
   refused with an error: their trainable parameters are not a linear layer's
   weight, so the exact per-example gradient identity does not hold for them.

The result is a :class:`ValueBlock`: which parameter, and which of its rows or
columns, form the block. Call :func:`find_value_block` on your model to see what
the selector will use.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..sharding import full, logical_shape, model_sharding, refuse_unsupported, tensor_sharding

# Attribute names of a separate value projection inside an attention module.
_SEPARATE_V = ("v_proj", "value", "v", "W_v", "wv", "v_linear")
# Fused projections: attribute name -> layout of its output features.
#   "qkv":          [q | k | v] contiguous (sizes from heads / kv heads / head dim)
#   "per_head_qkv": per head [q_h | k_h | v_h] (GPT-NeoX)
_FUSED_QKV = {
    "c_attn": "qkv",
    "qkv_proj": "qkv",
    "Wqkv": "qkv",
    "qkv": "qkv",
    "query_key_value": "per_head_qkv",
}


# every name the locator accepts as a value projection (for config checks)
VALUE_PROJECTIONS = (*_SEPARATE_V, *_FUSED_QKV)


class BlockNotFoundError(ValueError):
    """The value projection of the last block could not be located or is unusable."""


@dataclass(frozen=True)
class ValueBlock:
    """The parameter block whose per-example gradient is the selection feature.

    The block is ``parameter.index_select(dim, index)``: the whole parameter for
    a separate value projection, the V rows (or columns) of a fused one.
    """

    layer: nn.Module  # the last transformer block (replayed for features)
    layer_name: str  # its qualified name in the model, for display
    module: nn.Module  # the module that owns the parameter (Linear, Conv1D, lora_B)
    module_name: str  # qualified name of ``module``
    param_name: str  # name of the parameter relative to ``layer`` (for functional_call)
    parameter: nn.Parameter
    dim: int  # dimension of ``parameter`` that ``index`` selects along
    index: torch.Tensor  # LongTensor of the rows/columns that belong to V
    kind: str  # "lora_B" or "weight"
    layers_parent: nn.Module  # the module holding the ModuleList of blocks
    layers_attr: str  # the ModuleList's attribute name in ``layers_parent``
    lora_layer: nn.Module | None = None  # the PEFT LoRA layer wrapping the projection
    adapter: str | None = None  # its active adapter whose lora_B is the block

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(logical_shape(self.parameter))
        s[self.dim] = int(self.index.numel())
        return tuple(s)

    @property
    def numel(self) -> int:
        n = 1
        for x in self.shape:
            n *= x
        return n

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """The block's part of ``tensor`` (the parameter, a gradient or an optimizer
        moment of it), whole: under FSDP2 or ZeRO-3 a sharded ``tensor`` is gathered
        first (a collective)."""
        tensor = full(tensor)
        return tensor.index_select(self.dim, self.index.to(tensor.device))

    def perturbed(self, delta: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """A new tensor equal to the parameter (or ``base``, a copy of it in another
        dtype) with ``delta`` (block-shaped) added to the block. Out of place: the
        parameter itself is never modified."""
        p = self.parameter if base is None else base
        return p.index_add(self.dim, self.index.to(p.device), delta.to(p.dtype).reshape(self.shape))

    @contextmanager
    def frozen_dora_norm(self) -> Iterator[None]:
        """Hold DoRA's weight norm at the unperturbed parameters' value.

        DoRA divides each output row by the norm of W + s B A, and PEFT detaches
        that norm from the gradient (DoRA paper, section 4.3): training moves B
        as if the norm were constant. A replay that perturbs B would also move
        the norm, and zo features would estimate another derivative than the
        gradient training follows (correlation 0.7 to 0.93 with the exact g.z on
        tiny models). Within this context PEFT's DoRA layer reads the LoRA weight
        B A of the real parameters, computed before any functional override. A
        no-op without DoRA.
        """
        dora = self._dora_layer()
        if dora is None:
            yield
            return
        with torch.no_grad():
            lora_weight = dora.get_lora_weight(
                lora_A=self.lora_layer.lora_A[self.adapter], lora_B=self.module
            )
        dora.get_lora_weight = lambda *args, **kwargs: lora_weight
        try:
            yield
        finally:
            del dora.get_lora_weight  # the class's method again

    def _dora_layer(self) -> nn.Module | None:
        """PEFT's DoRA magnitude layer of the block's adapter, or None."""
        if self.lora_layer is None or not getattr(self.lora_layer, "use_dora", {}).get(
            self.adapter, False
        ):
            return None
        magnitudes = getattr(self.lora_layer, "lora_magnitude_vector", {})
        dora = dict(magnitudes.items()).get(self.adapter)  # an nn.ModuleDict has no get
        return dora if hasattr(dora, "get_lora_weight") else None

    def describe(self) -> str:
        return (
            f"{self.kind} of {self.module_name} "
            f"(parameter {self.param_name!r} {tuple(logical_shape(self.parameter))}, "
            f"block {self.shape} = {self.numel} numbers)"
        )


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / accelerate / torch.compile wrappers keep the real model in .module / ._orig_mod
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not model:
            model = inner
        else:
            return model


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the largest list of identical blocks."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        types = {type(m) for m in mod}
        if len(types) != 1:
            continue
        size = sum(logical_shape(p).numel() for p in mod.parameters())
        if size == 0:
            continue
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise BlockNotFoundError(
            f"{type(model).__name__} has no nn.ModuleList of transformer blocks; "
            "colm supports decoder-only causal LMs whose blocks are kept in a ModuleList."
        )
    return best[1], best[2]


def _attention_config(model: nn.Module, attn: nn.Module) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) from the attention module or model config."""
    config = getattr(_unwrap(model), "config", None)
    cfg = getattr(config, "get_text_config", lambda: config)() if config is not None else None

    def first(*candidates):
        for c in candidates:
            if c is not None:
                return int(c)
        return None

    heads = first(
        getattr(attn, "num_heads", None),
        getattr(cfg, "num_attention_heads", None),
        getattr(cfg, "n_head", None),
    )
    kv = first(
        getattr(attn, "num_key_value_heads", None),
        getattr(cfg, "num_key_value_heads", None),
        heads,
    )
    head_dim = first(getattr(attn, "head_dim", None), getattr(cfg, "head_dim", None))
    hidden = first(getattr(cfg, "hidden_size", None), getattr(cfg, "n_embd", None))
    if head_dim is None and hidden is not None and heads:
        head_dim = hidden // heads
    if heads is None or head_dim is None:
        raise BlockNotFoundError(
            f"cannot tell the attention layout of {type(attn).__name__} (number of heads / "
            "head dim not found on the module or the model config)"
        )
    return heads, kv, head_dim


def _v_index(layout: str, out_features: int, heads: int, kv: int, head_dim: int) -> torch.Tensor:
    q_size, kv_size = heads * head_dim, kv * head_dim
    if layout == "qkv":
        if q_size + 2 * kv_size != out_features:
            raise BlockNotFoundError(
                f"fused QKV projection has {out_features} outputs, expected "
                f"{q_size} + 2 x {kv_size} from the attention config"
            )
        return torch.arange(q_size + kv_size, q_size + 2 * kv_size)
    if layout == "per_head_qkv":
        if heads != kv or 3 * q_size != out_features:
            raise BlockNotFoundError(
                f"per-head fused QKV projection has {out_features} outputs, expected 3 x {q_size}"
            )
        per_head = torch.arange(2 * head_dim, 3 * head_dim)
        return (torch.arange(heads)[:, None] * 3 * head_dim + per_head[None, :]).reshape(-1)
    raise AssertionError(layout)


def _find_projection(layer: nn.Module) -> tuple[str, nn.Module, str | None, nn.Module]:
    """(name in layer, projection module, fused layout or None, attention module)."""
    for attn_name, attn in layer.named_modules():
        for attr in _SEPARATE_V:
            mod = attn._modules.get(attr)
            if isinstance(mod, nn.Module):
                return f"{attn_name}.{attr}".lstrip("."), mod, None, attn
        for attr, layout in _FUSED_QKV.items():
            mod = attn._modules.get(attr)
            if isinstance(mod, nn.Module):
                return f"{attn_name}.{attr}".lstrip("."), mod, layout, attn
    raise BlockNotFoundError(
        f"no value projection found in the last block ({type(layer).__name__}); looked for "
        f"separate projections {_SEPARATE_V} and fused ones {tuple(_FUSED_QKV)}"
    )


def _is_lora_layer(mod: nn.Module) -> bool:
    return hasattr(mod, "lora_B") and isinstance(mod.lora_B, nn.ModuleDict)


def _is_adapter_layer(mod: nn.Module) -> bool:
    """A PEFT tuner layer of any kind (LoRA, IA3, LoHa, LoKr, AdaLoRA, VeRA, ...),
    recognised by class name so that peft stays an optional dependency."""
    return any(c.__name__ == "BaseTunerLayer" for c in type(mod).__mro__)


def _model_has_adapters(model: nn.Module) -> bool:
    return any(_is_lora_layer(m) or _is_adapter_layer(m) for m in model.modules())


# What the block can be, for the errors that refuse anything else.
_SUPPORTED = (
    "colm's feature is the gradient of the value projection's LoRA B matrix (PEFT LoRA, "
    "also with use_dora=True or use_rslora=True) or, without adapters, of the "
    "projection's weight"
)


def _refuse_other_adapter(proj: nn.Module, full_proj_name: str, short: str) -> None:
    """Adapters other than LoRA train other parameters (IA3's scaling vector, LoHa's
    Hadamard factors, ...) whose per-example gradient is not the outer product that
    :mod:`colm.features.exact` computes, and their wrapped base weight is frozen:
    refuse them rather than select on the wrong parameter."""
    generic = ("BaseTunerLayer", "LycorisLayer")
    kind = next(
        (
            c.__name__
            for c in type(proj).__mro__
            if c.__name__.endswith("Layer") and c.__name__ not in generic
        ),
        type(proj).__name__,
    )  # IA3Layer, LoHaLayer, ...: the adapter's kind, not its class (Linear)
    raise BlockNotFoundError(
        f"{full_proj_name} is adapted by a PEFT {kind} adapter, which colm does not support: "
        f"{_SUPPORTED}. Use LoraConfig(target_modules=[{short!r}, ...]) instead, or a "
        "method that needs no gradient features (SelectorConfig(method='random_big'))"
    )


def find_value_block(model: nn.Module) -> ValueBlock:
    """Locate the value projection of the last transformer block of ``model``.

    Works on any Hugging Face decoder-only causal LM (also wrapped in PEFT, DDP
    or accelerate) whose blocks are a ``ModuleList``. With PEFT LoRA, returns the
    active adapter's ``lora_B`` weight of that projection; if LoRA is present but
    does not adapt that projection, or another kind of PEFT adapter does, raises
    :class:`BlockNotFoundError` saying what to use instead.

    >>> block = find_value_block(model)  # doctest: +SKIP
    >>> print(block.describe())          # doctest: +SKIP
    """
    model = _unwrap(model)
    layers_name, layers = find_layers(model)
    layer = layers[-1]
    layer_name = f"{layers_name}.{len(layers) - 1}"
    parent_name, _, layers_attr = layers_name.rpartition(".")
    layers_parent = model.get_submodule(parent_name) if parent_name else model

    proj_name, proj, layout, attn = _find_projection(layer)
    full_proj_name = f"{layer_name}.{proj_name}"
    short = proj_name.rpartition(".")[2]

    if _is_adapter_layer(proj) and not _is_lora_layer(proj):
        _refuse_other_adapter(proj, full_proj_name, short)
    if _is_lora_layer(proj):
        active = [a for a in getattr(proj, "active_adapters", ["default"]) if a in proj.lora_B]
        if not active:
            raise BlockNotFoundError(f"LoRA on {full_proj_name} has no active adapter")
        if getattr(proj, "merged", False):
            raise BlockNotFoundError(
                f"LoRA on {full_proj_name} is merged into the base weight; unmerge it "
                "(model.unmerge_adapter()) before training with colm"
            )
        adapter = active[0]
        lora_layer = proj
        module = proj.lora_B[adapter]
        module_name = f"{full_proj_name}.lora_B.{adapter}"
        param_name = f"{proj_name}.lora_B.{adapter}.weight"
        parameter = module.weight
        kind, dim = "lora_B", 0  # lora_B is nn.Linear(r, out): rows are output features
        out_features = logical_shape(parameter)[0]
    else:
        lora_layer, adapter = None, None
        if _model_has_adapters(model):
            raise BlockNotFoundError(
                "the model's PEFT adapters do not adapt the value projection of the last "
                f"block ({full_proj_name}), whose gradient colm uses as the selection feature. "
                f"Add {short!r} to LoraConfig(target_modules=[...]) and make sure "
                f"layers_to_transform includes the last layer ({len(layers) - 1}); {_SUPPORTED}."
            )
        base = proj.base_layer if hasattr(proj, "base_layer") else proj
        module, module_name = base, full_proj_name
        parameter = getattr(base, "weight", None)
        if not isinstance(parameter, torch.Tensor):
            raise BlockNotFoundError(f"{full_proj_name} has no weight parameter")
        param_name = f"{proj_name}.weight"
        kind = "weight"
        # transformers' Conv1D (GPT-2) stores the weight as [in, out]
        dim = 1 if type(base).__name__ == "Conv1D" else 0
        out_features = logical_shape(parameter)[dim]

    # FSDP2 and ZeRO-3 parameters are gathered for the replay; FSDP1 is refused
    refuse_unsupported(tensor_sharding(parameter) or model_sharding(model), module_name)
    if layout is None:
        index = torch.arange(out_features)
    else:
        heads, kv, head_dim = _attention_config(model, attn)
        index = _v_index(layout, out_features, heads, kv, head_dim)

    return ValueBlock(
        layer=layer,
        layer_name=layer_name,
        module=module,
        module_name=module_name,
        param_name=param_name,
        parameter=parameter,
        dim=dim,
        index=index,
        kind=kind,
        layers_parent=layers_parent,
        layers_attr=layers_attr,
        lora_layer=lora_layer,
        adapter=adapter,
    )
