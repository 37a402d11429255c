"""User data: file formats, validation errors, tokenization with label masks, collation."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch

from colm.data import (
    CoLMCollator,
    load_records,
    source_counts,
    tokenize_records,
)
from colm.data.tokenize import IGNORE_INDEX

ROWS = [
    {"source": "gsm", "prompt": "What is 2 + 3?", "completion": "2 + 3 = 5\nAnswer: 5"},
    {"source": "gsm", "prompt": "What is 7 * 6?", "completion": "Answer: 42"},
    {"source": "tiny", "prompt": 'Say hi, "politely".', "completion": "Hello, there!"},
]
CHAT_ROWS = [
    {
        "source": "chat",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris"},
        ],
    },
    {
        "source": "chat",
        "messages": [
            {"role": "user", "content": "1+1?"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "Wrong."},
            {"role": "assistant", "content": "Answer: 2"},
        ],
    },
]


def _write(path, rows):
    """Write rows in the format named by the path's extension."""
    ext = path.suffix
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif ext == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif ext == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            fields = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise AssertionError(ext)
    return path


def _core(records):
    return [(r["source"], r["prompt"], r["completion"]) for r in records]


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_prompt_completion_round_trip(tmp_path, ext):
    records = load_records(_write(tmp_path / f"data{ext}", ROWS))
    assert _core(records) == [(r["source"], r["prompt"], r["completion"]) for r in ROWS]
    assert all(r["prompt_messages"] is None for r in records)


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".parquet"])
def test_messages_round_trip(tmp_path, ext):
    with pytest.warns(UserWarning, match="after the last assistant"):
        records = load_records(_write(tmp_path / f"chat{ext}", CHAT_ROWS + [_trailing_user()]))
    first, second, third = records
    assert first["completion"] == "Paris"
    assert first["prompt_messages"] == CHAT_ROWS[0]["messages"][:2]
    assert first["prompt"] == "system: You are terse.\nuser: Capital of France?\nassistant: "
    # The LAST assistant message is the target; earlier turns are the prompt.
    assert second["completion"] == "Answer: 2"
    assert [m["content"] for m in second["prompt_messages"]] == ["1+1?", "3", "Wrong."]
    assert third["completion"] == "ok" and len(third["prompt_messages"]) == 1


def _trailing_user():
    return {
        "source": "chat",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "dangling"},
        ],
    }


def test_dataset_and_list_inputs():
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    assert _core(load_records(ds)) == _core(load_records(ROWS))
    assert _core(load_records(ds)) == [(r["source"], r["prompt"], r["completion"]) for r in ROWS]


def test_custom_column_names_and_extra_columns_kept(tmp_path):
    rows = [
        {"dataset": "a", "question": "q1", "target": "t1", "answer": "1"},
        {"dataset": "b", "question": "q2", "target": "t2", "answer": "2"},
    ]
    records = load_records(
        _write(tmp_path / "x.jsonl", rows),
        source_column="dataset",
        prompt_field="question",
        completion_field="target",
    )
    assert _core(records) == [("a", "q1", "t1"), ("b", "q2", "t2")]
    assert [r["answer"] for r in records] == ["1", "2"]  # kept for grading later
    assert "dataset" not in records[0] and "question" not in records[0]


def test_custom_messages_field(tmp_path):
    rows = [{"src": "s", "conv": CHAT_ROWS[0]["messages"]}]
    records = load_records(
        _write(tmp_path / "c.jsonl", rows), source_column="src", messages_field="conv"
    )
    assert records[0]["completion"] == "Paris"


def test_trl_conversational_prompt_completion():
    rows = [
        {
            "source": "s",
            "prompt": [{"role": "user", "content": "Hi?"}],
            "completion": [{"role": "assistant", "content": "Hello."}],
        }
    ]
    (r,) = load_records(rows)
    assert r["prompt_messages"] == [{"role": "user", "content": "Hi?"}]
    assert r["completion"] == "Hello."


def test_source_counts():
    records = load_records(ROWS * 3)
    assert source_counts(records) == {"gsm": 6, "tiny": 3}
    assert list(source_counts([{"source": "b"}, {"source": "a"}])) == ["a", "b"]
    with pytest.raises(ValueError, match="no 'source'"):
        source_counts([{"prompt": "x"}])


# --------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"data\.txt.*\.jsonl, \.json, \.csv, \.parquet"):
        load_records(path)


def test_missing_source_column_names_the_columns(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c", "origin": "x"}])
    with pytest.raises(ValueError) as err:
        load_records(path)
    msg = str(err.value)
    assert "d.jsonl" in msg and "row 1" in msg and "'source'" in msg
    assert "'prompt', 'completion', 'origin'" in msg and "source_column=" in msg


@pytest.mark.parametrize(
    "value, match",
    [("", "empty"), ("   ", "empty"), (None, "non-empty strings"), (3, "non-empty strings")],
)
def test_bad_source_values(value, match):
    rows = [ROWS[0], {**ROWS[1], "source": value}]
    with pytest.raises(ValueError, match=rf"row 2: .*{match}"):
        load_records(rows)


def test_empty_csv_source_cell(tmp_path):
    path = _write(tmp_path / "d.csv", [ROWS[0], {**ROWS[1], "source": ""}])
    with pytest.raises(ValueError, match=r"d\.csv: row 2: source 'source' is empty"):
        load_records(path)


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".json"])
def test_empty_file(tmp_path, ext):
    path = tmp_path / f"empty{ext}"
    path.write_text("[]" if ext == ".json" else "")
    with pytest.raises(ValueError, match="has no examples"):
        load_records(path)


