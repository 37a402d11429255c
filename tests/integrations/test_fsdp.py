"""Sharded models: FSDP2 (``fully_shard``) with the plain loop on 2 and 3 processes
(gloo, CPU) behaves as 1 unsharded process, gathers only the last block, final norm
and head for selection, and resumes from a sharded checkpoint identically; FSDP1 and
the Trainer under FSDP are refused with messages that say why and what works (ZeRO-3
with features: tests/integrations/test_deepspeed.py).

Each run is a real ``torch.distributed.run`` launch of tests/integrations/fsdp_worker.py
with a timeout, so a hang (ranks out of step in a collective) fails the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from colm import sharding
from colm.features.locate import BlockNotFoundError, find_value_block
from colm.features.replay import LastBlockReplay
from colm.integrations.hf_trainer import _refuse_sharded_parameters
from tests.conftest import make_tiny
from tests.integrations.test_distributed import assert_same_run
from tests.integrations.test_distributed import launch as launch_worker

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integrations" / "fsdp_worker.py"

pytestmark = pytest.mark.distributed


def launch(out: Path, processes: int, *args: str, expect_ok: bool = True):
    return launch_worker(out, processes, *args, expect_ok=expect_ok, worker=WORKER)


def replayed_bytes() -> int:
    """Bytes of the last block, final norm and head of the worker's model: what one
    rank gathers for selection."""
    from tests.integrations.ddp_worker import _model

    replay = LastBlockReplay(model := _model(), find_value_block(model))
    parts = [replay.block.layer, replay.norm, replay.head]
    return sum(sharding.nbytes(sharding.full_tensors(m)) for m in parts)


def feature_rows(stats: dict) -> int:
    """Examples whose features a step computed: those of sources partly selected."""
    sources = stats["sources"].values()
    return sum(c["in_batch"] - c["kept"] for c in sources if 0 < c["selected"] < c["in_batch"])


def test_fsdp2_one_process_selects_and_trains_as_the_unsharded_model(tmp_path):
    """The sharded code path on one process (every parameter a DTensor of one shard):
    whole tensors gathered for the replay, FSDP's hooks skipped in it, its state reset
    after each trunk pass; the same coresets and weights as the plain model."""
    run = launch(tmp_path, 1, "--steps", "2", "--shard", "fsdp2", "--also-plain")[0]
    assert run["sharded_parameters"] == run["parameters"]
    assert run["plain"]["sharded_parameters"] == 0
    assert run["gathered_bytes"] == [replayed_bytes()] * 2
    assert_same_run(run["plain"], [run])


@pytest.mark.slow
def test_fsdp2_loop_two_processes_select_train_and_resume_as_one(tmp_path):
    """2 processes, every parameter a DTensor shard: the same coresets, losses and LoRA
    weights as 1 unsharded process; selection gathers exactly the last block, the final
    norm and the head; a sharded checkpoint (model + optimizer through
    torch.distributed.checkpoint, plus the selector state) resumes the same run."""
    args = ["--steps", "4"]
    one = launch(tmp_path / "one", 1, *args)[0]
    two = launch(tmp_path / "two", 2, *args, "--shard", "fsdp2", "--save-at", "2")
    assert two[0]["world"] == 2
    assert one["sharded_parameters"] == 0
    for rank in two:
        assert rank["sharded_parameters"] == rank["parameters"]  # all sharded, none whole
    assert_same_run(one, two)
    assert [s["stats"]["processes"] for s in two[0]["steps"]] == [2, 2, 2, 2]
    # uneven shares were padded, not skipped: some step has an odd number of feature rows
    assert any(feature_rows(s["stats"]) % 2 for s in one["steps"])

    expected = replayed_bytes()
    for rank in two:
        assert rank["gathered_bytes"] == [expected] * 4
        assert expected < rank["model_bytes"]
    assert one["gathered_bytes"] == [0] * 4  # nothing to gather without sharding

    ckpt = tmp_path / "two" / "checkpoint-2"
    assert (ckpt / "selector.pt").exists() and (ckpt / ".metadata").exists()
    resumed = launch(tmp_path / "resumed", 2, *args, "--shard", "fsdp2", "--resume", str(ckpt))
    for rank in resumed:
        assert [s["stats"]["step"] for s in rank["steps"]] == [2, 3]
        assert [s["picked"] for s in rank["steps"]] == [s["picked"] for s in two[0]["steps"][2:]]
        assert rank["losses"] == pytest.approx(two[0]["losses"][2:], abs=1e-6)
        for name, values in two[0]["lora"].items():
            diff = (torch.tensor(values) - torch.tensor(rank["lora"][name])).abs().max()
            assert float(diff) < 1e-6, name


@pytest.mark.slow
def test_fsdp2_loop_exact_features_optimizer_moments_as_one(tmp_path):
    """Exact features (a backward through the gathered block, no FSDP hook runs) and the
    optimizer's Adam moments, which FSDP2 keeps as DTensor shards and selection gathers."""
    args = ["--steps", "3", "--feature", "exact", "--moments", "optimizer"]
    one = launch(tmp_path / "one", 1, *args)[0]
    two = launch(tmp_path / "two", 2, *args, "--shard", "fsdp2")
    assert_same_run(one, two)


