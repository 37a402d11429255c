"""Every architecture of the tiny-model table, plain and with LoRA.

For each (architecture, LoRA or not): the value block of the last transformer
block is located, replaying last block + final norm + head gives the full
model's per-example losses, ``exact`` features equal per-example autograd
gradients of the block, and ``zo`` coefficients agree with the exact
directional derivatives g.z. Then the PEFT variants: DoRA and rsLoRA work,
other adapters on the value projection are refused with a clear error.
docs/compatibility.md summarises what this file checks.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn

from colm import CoresetSelector, SelectorConfig
from colm.features import (
    BlockNotFoundError,
    GradientFeatures,
    LastBlockReplay,
    draw_directions,
    find_layers,
    find_value_block,
    full_model_losses,
)
from tests.conftest import CORE_ARCHS, TINY_MODELS, make_batch, make_tiny
from tests.features.test_exact import reference_gradients

CASES = [
    pytest.param(arch, lora, id=f"{arch}-{'lora' if lora else 'full'}")
    for arch in TINY_MODELS
    for lora in (False, True)
]


@cache
def _model(arch: str, lora: bool) -> nn.Module:
    """One model per case, shared by the checks below: none of them changes it
    (features are computed functionally, the autograd twin restores
    ``requires_grad``, selection restores the training mode), so each model is
    built once instead of once per check."""
    return make_tiny(arch, lora=lora)


@cache
def _value_proj(arch: str) -> str:
    """The value projection's attribute name, as the tiny-model table states it."""
    return TINY_MODELS[arch]()[2]


