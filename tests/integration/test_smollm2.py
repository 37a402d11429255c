"""A few real training steps on the packaged SmolLM2-135M-Instruct (slow)."""

import json

import pytest

from colm.cli import main


@pytest.mark.slow
def test_train_a_few_steps_on_smollm2(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "configs/default.yaml",
            f"output_dir={out}",
            "train.steps=2",
            "train.source_batch=8",
            "data.max_length=128",
            "eval.enabled=false",
            "data.mixture={train: {basic_arithmetic: 60, chain_sum: 40, gcd: 8, lcm: 6}, "
            "test_per_source: 2, ood: {products: 2}}",
        ]
    )
    assert code == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