@pytest.mark.slow
def test_fsdp2_mixed_precision_replays_in_fp32(tmp_path):
    """FSDP2 computing in bf16 (MixedPrecisionPolicy): the replay check compares the
    gathered block in bf16 with the model's forward, and selection replays in fp32, as
    for a half-precision model. 2 processes pick the first coreset exactly as 1 (later
    steps train in bf16 on different row splits, so only the losses are compared)."""
    args = ["--steps", "3", "--shard", "fsdp2", "--mixed"]
    one = launch(tmp_path / "one", 1, *args)[0]
    two = launch(tmp_path / "two", 2, *args)
    for run in (one, *two):
        assert run["model_dtype"] == "torch.bfloat16"
        assert run["replay_dtype"] == "torch.float32"
        assert len(run["steps"]) == 3
    assert two[0]["steps"][0]["picked"] == one["steps"][0]["picked"]
    assert [s["picked"] for s in two[1]["steps"]] == [s["picked"] for s in two[0]["steps"]]
    assert two[0]["losses"] == pytest.approx(one["losses"], rel=1e-3)


@pytest.mark.slow
def test_fsdp2_rank_without_feature_rows_does_not_hang(tmp_path):
    """3 processes, 2 examples need features: the third rank has none of its own and runs
    the same trunk passes on a padding row, so the collectives stay in step."""
    args = ["--steps", "2", "--case", "edge", "--coreset", "6"]
    one = launch(tmp_path / "one", 1, *args)[0]
    three = launch(tmp_path / "three", 3, *args, "--shard", "fsdp2")
    assert all(feature_rows(s["stats"]) == 2 for s in one["steps"])
    assert_same_run(one, three)


def test_fsdp1_is_refused_with_what_works(tmp_path):
    """FSDP1 (what accelerate uses by default) runs on this CPU; colm refuses it at the
    first selection, on every rank, naming FSDP2 as what works."""
    proc = launch(tmp_path, 2, "--steps", "1", "--shard", "fsdp1", expect_ok=False)
    assert proc.returncode != 0
    assert "sharded across processes by FSDP1" in proc.stderr
    assert "work with FSDP2 (torch.distributed.fsdp.fully_shard" in proc.stderr


@pytest.mark.slow
def test_accelerate_ignores_fsdp_on_a_cpu(tmp_path):
    """Why CoLMTrainer under FSDP is refused rather than tested: on a CPU, accelerate
    leaves the Trainer's FSDP request aside and trains with DDP, whole parameters.
    Should this fail, accelerate runs FSDP on CPUs: test CoLMTrainer under FSDP2."""
    proc = launch(tmp_path, 2, "--probe-trainer-fsdp", expect_ok=False)
    # the probe's facts are written before exit; gloo's teardown after a Trainer run
    # sometimes aborts a rank at exit ("terminate called without an active exception")
    files = [tmp_path / f"rank{r}.json" for r in range(2)]
    assert all(f.exists() for f in files), proc.stderr[-4000:]
    for run in (json.loads(f.read_text()) for f in files):
        assert run["is_fsdp_enabled"] is False
        assert run["distributed_type"] == "DistributedType.MULTI_CPU"
        assert run["wrapped"] == "DistributedDataParallel"
        assert run["sharded_parameters"] == 0


def test_fsdp1_parameters_are_refused_with_what_works():
    model = make_tiny("llama", lora=True)
    block = find_value_block(model)
    block.parameter._is_flat_param = True  # what FSDP1 marks its flat parameters with
    with pytest.raises(BlockNotFoundError, match="FSDP1") as err:
        find_value_block(model)
    assert "work with FSDP2" in str(err.value)
    assert "DDP and DeepSpeed ZeRO-1/2/3" in str(err.value)


