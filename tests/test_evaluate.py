"""colm.evaluate: held-out loss against a per-example twin, generation with a stub model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import colm.evaluate as ev
from colm.data import MixtureSpec, SourceSpec, build_default_mixture, tokenize_records
from tests.conftest import tiny_lm_for as tiny_lm

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer(chat_tokenizer):
    """SmolLM2's tokenizer (chat template), with a pad token."""
    tok = copy.deepcopy(chat_tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    return tok


@pytest.fixture(scope="module")
def mixture():
    spec = MixtureSpec(
        train=[SourceSpec("basic_arithmetic", 4), SourceSpec("gcd", 3)],
        test_per_source=3,
        ood=[SourceSpec("products", 2)],
        seed=0,
    )
    return build_default_mixture(spec)


class StubLM(nn.Module):
    """A "model" whose greedy answer to each prompt is a fixed text, then EOS, then junk.

    ``forward`` is a real tiny model's, so the loss path works too. Records
    every ``generate`` call for inspection.
    """

    def __init__(self, tokenizer, replies: dict[tuple[int, ...], str], junk: str = " 999 junk"):
        super().__init__()
        self.inner = tiny_lm(tokenizer)
        self.tok = tokenizer
        self.replies = replies
        self.junk = tokenizer(junk, add_special_tokens=False)["input_ids"]
        self.calls: list[dict] = []

    def forward(self, **kw):
        return self.inner(**kw)

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        self.calls.append(
            {"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(), **kw}
        )
        eos = self.tok.eos_token_id
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(t for t, m in zip(ids, mask) if m)
            reply = self.tok(self.replies[prompt], add_special_tokens=False)["input_ids"]
            rows.append((reply + [eos] + self.junk)[:max_new_tokens])
        width = max(len(r) for r in rows)
        new = [r + [kw["pad_token_id"]] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(new, dtype=torch.long)], dim=1)


def replies_for(tokenizer, records, text_of):
    prompts = ev.prompt_token_ids(records, tokenizer)
    return {tuple(p): text_of(r) for p, r in zip(prompts, records)}


def wrong_completion(record) -> str:
    return f"Answer: {int(record['answer']) + 1}"


# --------------------------------------------------------------------------- held-out loss


def _loss_per_example_twin(model, tokenizer, records, max_length):
    """Obviously-correct twin: one example at a time, the model's own label loss."""
    sums, counts = {}, {}
    examples, _ = tokenize_records(records, tokenizer, max_length=max_length)
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        n = int((labels[0, 1:] != -100).sum())
        sums[ex["source"]] = sums.get(ex["source"], 0.0) + loss * n
        counts[ex["source"]] = counts.get(ex["source"], 0) + n
    return {s: sums[s] / counts[s] for s in sums}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_heldout_loss_matches_per_example_twin(tokenizer, mixture, batch_size):
    model = tiny_lm(tokenizer)
    records = mixture.test_in + mixture.test_out
    got = ev.heldout_loss(model, tokenizer, records, max_length=256, batch_size=batch_size)
    want = _loss_per_example_twin(model, tokenizer, records, 256)
    assert list(got) == ["basic_arithmetic", "gcd", "products"]  # first-appearance order
    for source in want:
        assert got[source] == pytest.approx(want[source], rel=1e-5)


def test_heldout_losses_standard_error_is_the_ratio_estimators(tokenizer, mixture):
    """The SE of each source's token-weighted loss, from the per-example twin's sums and
    counts: the delta method for a ratio of means, written out plainly."""
    model = tiny_lm(tokenizer)
    records = mixture.test_in + mixture.test_out
    got = ev.heldout_losses(model, tokenizer, records, max_length=256, batch_size=4)
    examples, _ = tokenize_records(records, tokenizer, max_length=256)
    per: dict[str, list[tuple[float, int]]] = {}
    for ex in examples:
        labels = torch.tensor([ex["labels"]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ex["input_ids"]]), labels=labels).loss.item()
        n = int((labels[0, 1:] != -100).sum())
        per.setdefault(ex["source"], []).append((loss * n, n))
    for source, rows in per.items():
        s = torch.tensor([r[0] for r in rows], dtype=torch.float64)
        n = torch.tensor([r[1] for r in rows], dtype=torch.float64)
        ratio = s.sum() / n.sum()
        m = len(rows)
        var = ((s - ratio * n) ** 2).sum() / (m - 1) / m / n.mean() ** 2
        assert got[source].examples == m and got[source].tokens == int(n.sum())
        assert got[source].loss == pytest.approx(float(ratio), rel=1e-5)
        assert got[source].se == pytest.approx(float(var.sqrt()), rel=1e-4)
        lo, hi = got[source].ci95
        assert lo < got[source].loss < hi
    one = ev.heldout_losses(model, tokenizer, mixture.test_in[:1], max_length=256)
    assert all(math.isnan(v.se) for v in one.values())  # one example: no spread to measure