def _value_width(model: nn.Module) -> int:
    """Output features of the value projection: kv heads x head dim, from the config."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return kv * head_dim


@pytest.mark.parametrize("arch, lora", CASES)
def test_block_is_the_value_projection_of_the_last_block(arch: str, lora: bool) -> None:
    model = _model(arch, lora)
    block = find_value_block(model)
    _, layers = find_layers(model)
    assert block.layer is layers[-1]
    assert f".{_value_proj(arch)}." in f"{block.module_name}."
    assert block.kind == ("lora_B" if lora else "weight")
    # exactly the tensor that functional_call replaces during the replay
    assert dict(block.layer.named_parameters())[block.param_name] is block.parameter
    width = _value_width(model)
    hidden = model.config.get_text_config().hidden_size
    if lora:
        assert block.shape == (width, 4)
    elif arch == "gpt2":  # Conv1D stores [in, out]
        assert block.shape == (hidden, width)
    else:
        assert block.shape == (width, hidden)


def _assert_replay_equals_full_model(model: nn.Module, padding_side: str = "right") -> None:
    replay = LastBlockReplay(model, find_value_block(model))
    batch = make_batch(n=6, max_len=14, min_len=3, seed=1, padding_side=padding_side)
    ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        ref = full_model_losses(model, ids, am, labels)
        got = replay.losses(replay.capture(ids, am), labels)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _exact(model: nn.Module, batch: dict) -> torch.Tensor:
    return GradientFeatures(model, chunk_size=3).compute(
        batch["input_ids"], batch["attention_mask"], batch["labels"], kind="exact"
    )


def _assert_exact_equals_autograd(model: nn.Module) -> None:
    batch = make_batch(n=5, max_len=12, seed=4)
    ref = reference_gradients(model, batch)
    torch.testing.assert_close(_exact(model, batch), ref, atol=1e-5, rtol=1e-4)
    assert ref.abs().sum() > 0


def _assert_zo_agrees_with_exact(model: nn.Module) -> None:
    """fp32: each zo coefficient is a central difference of g . z (the paper's
    estimator); correlation and relative error against the exact g . z."""
    batch = make_batch(n=6, max_len=12, seed=5)
    feats = GradientFeatures(model, chunk_size=6)
    exact = _exact(model, batch)
    z = draw_directions(4, feats.numel, torch.Generator().manual_seed(0))
    coef = feats.compute(
        batch["input_ids"], batch["attention_mask"], batch["labels"], "zo", z, lifted=False
    )
    gz = exact @ z.T
    corr = torch.corrcoef(torch.stack([coef.flatten(), gz.flatten()]))[0, 1]
    assert corr >= 0.99, float(corr)
    assert (coef - gz).norm() <= 0.02 * gz.norm(), float((coef - gz).norm() / gz.norm())


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("arch, lora", CASES)
def test_replay_equals_full_model_losses(arch: str, lora: bool, padding_side: str) -> None:
    _assert_replay_equals_full_model(_model(arch, lora), padding_side)


@pytest.mark.parametrize("arch, lora", CASES)
def test_exact_equals_per_example_autograd(arch: str, lora: bool) -> None:
    _assert_exact_equals_autograd(_model(arch, lora))


@pytest.mark.parametrize("arch, lora", CASES)
def test_zo_agrees_with_exact_directional_derivatives(arch: str, lora: bool) -> None:
    _assert_zo_agrees_with_exact(_model(arch, lora))


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_one_selection_step_with_lora(arch: str) -> None:
    """The selector end to end (with its first-step replay check) on each
    architecture: a coreset of the requested size, parameters untouched."""
    model = _model(arch, True)
    before = [p.detach().clone() for p in model.parameters()]
    batch = make_batch(n=8, max_len=12, seed=6, sources=["a", "b"] * 4)
    selector = CoresetSelector(
        SelectorConfig(method="colm", ratio=0.5, small_sources=[]), {"a": 100, "b": 100}
    )
    selection = selector.select(model, batch)
    assert len(selection.indices) == 4
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


# -- PEFT variants ----------------------------------------------------------


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_dora_and_rslora_work(arch: str, variant: str) -> None:
    """Both keep LoRA's B matrix a linear layer, so the block is lora_B and the
    exact per-example identity holds. DoRA's weight norm is detached from the
    gradient in PEFT; the replay holds it fixed too, or zo would disagree."""
    model = make_tiny(arch, lora=True, lora_options={variant: True})
    block = find_value_block(model)
    assert block.kind == "lora_B"
    assert f".{_value_proj(arch)}.lora_B." in block.module_name
    _assert_replay_equals_full_model(model)
    _assert_exact_equals_autograd(model)
    _assert_zo_agrees_with_exact(model)


def _other_adapter(arch: str, kind: str, targets: list[str]) -> nn.Module:
    from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, get_peft_model

    configs = {
        "ia3": lambda: IA3Config(target_modules=targets, feedforward_modules=[]),
        "loha": lambda: LoHaConfig(r=4, target_modules=targets),
        "lokr": lambda: LoKrConfig(r=4, target_modules=targets),
        "adalora": lambda: AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, target_modules=targets
        ),
    }
    torch.manual_seed(0)
    return get_peft_model(TINY_MODELS[arch]()[0], configs[kind]()).eval()


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize(
    "kind, layer", [("ia3", "IA3"), ("loha", "LoHa"), ("lokr", "LoKr"), ("adalora", "AdaLora")]
)
def test_other_adapters_on_the_value_projection_are_refused(
    arch: str, kind: str, layer: str
) -> None:
    """Their trainable parameters are not a linear layer's weight, and the base
    weight they wrap is frozen: refused, naming the adapter and what works."""
    model = _other_adapter(arch, kind, [_value_proj(arch)])
    with pytest.raises(BlockNotFoundError) as err:
        find_value_block(model)
    msg = str(err.value)
    assert f"{_value_proj(arch)} is adapted by a PEFT {layer}Layer adapter" in msg
    assert "use_dora=True or use_rslora=True" in msg
    assert f"LoraConfig(target_modules=['{_value_proj(arch)}', ...])" in msg


def test_other_adapter_elsewhere_only_is_refused() -> None:
    """IA3 on the keys only: the value projection's base weight is frozen, so its
    gradient is not what training moves; the error says to adapt the value projection."""
    model = _other_adapter("llama", "ia3", ["k_proj"])
    with pytest.raises(
        BlockNotFoundError, match=r"do not adapt the value projection.*Add 'v_proj'"
    ):
        find_value_block(model)