def test_a_zero3_value_block_is_located_by_its_whole_shape():
    """Between DeepSpeed's gathers a ZeRO-3 parameter's own data is empty; the locator
    reads the whole shape DeepSpeed keeps (ds_shape) and does not refuse it."""
    model = make_tiny("llama", lora=True)
    whole = find_value_block(model)
    name, shape, numel = whole.module_name, whole.shape, whole.numel
    param_shape = whole.parameter.shape
    for p in model.parameters():
        p.ds_shape, p.ds_id = p.shape, 0  # what ZeRO-3 attaches
        p.data = torch.empty(0, dtype=p.dtype)  # and what it leaves between gathers
    block = find_value_block(model)
    assert block.parameter.shape == (0,)
    assert (block.module_name, block.shape, block.numel) == (name, shape, numel)
    assert sharding.logical_shape(block.parameter) == param_shape


def test_deepspeed_hooks_are_suspended_for_the_replay_others_run():
    """call_unhooked takes out the hooks DeepSpeed registered on the replayed module
    and the modules inside it (they would gather the partitions again), keeps every
    other hook, and puts DeepSpeed's back after."""
    model = make_tiny("llama", lora=True)
    layer = find_value_block(model).layer
    calls = []

    def ours(module, args):
        calls.append("ours")

    def theirs(module, args):
        calls.append("deepspeed")

    theirs.__module__ = "deepspeed.runtime.zero.parameter_offload"
    inner = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
    handles = [inner.register_forward_pre_hook(theirs), inner.register_forward_pre_hook(ours)]
    handles.append(layer.register_forward_pre_hook(theirs))
    weights = sharding.full_tensors(layer)
    hidden = torch.randn(1, 3, model.config.hidden_size)
    position = torch.arange(3)[None]
    rotary = model.base_model.model.model.rotary_emb(hidden, position)
    sharding.call_unhooked(layer, weights, (hidden,), {"position_embeddings": rotary})
    assert calls == ["ours"]
    calls.clear()
    layer(hidden, position_embeddings=rotary)  # restored, in their order
    assert calls == ["deepspeed", "deepspeed", "ours"]
    for h in handles:
        h.remove()


def test_trainer_under_fsdp_is_refused_saying_why():
    fsdp = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False)
    with pytest.raises(ValueError, match="does not support FSDP in CoLMTrainer") as err:
        _refuse_sharded_parameters(fsdp)
    text = str(err.value)
    assert "accelerate runs FSDP only on GPUs" in text
    assert "coreset_step" in text and "tests/integrations/test_fsdp.py" in text
    assert "DeepSpeed ZeRO-3" in text  # what works in the Trainer


def test_model_sharding_is_detected_from_parameters():
    model = make_tiny("llama", lora=True)
    assert sharding.model_sharding(model) is None
    block = find_value_block(model)
    block.parameter.ds_id = 0
    assert sharding.model_sharding(model) == sharding.ZERO3
    assert sharding.tensor_sharding(torch.zeros(0)) == sharding.FSDP1
    # an empty parameter somewhere in an unsharded model is not taken for FSDP1
    plain = make_tiny("llama", lora=True)
    plain.register_parameter("empty", torch.nn.Parameter(torch.zeros(0)))
    assert sharding.model_sharding(plain) is None
    find_value_block(plain)
    assert sharding.tensor_sharding(torch.zeros(3)) is None


def test_even_share_pads_to_the_largest_share_and_refuses_streamed_exact():
    rows = [3, 5, 8, 9, 11]  # 5 rows over 2 ranks: shares of 3 and 2
    assert sharding.even_share([3, 5, 8], rows, 2, streamed=False) == [3, 5, 8]
    assert sharding.even_share([9, 11], rows, 2, streamed=False) == [9, 11, 11]
    assert sharding.even_share([], [4, 6], 3, streamed=False) == [4]  # no rows of its own
    with pytest.raises(ValueError, match="max_feature_mb"):
        sharding.even_share([9, 11], rows, 2, streamed=True)


def test_call_unhooked_skips_the_module_s_own_hooks_only():
    outer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    calls = []
    outer.register_forward_pre_hook(lambda m, a: calls.append("outer"))
    outer[0].register_forward_pre_hook(lambda m, a: calls.append("inner"))
    weights = {"0.weight": torch.eye(2), "0.bias": torch.zeros(2)}
    x = torch.tensor([[1.0, 2.0]])
    out = sharding.call_unhooked(outer, weights, (x,))
    assert torch.equal(out, x)  # the substituted weights, not the module's
    assert calls == ["inner"]


def test_full_tensors_copies_so_freeing_the_module_s_memory_is_safe():
    layer = torch.nn.Linear(2, 2)
    whole = sharding.full_tensors(layer)
    assert set(whole) == {"weight", "bias"}
    assert whole["weight"].data_ptr() != layer.weight.data_ptr()
    assert torch.equal(whole["weight"], layer.weight) and not whole["weight"].requires_grad