class _NoSlicing(torch.nn.Module):
    """A causal LM whose forward takes no logits_to_keep (the plain path must be used)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, input_ids, attention_mask):
        self.calls.append(input_ids.shape)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_heldout_loss_logits_at_label_positions_only_and_the_plain_fallback(tokenizer, mixture):
    model = tiny_lm(tokenizer)
    records = mixture.test_in + mixture.test_out
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fast = ev.heldout_loss(model, tokenizer, records, max_length=256, batch_size=4)
    hook.remove()
    assert all(len(shape) == 2 for shape in seen)  # [label tokens, vocab]: sliced
    plain_model = _NoSlicing(model)
    plain = ev.heldout_loss(plain_model, tokenizer, records, max_length=256, batch_size=4)
    assert len(plain_model.calls) > 1  # every batch went the plain way
    for source in fast:
        assert fast[source] == pytest.approx(plain[source], rel=1e-5)


def test_heldout_loss_restores_training_mode_and_grad(tokenizer, mixture):
    model = tiny_lm(tokenizer).train()
    ev.heldout_loss(model, tokenizer, mixture.test_in[:2])
    assert model.training
    assert torch.is_grad_enabled()


def test_heldout_loss_without_chat_template(plain_tokenizer, mixture):
    model = tiny_lm(plain_tokenizer)
    got = ev.heldout_loss(model, plain_tokenizer, mixture.test_in, batch_size=3)
    want = _loss_per_example_twin(model, plain_tokenizer, mixture.test_in, 512)
    assert got == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- prompts


def test_prompt_ids_are_the_training_prompt(tokenizer, plain_tokenizer, mixture):
    record = mixture.test_in[0]
    [ids] = ev.prompt_token_ids([record], tokenizer)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": record["prompt"]}], add_generation_prompt=True, tokenize=False
    )
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    [plain] = ev.prompt_token_ids([record], plain_tokenizer)
    assert plain_tokenizer.decode(plain) == record["prompt"]


# --------------------------------------------------------------------------- generation


def test_gold_completions_score_one_and_wrong_ones_less(tokenizer, mixture):
    records = mixture.test_in + mixture.test_out
    gold = StubLM(tokenizer, replies_for(tokenizer, records, lambda r: r["completion"]))
    acc = ev.generation_accuracy(gold, tokenizer, records, batch_size=4)
    assert set(acc) == {"basic_arithmetic", "gcd", "products"}
    for task, a in acc.items():
        assert a == {"accuracy": 1.0, "n": 3 if task != "products" else 2, "mean_score": 1.0}

    wrong = StubLM(tokenizer, replies_for(tokenizer, records, wrong_completion))
    outputs: list[dict] = []
    acc = ev.generation_accuracy(wrong, tokenizer, records, batch_size=4, outputs=outputs)
    assert all(a["accuracy"] == 0.0 and a["mean_score"] < 1.0 for a in acc.values())
    assert [o["generated"] for o in outputs] == [wrong_completion(r) for r in records]
    assert all(o["score"] < 1.0 for o in outputs)


def test_generation_decodes_new_tokens_up_to_eos_and_calls_scorer(tokenizer, mixture, monkeypatch):
    records = mixture.test_in
    stub = StubLM(tokenizer, replies_for(tokenizer, records, lambda r: r["completion"]))
    seen = []

    def spy(record, text):
        seen.append((record["entry_id"], text))
        return 0.5

    monkeypatch.setattr(ev, "score", spy)
    acc = ev.generation_accuracy(stub, tokenizer, records, batch_size=4)
    # new tokens only, cut at EOS: exactly the completion, no prompt, no junk after EOS
    assert sorted(seen) == sorted((r["entry_id"], r["completion"]) for r in records)
    assert all(a["accuracy"] == 0.0 and a["mean_score"] == 0.5 for a in acc.values())


def test_generation_left_pads_greedy_and_leaves_tokenizer_alone(tokenizer, mixture):
    records = mixture.test_in + mixture.test_out
    stub = StubLM(tokenizer, replies_for(tokenizer, records, lambda r: r["completion"]))
    side = tokenizer.padding_side
    stub.train()
    ev.generation_accuracy(stub, tokenizer, records, batch_size=8, max_new_tokens=5)
    assert tokenizer.padding_side == side
    assert stub.training  # mode restored
    padded = 0
    for call in stub.calls:
        assert call["do_sample"] is False and call["num_beams"] == 1
        mask = call["attention_mask"]
        # left padding: each row is 0...0 1...1, and every row ends on a real token
        assert torch.all(mask[:, 1:] >= mask[:, :-1])
        assert torch.all(mask[:, -1] == 1)
        padded += int((mask == 0).any())
    assert padded, "the test needs prompts of different lengths in one batch"


def test_generation_with_a_real_tiny_model(tokenizer, mixture):
    model = tiny_lm(tokenizer)
    texts = ev.generate_completions(model, tokenizer, mixture.test_out, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # batched (left-padded) generation equals one-at-a-time generation
    one = [
        ev.generate_completions(model, tokenizer, [r], max_new_tokens=4)[0]
        for r in mixture.test_out
    ]
    assert texts == one


def test_bad_arguments_are_named(tokenizer, mixture):
    model = tiny_lm(tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        ev.heldout_loss(model, tokenizer, mixture.test_in, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ev.generation_accuracy(model, tokenizer, mixture.test_in, max_new_tokens=0)
    with pytest.raises(ValueError, match="both empty"):
        ev.evaluate(model, tokenizer, [], [], progress=False)


# --------------------------------------------------------------------------- evaluate + output


@pytest.fixture(scope="module")
def result(tokenizer, mixture):
    # right answers in-domain, wrong ones out of domain
    replies = replies_for(tokenizer, mixture.test_in, lambda r: r["completion"])
    replies |= replies_for(tokenizer, mixture.test_out, wrong_completion)
    stub = StubLM(tokenizer, replies)
    return ev.evaluate(
        stub, tokenizer, mixture.test_in, mixture.test_out, batch_size=4, progress=False
    )


def test_evaluate_result_layout_and_summary(result):
    assert set(result["loss"]) == {"basic_arithmetic", "gcd", "products"}
    assert set(result["accuracy_in"]) == {"basic_arithmetic", "gcd"}
    assert set(result["accuracy_out"]) == {"products"}
    s = result["summary"]
    assert s["loss_in"] == pytest.approx(
        (result["loss"]["basic_arithmetic"] + result["loss"]["gcd"]) / 2
    )
    assert s["loss_out"] == pytest.approx(result["loss"]["products"])
    assert (s["acc_in"], s["acc_out"]) == (1.0, 0.0)
    assert s["acc_all"] == pytest.approx(2 / 3)  # mean over the three tasks
    assert (s["n_in"], s["n_out"]) == (6, 2)
    assert all(len(v) == 2 for v in result["samples"].values())
    assert result["samples"]["gcd"][0]["score"] == 1.0


def test_evaluate_without_generation(tokenizer, mixture):
    out = ev.evaluate(
        tiny_lm(tokenizer), tokenizer, mixture.test_in, generate=False, progress=False
    )
    assert out["accuracy_in"] == {} and out["accuracy_out"] == {}
    assert out["summary"]["acc_in"] is None and out["summary"]["loss_out"] is None
    assert math.isfinite(out["summary"]["loss_in"])


def test_write_eval_is_atomic_and_round_trips(result, tmp_path):
    path = tmp_path / "run" / "eval.json"
    assert ev.write_eval(result, path) == path
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    ev.write_eval({"summary": {}}, path)  # overwrite
    assert json.loads(path.read_text()) == {"summary": {}}
    # a failing write leaves the old file whole and no temporary file behind
    with pytest.raises(TypeError):
        ev.write_eval({"bad": object()}, path)
    assert json.loads(path.read_text()) == {"summary": {}}
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]


def test_format_table(result):
    table = ev.format_table(result)
    lines = table.splitlines()
    assert lines[0].startswith("loss_in ")
    assert "acc_in 1.000" in lines[0] and "acc_all 0.667" in lines[0]
    row = next(line for line in lines if line.startswith("products"))
    assert row.split()[1:4] == ["out", "2", "0.000"]
    assert f"{result['loss']['products']:.4f}" in row


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_smollm2_two_records_per_task(tmp_path):
    from colm.models import load_model

    model, tokenizer = load_model()
    spec = MixtureSpec(
        train=[SourceSpec(n, 4) for n in ("basic_arithmetic", "gcd", "leg_counting")],
        test_per_source=2,
        ood=[SourceSpec("products", 2)],
    )
    mix = build_default_mixture(spec)
    out = ev.evaluate(model, tokenizer, mix.test_in, mix.test_out, max_new_tokens=32, batch_size=4)
    for value in out["loss"].values():
        assert 0.0 < value < 10.0  # well below uniform (ln 49152 = 10.8)
    for acc in [*out["accuracy_in"].values(), *out["accuracy_out"].values()]:
        assert acc["n"] == 2 and 0.0 <= acc["accuracy"] <= acc["mean_score"] <= 1.0
    texts = [s["generated"] for v in out["samples"].values() for s in v]
    assert len(texts) == 8 and all(t.strip() for t in texts)
    print(ev.format_table(out))
    assert json.loads(ev.write_eval(out, tmp_path / "eval.json").read_text())["summary"]


def test_truncation_warning_once_per_process_not_per_evaluation(tokenizer, mixture, monkeypatch):
    import warnings

    monkeypatch.setattr(ev, "_WARNED", set())
    model = tiny_lm(tokenizer)
    full, _ = tokenize_records(mixture.test_in, tokenizer, max_length=1024)
    # long enough for every prompt and a completion token, shorter than some example
    cut = max(sum(1 for t in ex["labels"] if t == -100) for ex in full) + 2
    assert any(len(ex["input_ids"]) > cut for ex in full)
    with pytest.warns(UserWarning, match="truncated"):
        ev.heldout_loss(model, tokenizer, mixture.test_in, max_length=cut)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second evaluation of the same records: silent
        ev.heldout_loss(model, tokenizer, mixture.test_in, max_length=cut)
