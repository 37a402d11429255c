"""CoLMTrainer under DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 on CPU (DeepSpeed's CPU
accelerator, gloo): 2 processes select the same coresets and reach the same LoRA weights
as the plain 1-process run, with the default selection and with gradient features (under
ZeRO-3 gathered for the replay of the last block only).

Skipped where ``deepspeed`` is not installed. The first DeepSpeed launch of a test session
JIT-compiles DeepSpeed's shared-memory comm op (needs a C++ compiler), hence the longer
timeout. It is compiled into a directory of the session's own (TORCH_EXTENSIONS_DIR), not
~/.cache/torch_extensions: a compile killed there leaves a lock file behind on which every
later launch waits forever.

Run as a script, this file is the worker: tests/integrations/ddp_worker.py with
``--zero N`` adding a DeepSpeed config to its TrainingArguments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 600


def _ds_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the Trainer's torch AdamW, as without DS
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def _worker() -> None:
    """ddp_worker.main() with ``--zero N``; also writes engine<rank>.json (what DS ran)."""
    sys.path.insert(0, str(ROOT))
    from colm.integrations import hf_trainer
    from tests.integrations import ddp_worker

    argv = sys.argv[1:]
    i = argv.index("--zero")
    stage = int(argv[i + 1])
    out = Path(argv[argv.index("--out") + 1])
    sys.argv = [sys.argv[0], *argv[:i], *argv[i + 2 :]]

    train = hf_trainer.CoLMTrainer.train

    def recording_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        engine = self.model_wrapped
        info = {
            "deepspeed": bool(getattr(self, "is_deepspeed_enabled", False)),
            "engine": type(engine).__name__,
            "optimizer": type(getattr(engine, "optimizer", self.optimizer)).__name__,
            "zero_stage": engine.zero_optimization_stage()
            if hasattr(engine, "zero_optimization_stage")
            else None,
        }
        out.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        (out / f"engine{rank}.json").write_text(json.dumps(info))
        return result

    hf_trainer.CoLMTrainer.train = recording_train
    if stage:
        # the module as it is now: importing transformers.Trainer (above) can replace it
        transformers = sys.modules["transformers"]
        plain = transformers.TrainingArguments

        def with_deepspeed(*args, **kwargs):
            return plain(*args, **kwargs, deepspeed=_ds_config(stage))

        transformers.TrainingArguments = with_deepspeed
    ddp_worker.main()
    # Everything is written. Leave without the interpreter's teardown: a DeepSpeed/gloo
    # thread still joinable at static destruction can abort the process ("terminate
    # called without an active exception") after a run that succeeded.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _worker()
else:
    import pytest
    import torch

    from tests.integrations.test_distributed import assert_same_run

    pytestmark = pytest.mark.distributed

    @pytest.fixture(scope="session")
    def extensions_dir(tmp_path_factory) -> Path:
        """Where this session's launches JIT-compile DeepSpeed's ops (once, then cached)."""
        return tmp_path_factory.mktemp("torch-extensions")

    def launch(
        out: Path, processes: int, zero: int, *extra: str, ext: Path, expect_ok: bool = True
    ):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", str(Path(__file__).resolve()), "--out", str(out),
            "--mode", "trainer", "--steps", "4", "--micro", "8", "--zero", str(zero), *extra,
        ]  # fmt: skip
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(ROOT),
            "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(ext),
        }
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{processes}-process ZeRO-{zero} run hung (> {TIMEOUT} s): {e}")
        if not expect_ok:
            return proc
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs = []
        for r in range(processes):
            run = json.loads((out / f"rank{r}.json").read_text())
            run["engine"] = json.loads((out / f"engine{r}.json").read_text())
            runs.append(run)
        return runs

    @pytest.mark.slow
    def test_zero_1_and_2_on_two_processes_select_and_train_as_one_plain_process(
        tmp_path, extensions_dir
    ):
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
        plain = launch(tmp_path / "plain", 1, 0, ext=extensions_dir)[0]
        assert plain["engine"]["deepspeed"] is False
        # training moved the adapter (B starts at zero)
        moved = [torch.tensor(v).abs().max() for k, v in plain["lora"].items() if "lora_B" in k]
        assert all(float(m) > 0 for m in moved)
        for stage in (1, 2):
            two = launch(tmp_path / f"zero{stage}", 2, stage, ext=extensions_dir)
            for run in two:
                assert run["engine"] == {
                    "deepspeed": True,
                    "engine": "DeepSpeedEngine",
                    "optimizer": "DeepSpeedZeroOptimizer",
                    "zero_stage": stage,
                }
            assert two[0]["world"] == 2
            assert [s["stats"]["processes"] for s in two[0]["steps"]] == [2, 2, 2, 2]
            assert_same_run(plain, two)

    @pytest.mark.slow
    def test_zero_3_with_the_default_selection_trains_as_one_plain_process(
        tmp_path, extensions_dir
    ):
        """ZeRO-3 partitions every parameter; random_big (the default) reads none, so
        CoLMTrainer runs under it: the same coresets, losses and LoRA weights (gathered
        whole at the end) as one plain process."""
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
        plain = launch(tmp_path / "plain", 1, 0, "--selection", "random_big", ext=extensions_dir)[0]
        assert plain["engine"]["deepspeed"] is False
        two = launch(tmp_path / "zero3", 2, 3, "--selection", "random_big", ext=extensions_dir)
        for run in two:
            assert run["engine"]["deepspeed"] is True
            assert run["engine"]["zero_stage"] == 3
        # every step kept the small sources whole and computed no features
        for step in plain["steps"]:
            for name in ("small1", "small2"):
                counts = step["stats"]["sources"].get(name)
                assert counts is None or counts["selected"] == counts["in_batch"]
            assert step["stats"]["time_features"] == 0.0
        assert [s["stats"]["processes"] for s in two[0]["steps"]] == [2, 2, 2, 2]
        assert_same_run(plain, two)

    @pytest.mark.slow
    @pytest.mark.parametrize("feature", ["zo", "exact"])
    def test_zero_3_with_gradient_features_selects_and_trains_as_one_plain_process(
        tmp_path, extensions_dir, feature
    ):
        """ZeRO-3 with the paper's selection: the trunk pass runs through DeepSpeed's
        hooks, the last block, final norm and head are gathered for the replay and
        partitioned again; 2 processes pick the same coresets and reach the same LoRA
        weights as one plain process. With zo, resuming the ZeRO-3 run from its step-2
        checkpoint (DeepSpeed's sharded checkpoint + the selector state) continues it
        identically."""
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
        args = ("--selection", "colm", "--feature", feature, "--save-steps", "2")
        plain = launch(tmp_path / "plain", 1, 0, *args, ext=extensions_dir)[0]
        two = launch(tmp_path / "zero3", 2, 3, *args, ext=extensions_dir)
        for run in two:
            assert run["engine"]["zero_stage"] == 3
            assert run["engine"]["optimizer"] == "DeepSpeedZeroOptimizer_Stage3"
        for step in two[0]["steps"]:
            assert step["stats"]["processes"] == 2
            assert step["stats"]["time_features"] > 0  # features were computed
        assert_same_run(plain, two)
        # each selection step gathered exactly the last block, final norm and head
        from tests.integrations.test_fsdp import replayed_bytes

        for run in two:
            assert [s["gathered_bytes"] for s in run["steps"]] == [replayed_bytes()] * 4
        assert [s["gathered_bytes"] for s in plain["steps"]] == [0] * 4
        if feature != "zo":
            return
        ckpt = tmp_path / "zero3" / "trainer" / "checkpoint-2"
        assert (ckpt / "colm_selector.pt").exists() and (ckpt / "colm_complete").exists()
        assert any(p.name.startswith("global_step") for p in ckpt.iterdir())  # DeepSpeed's
        again = tmp_path / "resumed" / "trainer" / "checkpoint-2"
        shutil.copytree(ckpt, again)
        resumed = launch(
            tmp_path / "resumed", 2, 3, *args, "--resume", str(again), ext=extensions_dir
        )
        picked = [s["picked"] for s in resumed[0]["steps"]]
        assert picked == [s["picked"] for s in two[0]["steps"][2:]]
        assert resumed[0]["losses"] == pytest.approx(two[0]["losses"], abs=1e-5)
        for name, values in two[0]["lora"].items():
            diff = (torch.tensor(values) - torch.tensor(resumed[0]["lora"][name])).abs().max()
            assert float(diff) < 1e-5, name

    @pytest.mark.slow
    def test_colm_train_under_torchrun_with_zero3_matches_one_process(
        tmp_path, tiny_model_dir, extensions_dir
    ):
        """`torchrun --nproc_per_node 2 -m colm.cli train CONFIG` with
        train.deepspeed: configs/deepspeed_zero3.json and the paper's selection (zo
        features): the same per-step losses and selections as 1 plain process, and the
        adapter, gathered from its partitions to be saved, equals the plain one. The
        held-out curve (before training, every 2 steps: every process computes it in
        step) and the final evaluation (of the saved adapter, loaded whole) are the
        plain run's."""
        pytest.importorskip("deepspeed", reason="deepspeed is not installed")
        from tests.integrations.test_distributed import _cli, assert_same_cli_run

        env = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions_dir)}
        heldout = {"enabled": True, "generate": False, "at_start": True, "every": 2}
        one = _cli(tmp_path, tiny_model_dir, "one", 1, eval_cfg=heldout)
        zero3 = ROOT / "configs" / "deepspeed_zero3.json"
        two = _cli(
            tmp_path, tiny_model_dir, "two", 2, deepspeed=zero3, env_extra=env, eval_cfg=heldout
        )
        steps = assert_same_cli_run(one, two)
        assert all(x["colm/time_features"] > 0 for x in steps)
        curves = [
            [json.loads(x) for x in (run / "heldout.jsonl").read_text().splitlines()]
            for run in (one, two)
        ]
        assert [p["step"] for p in curves[1]] == [p["step"] for p in curves[0]] == [0, 2, 3]
        for a_point, b_point in zip(*curves):
            assert sorted(a_point["loss"]) == sorted(b_point["loss"])
            for src, value in a_point["loss"].items():
                assert b_point["loss"][src] == pytest.approx(value, abs=1e-5), src
        final = [json.loads((run / "eval.json").read_text())["loss"] for run in (one, two)]
        assert final[1] == pytest.approx(final[0], abs=1e-5)