def test_empty_dataset():
    import datasets

    with pytest.raises(ValueError, match="no examples"):
        load_records(datasets.Dataset.from_list([]))
    with pytest.raises(ValueError, match="no examples"):
        load_records([])


def test_dataset_dict_asks_for_a_split():
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(ValueError, match=r"splits \['train'\].*ds\['train'\]"):
        load_records(dd)


def test_neither_prompt_completion_nor_messages():
    with pytest.raises(
        ValueError, match=r"row 1: needs either 'prompt' and 'completion' or 'messages'"
    ):
        load_records([{"source": "a", "prompt": "only a prompt"}])


def test_empty_completion():
    with pytest.raises(ValueError, match="row 1: the completion is empty"):
        load_records([{"source": "a", "prompt": "p", "completion": "  "}])


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([], "non-empty list"),
        ("not json", "not JSON"),
        ([{"role": "user"}], "string 'role' and 'content'"),
    ],
)
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        load_records([{"source": "a", "messages": messages}])


def test_corrupt_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"source": "a", "prompt": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        load_records(path)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="line 1 is a JSON list, not an object"):
        load_records(path)


def test_corrupt_parquet(tmp_path):
    path = _write(tmp_path / "good.parquet", ROWS)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable Parquet file"):
        load_records(broken)


def test_binary_file_with_text_extension(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ValueError, match=r"bin\.jsonl: not UTF-8"):
        load_records(path)


def test_csv_row_with_extra_fields(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("source,prompt,completion\na,p,c\nb,p,c,extra\n")
    with pytest.raises(ValueError, match=r"row 2 has more fields than the header"):
        load_records(path)


def test_unsupported_object():
    with pytest.raises(ValueError, match="cannot read examples from a int"):
        load_records(3)


# --------------------------------------------------------------------------- tokenizing


def _unmasked(example):
    return [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX]


def _check_masks(examples, records, tokenizer):
    eos = tokenizer.eos_token
    for ex, r in zip(examples, records):
        assert len(ex["input_ids"]) == len(ex["labels"]) == len(ex["attention_mask"])
        assert all(m == 1 for m in ex["attention_mask"])
        labels = ex["labels"]
        n_prompt = labels.index(next(lab for lab in labels if lab != IGNORE_INDEX))
        # Prompt masked, completion (+ EOS) unmasked, one contiguous block at the end.
        assert all(lab == IGNORE_INDEX for lab in labels[:n_prompt])
        assert labels[n_prompt:] == ex["input_ids"][n_prompt:]
        assert tokenizer.decode(_unmasked(ex)) == r["completion"] + eos
        assert ex["source"] == r["source"]


def test_plain_tokenizer_concatenates(plain_tokenizer):
    records = load_records(ROWS)
    examples, report = tokenize_records(records, plain_tokenizer, max_length=128)
    assert report.n_kept == 3 and report.n_dropped == 0 and report.n_truncated == 0
    _check_masks(examples, records, plain_tokenizer)
    for ex, r in zip(examples, records):
        assert (
            plain_tokenizer.decode(ex["input_ids"]) == r["prompt"] + r["completion"] + "<|im_end|>"
        )
        assert "<|im_start|>" not in plain_tokenizer.decode(ex["input_ids"])


def test_chat_template_wraps_the_prompt(chat_tokenizer):
    records = load_records(ROWS)
    examples, _ = tokenize_records(records, chat_tokenizer, max_length=256)
    _check_masks(examples, records, chat_tokenizer)
    for ex, r in zip(examples, records):
        prompt = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False
        )
        assert chat_tokenizer.decode(ex["input_ids"]) == prompt + r["completion"] + "<|im_end|>"
        assert prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_uses_the_messages(chat_tokenizer):
    records = load_records(CHAT_ROWS)
    examples, _ = tokenize_records(records, chat_tokenizer, max_length=256)
    _check_masks(examples, records, chat_tokenizer)
    text = chat_tokenizer.decode(examples[0]["input_ids"])
    assert "You are terse." in text and "SmolLM" not in text  # the data's system prompt
    second = chat_tokenizer.decode(examples[1]["input_ids"])
    # Earlier assistant turns are context, not targets.
    assert "<|im_start|>assistant\n3<|im_end|>" in second
    assert chat_tokenizer.decode(_unmasked(examples[1])) == "Answer: 2<|im_end|>"


def test_messages_without_template_use_the_flat_prompt(plain_tokenizer):
    records = load_records(CHAT_ROWS[:1])
    (ex,), _ = tokenize_records(records, plain_tokenizer, max_length=256)
    assert plain_tokenizer.decode(ex["input_ids"]).startswith("system: You are terse.\nuser: ")


def _long_records():
    return [
        {"source": "a", "prompt": "short", "completion": "one two three " * 30},
        {"source": "a", "prompt": "word " * 100, "completion": "x y z"},
        {"source": "a", "prompt": "fine", "completion": "ok"},
        {"source": "b", "prompt": "fine", "completion": "ok"},
    ]


def test_truncate_counts_and_warns(plain_tokenizer):
    with pytest.warns(UserWarning, match="1 truncated.*1 dropped with no completion"):
        examples, report = tokenize_records(_long_records(), plain_tokenizer, max_length=32)
    assert (report.n_input, report.n_kept, report.n_truncated) == (4, 3, 1)
    assert report.n_dropped_no_completion == 1 and report.n_dropped_too_long == 0
    assert report.kept_per_source == {"a": 2, "b": 1}
    assert report.dropped_per_source == {"a": 1}
    assert all(len(ex["input_ids"]) <= 32 for ex in examples)
    cut = examples[0]
    assert len(cut["input_ids"]) == 32
    assert cut["input_ids"][-1] != plain_tokenizer.eos_token_id  # EOS was cut off too
    assert plain_tokenizer.decode(_unmasked(cut)) in _long_records()[0]["completion"]
    assert report.as_dict()["n_dropped"] == 1


def test_drop_counts_and_warns(plain_tokenizer):
    with pytest.warns(UserWarning, match="2 dropped as too long"):
        examples, report = tokenize_records(
            _long_records(), plain_tokenizer, max_length=32, overflow="drop"
        )
    assert report.n_kept == 2 and report.n_dropped_too_long == 2 and report.n_truncated == 0
    assert [ex["source"] for ex in examples] == ["a", "b"]


def test_no_warning_when_nothing_changes(plain_tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_records(load_records(ROWS), plain_tokenizer, max_length=128)


def test_source_with_no_usable_examples_is_an_error(plain_tokenizer):
    records = [
        {"source": "ok", "prompt": "p", "completion": "c"},
        {"source": "doomed", "prompt": "word " * 100, "completion": "c"},
    ]
    with pytest.raises(ValueError, match=r"\['doomed'\] have no usable examples at max_length=16"):
        tokenize_records(records, plain_tokenizer, max_length=16)


def test_tokenize_rejects_bad_arguments(plain_tokenizer):
    records = load_records(ROWS)
    with pytest.raises(ValueError, match="overflow"):
        tokenize_records(records, plain_tokenizer, 64, overflow="wrap")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_records(records, plain_tokenizer, 0)
    with pytest.raises(ValueError, match="no examples"):
        tokenize_records([], plain_tokenizer, 64)
    with pytest.raises(ValueError, match=r"example 0: 'completion' must be a string.*load_records"):
        tokenize_records([{"source": "a", "prompt": "p"}], plain_tokenizer, 64)


def test_mixture_records_tokenize(chat_tokenizer):
    from colm.data.mixture import MixtureSpec, SourceSpec, build_default_mixture

    spec = MixtureSpec(
        train=[SourceSpec("gsm_symbolic", 4), SourceSpec("gcd", 2)], test_per_source=0, ood=[]
    )
    train, _, _ = build_default_mixture(spec)
    examples, report = tokenize_records(train, chat_tokenizer, max_length=512)
    assert report.n_kept == 6
    _check_masks(examples, train, chat_tokenizer)


# --------------------------------------------------------------------------- collating


def test_collator_pads_right(plain_tokenizer):
    examples, _ = tokenize_records(load_records(ROWS), plain_tokenizer, max_length=128)
    batch = CoLMCollator(plain_tokenizer)(examples)
    width = max(len(ex["input_ids"]) for ex in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert batch["input_ids"].dtype == torch.long
    assert batch["source"] == ["gsm", "gsm", "tiny"]
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == ex["input_ids"]
        assert batch["labels"][i, :n].tolist() == ex["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == plain_tokenizer.pad_token_id).all()


def test_collator_pad_to_multiple_and_tensor_inputs(plain_tokenizer):
    features = [
        {
            "input_ids": torch.tensor([5, 6, 7]),
            "attention_mask": [1, 1, 1],
            "labels": [-100, 6, 7],
            "source": "a",
        },
        {"input_ids": [8], "attention_mask": [1], "labels": [8], "source": "b"},
    ]
    batch = CoLMCollator(plain_tokenizer, pad_to_multiple_of=8)(features)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["labels"][1].tolist() == [8] + [IGNORE_INDEX] * 7


def test_collator_without_labels_or_source(plain_tokenizer):
    batch = CoLMCollator(plain_tokenizer)([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_collator_errors(plain_tokenizer):
    collate = CoLMCollator(plain_tokenizer)
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match="'labels' has 1 entries, input_ids has 2"):
        collate([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="some examples have a 'source'"):
        collate([{"input_ids": [1], "source": "a"}, {"input_ids": [2]}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        CoLMCollator(plain_tokenizer, pad_to_multiple_of=0)

    class NoPad:
        pad_token_id = None
        eos_token_id = None

    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        CoLMCollator(NoPad())
