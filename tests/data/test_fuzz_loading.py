"""Hostile input for the data loaders (issue 5), fuzzed with hypothesis.

Every case ends in one of two ways (the rules are in the docstring of
colm.data.reading, records, tokenize, collate): a DataError (a ValueError) that names the file, the row or
line and the field, or a documented skip with a count. Nothing else escapes.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from colm.data import (
    CoLMCollator,
    DataError,
    load_records,
    source_counts,
    tokenize_records,
)
from colm.data.tokenize import IGNORE_INDEX

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=25)  # the slower cases (several files, many draws)

FORMATS = (".jsonl", ".json", ".csv", ".parquet")
ODD = [
    "\x00",  # NUL
    "\u200f",  # RTL mark
    "\u202e",  # RTL override
    "\U0001f469\u200d\U0001f469\u200d\U0001f467",  # emoji ZWJ sequence
    "e\u0301\u0301",  # combining marks
    "\ufeff",  # BOM inside text
    "\u2028",  # line separator: not a .jsonl line break
    "\x1c",
    "\r\n",
    "\r",
    "\n",
    "\t",
    '"',
    ",",
    "\\",
    "{}",
    "\u00e9",
    " ",
]
# Any Unicode except lone surrogates (category Cs), plus the odd cases above.
chars = st.characters(blacklist_categories=("Cs",))
texts = st.lists(st.one_of(st.text(chars, max_size=8), st.sampled_from(ODD)), max_size=5).map(
    "".join
)
filled = texts.filter(lambda s: s.strip())  # what sources and completions need
not_text = st.one_of(
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_counter = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _fresh(folder, ext):
    return folder / f"f{next(_counter)}{ext}"


def _write(path, rows, ascii_json=True, bom=False):
    """Write rows in the format named by the path's extension (lists/dicts as JSON in CSV)."""
    ext = path.suffix
    prefix = "\ufeff" if bom else ""
    if ext == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=ascii_json) + "\n" for r in rows)
        path.write_text(prefix + text, encoding="utf-8", newline="")
    elif ext == ".json":
        path.write_text(prefix + json.dumps(rows, ensure_ascii=ascii_json), encoding="utf-8")
    elif ext == ".csv":
        buf = io.StringIO(newline="")
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
            )
        path.write_text(prefix + buf.getvalue(), encoding="utf-8", newline="")
    elif ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # from_pylist takes its columns from the first row; a row without a key gets None.
        fields = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in fields} for r in rows]), path)
    else:
        raise AssertionError(ext)
    return path


def _core(records):
    return [(r["source"], r["prompt"], r["completion"]) for r in records]


def _assert_names(err, *, row=None, line=None, field=None, name=None):
    """The DataError names what the test broke, in its attributes and in its message."""
    msg = str(err)
    if name is not None:
        assert err.name == str(name) and str(name) in msg, msg
    if row is not None:
        assert err.row == row and f"row {row}" in msg, msg
    if line is not None:
        assert err.line == line and f"line {line}" in msg, msg
    if field is not None:
        assert err.field == field and f"'{field}'" in msg, msg


# --------------------------------------------------------------------------- valid odd input


@st.composite
def pc_rows(draw, min_size=1, max_size=5):
    n = draw(st.integers(min_size, max_size))
    sources = draw(st.lists(filled, min_size=1, max_size=3))
    return [
        {
            "source": draw(st.sampled_from(sources)),
            "prompt": draw(texts),
            "completion": draw(filled),
            "id": draw(st.integers(0, 2)),  # duplicate ids are ordinary data
        }
        for _ in range(n)
    ]


@FEW
@given(rows=pc_rows(), ascii_json=st.booleans(), bom=st.booleans())
def test_odd_unicode_round_trips_through_every_format(folder, rows, ascii_json, bom):
    for ext in FORMATS:
        path = _write(_fresh(folder, ext), rows, ascii_json, bom and ext != ".parquet")
        records = load_records(path)
        assert _core(records) == [(r["source"], r["prompt"], r["completion"]) for r in rows], ext
        ids = [str(r["id"]) if ext == ".csv" else r["id"] for r in rows]
        assert [r["id"] for r in records] == ids  # duplicates kept, not deduplicated
    expected = Counter(r["source"] for r in rows)
    assert source_counts(records) == dict(sorted(expected.items(), key=lambda kv: (-kv[1], kv[0])))


def _messages(roles, max_size):
    message = st.fixed_dictionaries({"role": st.sampled_from(roles), "content": texts})
    return st.lists(message, max_size=max_size)


@st.composite
def conversations(draw):
    """Messages with a last assistant turn, possibly earlier ones and trailing non-assistant ones."""
    before = draw(_messages(["system", "user", "assistant", "tool"], 3))
    after = draw(_messages(["user", "tool"], 2))
    return before + [{"role": "assistant", "content": draw(filled)}] + after


@FEW
@given(convs=st.lists(conversations(), min_size=1, max_size=4), ext=st.sampled_from(FORMATS))
def test_messages_take_the_last_assistant_turn_and_count_dropped_turns(folder, convs, ext):
    rows = [{"source": "chat", "messages": m} for m in convs]
    path = _write(_fresh(folder, ext), rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = load_records(path)
    n_trailing = 0
    for msgs, r in zip(convs, records):
        last = max(j for j, m in enumerate(msgs) if m["role"] == "assistant")
        assert r["completion"] == msgs[last]["content"]
        assert r["prompt_messages"] == msgs[:last]
        n_trailing += last < len(msgs) - 1
    notes = [str(w.message) for w in caught if "after the last assistant" in str(w.message)]
    if n_trailing:
        assert len(notes) == 1 and f"{n_trailing} example(s)" in notes[0]
    else:
        assert notes == []


@FEW
@given(rows=pc_rows(min_size=1, max_size=3))
def test_single_example_sources_and_duplicate_records_are_kept(rows):
    rows = rows + [dict(rows[0])]  # an exact duplicate row
    rows.append({"source": "only-one", "prompt": "p", "completion": "c"})
    records = load_records(rows)
    assert len(records) == len(rows)
    counts = source_counts(records)
    assert counts["only-one"] == 1
    assert sum(counts.values()) == len(rows)
    assert counts[rows[0]["source"]] >= 2


# --------------------------------------------------------------------------- wrong and missing fields


GOOD = {"source": "s", "prompt": "p", "completion": "c"}


@st.composite
def bad_field(draw):
    """A (field, value) that no row may hold, and nothing else wrong."""
    name = draw(st.sampled_from(["source", "prompt", "completion"]))
    if name == "source":
        value = draw(st.one_of(not_text, st.none(), st.lists(st.integers(), max_size=2)))
        value = draw(st.sampled_from([value, "", "  \t\n"]))  # blank is as bad as absent
    else:
        value = draw(st.one_of(not_text, st.lists(st.integers(), max_size=2)))
        if name == "completion":
            value = draw(st.sampled_from([value, "", " \n\u3000"]))
    return name, value


@FUZZ
@given(n=st.integers(1, 6), data=st.data(), bad=bad_field(), as_file=st.booleans())
def test_a_wrong_type_names_the_row_and_the_field(folder, n, data, bad, as_file):
    name, value = bad
    k = data.draw(st.integers(0, n - 1), label="bad row")
    rows = [dict(GOOD) for _ in range(n)]
    rows[k][name] = value
    target = _write(_fresh(folder, ".jsonl"), rows) if as_file else rows
    with pytest.raises(DataError) as err:
        load_records(target)
    _assert_names(err.value, row=k + 1, field=name, name=target if as_file else "records")
    if as_file:
        assert err.value.line == k + 1


@st.composite
def bad_messages(draw):
    """A messages value that is not a non-empty list of {role, content} with an assistant."""
    good = {"role": "assistant", "content": "ok"}
    broken = draw(
        st.one_of(
            st.none().map(lambda _: {"role": "assistant"}),
            st.none().map(lambda _: {"content": "x"}),
            not_text.map(lambda v: {"role": v, "content": "x"}),
            st.one_of(not_text, st.none()).map(lambda v: {"role": "assistant", "content": v}),
            not_text,
            st.lists(st.integers(), max_size=2),
        )
    )
    return draw(
        st.sampled_from(
            [
                [good, broken],
                [broken],
                broken,  # not a list at all (or a list of non-messages)
                [],
                [{"role": "user", "content": "no assistant"}],
                '[{"role": "user"',  # broken JSON text, as in a CSV cell
            ]
        )
    )


@FUZZ
@given(n=st.integers(1, 4), data=st.data(), messages=bad_messages())
def test_bad_messages_name_the_row_and_the_field(n, data, messages):
    k = data.draw(st.integers(0, n - 1), label="bad row")
    ok = {"source": "s", "messages": [{"role": "assistant", "content": "fine"}]}
    rows = [dict(ok) for _ in range(n)]
    rows[k] = {"source": "s", "messages": messages}
    with pytest.raises(DataError) as err:
        load_records(rows)
    _assert_names(err.value, row=k + 1, field="messages")


@FUZZ
@given(
    bad=st.sampled_from(["prompt", "completion"]),
    messages=bad_messages().filter(lambda m: not isinstance(m, str)),  # a string is text
)
def test_trl_message_lists_in_prompt_or_completion_are_checked(bad, messages):
    row = {"source": "s", "prompt": [{"role": "user", "content": "hi"}], "completion": "c"}
    row[bad] = messages
    if (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        (record,) = load_records([row])  # a valid message list (roles are not checked here)
        assert isinstance(record["prompt"], str) and isinstance(record["completion"], str)
        return
    with pytest.raises(DataError) as err:
        load_records([row])
    _assert_names(err.value, row=1, field=bad)


def _expected_missing(row):
    """The field load_records must name when keys are missing, or None if the row is fine."""
    if "source" not in row:
        return "source"
    has_p, has_c = "prompt" in row, "completion" in row
    if has_p and has_c or "messages" in row:
        return None
    if has_p != has_c:
        return "completion" if has_p else "prompt"
    return "messages"


@FUZZ
@given(
    keep=st.lists(
        st.sets(st.sampled_from(["source", "prompt", "completion", "messages"])),
        min_size=1,
        max_size=5,
    ),
    ext=st.sampled_from([".jsonl", ".json", ".parquet", None]),
)
@example(keep=[{"source"}, {"source", "prompt", "completion"}], ext=".parquet")
def test_missing_fields_name_the_first_bad_row(folder, keep, ext):
    full = {
        "source": "s",
        "prompt": "p",
        "completion": "c",
        "messages": [{"role": "assistant", "content": "a"}],
    }
    rows = [{k: full[k] for k in sorted(ks)} | {"n": i} for i, ks in enumerate(keep)]
    target = rows if ext is None else _write(_fresh(folder, ext), rows)
    problems = [(i, _expected_missing(r)) for i, r in enumerate(rows) if _expected_missing(r)]
    if not problems:
        assert len(load_records(target)) == len(rows)
        return
    i, name = problems[0]
    with pytest.raises(DataError) as err:
        load_records(target)
    _assert_names(err.value, row=i + 1, field=name)


# --------------------------------------------------------------------------- text that is not Unicode


@FUZZ
@given(
    n=st.integers(1, 4),
    data=st.data(),
    name=st.sampled_from(["source", "prompt", "completion", "messages"]),
    surrogate=st.integers(0xD800, 0xDFFF),
    ext=st.sampled_from([".jsonl", ".json", ".csv"]),
)
def test_lone_surrogates_from_json_escapes_name_the_field(folder, n, data, name, surrogate, ext):
    # A CSV file is decoded as UTF-8, so only its JSON cells (messages) can hold the escape.
    assume(ext != ".csv" or name == "messages")
    k = data.draw(st.integers(0, n - 1), label="bad row")
    bad = f"x{chr(surrogate)}y"
    if name == "messages":
        rows = [{"source": "s", "messages": [{"role": "assistant", "content": "a"}]}] * n
        rows[k] = {"source": "s", "messages": [{"role": "assistant", "content": bad}]}
    else:
        rows = [dict(GOOD) for _ in range(n)]
        rows[k][name] = bad
    path = _write(_fresh(folder, ext), rows)  # json.dumps writes the \udxxx escape
    with pytest.raises(DataError) as err:
        load_records(path)
    _assert_names(err.value, row=k + 1, field=name, name=path)
    assert "UTF-8" in str(err.value) and "surrogate" in str(err.value)


@FUZZ
@given(
    name=st.sampled_from(["source", "prompt", "completion", "prompt_messages"]),
    surrogate=st.integers(0xD800, 0xDFFF),
)
def test_tokenize_refuses_unencodable_text_before_the_tokenizer_sees_it(name, surrogate):
    record = dict(GOOD, prompt_messages=None)
    bad = f"a{chr(surrogate)}"
    record[name] = [{"role": "user", "content": bad}] if name == "prompt_messages" else bad

    class Untouchable:  # the check must come before any tokenizer call
        chat_template = None
        eos_token_id = 0

        def __call__(self, *a, **k):
            raise AssertionError("tokenizer called")

    with pytest.raises(DataError) as err:
        tokenize_records([dict(GOOD), record], Untouchable(), max_length=16)
    _assert_names(err.value, field=name)
    assert err.value.index == 1 and "example 1" in str(err.value) and "UTF-8" in str(err.value)


# --------------------------------------------------------------------------- broken files


GARBAGE_LINES = st.one_of(
    st.sampled_from(
        [
            '{"source": "s", "prompt": ',  # cut off
            "{'source': 's'}",  # Python, not JSON
            '{"source": "s",}',
            "[1, 2]",
            "42",
            '"a string"',
            "null",
            "true",
            '{"source": "s", "prompt": "p", "completion": ' + "9" * 5000 + "}",  # int limit
            "[" * 50_000,  # nesting too deep for the parser
            '{"a": "\x01"}',  # raw control character in a string
        ]
    ),
    st.text(chars, min_size=1, max_size=30).filter(
        lambda s: s.strip() and "\n" not in s and not _is_object(s)
    ),
)


def _is_object(text):
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


@FUZZ
@given(
    n=st.integers(1, 6),
    data=st.data(),
    garbage=GARBAGE_LINES,
    blanks=st.lists(st.sampled_from(["", "  ", "\r", "\t"]), max_size=3),
    ext=st.sampled_from([".jsonl", ".json"]),
)
def test_a_bad_json_line_is_reported_with_its_line_number(folder, n, data, garbage, blanks, ext):
    k = data.draw(st.integers(0, n - 1), label="bad line")
    lines = [json.dumps(GOOD)] * n
    lines[k] = garbage
    if ext == ".json":  # a first line that is an object: JSON lines, not one JSON document
        lines = [json.dumps(GOOD)] + lines
        k += 1
    lines = blanks + lines  # blank lines count as lines, not as examples
    path = _fresh(folder, ext)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    with pytest.raises(DataError) as err:
        load_records(path)
    _assert_names(err.value, line=len(blanks) + k + 1, name=path)
    assert "JSON" in str(err.value)


@FUZZ
@given(n=st.integers(1, 5), data=st.data(), garbage=GARBAGE_LINES)
def test_a_broken_json_array_names_line_and_column(folder, n, data, garbage):
    k = data.draw(st.integers(0, n - 1), label="bad element")
    parts = [json.dumps(GOOD)] * n
    parts[k] = garbage
    path = _fresh(folder, ".json")
    path.write_text("[\n" + ",\n".join(parts) + "\n]", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_records(path)
    msg = str(err.value)
    if err.value.line is not None:  # did not parse: the place of the parse error
        assert f"line {err.value.line}" in msg and "not valid JSON" in msg
        assert 1 <= err.value.line <= n + 2
    else:  # parsed, but an element is not an object
        assert err.value.row == k + 1 and f"row {k + 1}" in msg and "not an object" in msg


BAD_BYTES = st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc3(", b"\xed\xa0\x80", b"\xf8\x88"])


@FUZZ
@given(
    n=st.integers(1, 6),
    data=st.data(),
    bad=BAD_BYTES,
    ext=st.sampled_from([".jsonl", ".json", ".csv"]),
    bom=st.booleans(),
)
def test_non_utf8_bytes_are_reported_with_their_line(folder, n, data, bad, ext, bom):
    k = data.draw(st.integers(0, n - 1), label="bad row")
    if ext == ".csv":
        lines = [b"source,prompt,completion"] + [b"s,p,c"] * n
        k += 1  # after the header
        lines[k] = b"s,p" + bad + b",c"
    else:
        lines = [json.dumps(GOOD).encode()] * n
        lines[k] = lines[k].replace(b'"p"', b'"p' + bad + b'"')
    path = _fresh(folder, ext)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as err:
        load_records(path)
    _assert_names(err.value, line=k + 1, name=path)
    assert "not UTF-8" in str(err.value)


def _empty_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [("source", pa.string()), ("prompt", pa.string()), ("completion", pa.string())]
    )
    pq.write_table(pa.Table.from_pylist([], schema=schema), path)


@pytest.mark.parametrize(
    "ext, content",
    [
        (".jsonl", ""),
        (".jsonl", "\n\n  \n\r\n"),
        (".jsonl", "\ufeff"),
        (".json", ""),
        (".json", "[]"),
        (".json", " [ ] \n"),
        (".csv", ""),
        (".csv", "source,prompt,completion\n"),
        (".csv", "\ufeffsource,prompt,completion\r\n"),
        (".parquet", None),
    ],
)
def test_files_without_examples_say_so(tmp_path, ext, content):
    path = tmp_path / f"empty{ext}"
    if content is None:
        _empty_parquet(path)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    with pytest.raises(DataError, match="has no examples") as err:
        load_records(path)
    assert err.value.name == str(path) and str(path) in str(err.value)


@pytest.mark.parametrize("ext", FORMATS)
def test_a_truncated_or_foreign_file_is_a_data_error(tmp_path, ext):
    good = _write(tmp_path / f"good{ext}", [GOOD] * 20)
    raw = good.read_bytes()
    # Cut inside a row: a CSV cut between rows would still be a valid (shorter) file.
    cut = raw.index(b",c", len(raw) // 2) if ext == ".csv" else len(raw) // 2 + 3
    for i, blob in enumerate([raw[:cut], raw[:7], b"PK\x03\x04\x00\x00", b"\x00" * 64]):
        path = tmp_path / f"bad{i}{ext}"
        path.write_bytes(blob)
        with pytest.raises(DataError) as err:
            load_records(path)
        assert str(path) in str(err.value)


def test_paths_and_objects_that_are_not_data(tmp_path):
    with pytest.raises(DataError, match="NUL"):
        load_records("a\x00b.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match="is not a file"):
        load_records(tmp_path / "dir.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load_records(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="wrap a single example in a list"):
        load_records(GOOD)
    for thing in (b"bytes", 3.5, None, iter([GOOD])):
        with pytest.raises(DataError, match="cannot read examples from a"):
            load_records(thing)
    with pytest.raises(DataError) as err:
        load_records([GOOD, GOOD, "not a dict"])
    _assert_names(err.value, row=3, name="records")


def test_jsonl_rows_after_blank_lines_give_row_and_line(tmp_path):
    path = tmp_path / "gaps.jsonl"
    bad = {"source": "s", "prompt": "p", "completion": 5}
    path.write_text(f"\n{json.dumps(GOOD)}\n \t\r\n{json.dumps(bad)}\n", newline="")
    with pytest.raises(
        DataError, match=r"gaps\.jsonl: row 2 \(line 4\): field 'completion'"
    ) as err:
        load_records(path)
    _assert_names(err.value, row=2, line=4, field="completion", name=path)


def test_a_wide_row_lists_a_bounded_number_of_columns():
    row = {f"col{i}": i for i in range(500)}
    with pytest.raises(DataError, match="and 480 more") as err:
        load_records([row])
    assert len(str(err.value)) < 1000 and err.value.field == "source"


def test_a_dataset_row_with_a_bad_source_is_named():
    import datasets

    ds = datasets.Dataset.from_list([GOOD, {**GOOD, "source": None}])
    with pytest.raises(DataError) as err:
        load_records(ds)
    _assert_names(err.value, row=2, field="source", name="dataset")


# --------------------------------------------------------------------------- CSV


def test_csv_cells_missing_blank_or_huge(tmp_path):
    path = tmp_path / "d.csv"
    big = "x" * 200_000  # over csv's default field limit of 131072 characters
    path.write_text(f"source,prompt,completion\na,{big},c\nb,,c2\n", encoding="utf-8")
    limit = csv.field_size_limit()
    records = load_records(path)
    assert csv.field_size_limit() == limit  # the module-wide setting is restored
    assert [len(r["prompt"]) for r in records] == [200_000, 0]  # a blank prompt is allowed

    path.write_text("source,prompt,completion\na,p,c\nb,p\n")  # a short row: no completion
    with pytest.raises(DataError) as err:
        load_records(path)
    _assert_names(err.value, row=2, field="completion")

    path.write_text("source,prompt,completion\na,p,\n")  # a blank completion
    with pytest.raises(DataError, match="completion is empty") as err:
        load_records(path)
    _assert_names(err.value, row=1, field="completion")

    path.write_text("source,prompt,prompt,completion\na,p,q,c\n")
    with pytest.raises(DataError, match=r"repeats column\(s\) \['prompt'\]") as err:
        load_records(path)
    assert err.value.field == "prompt"

    path.write_text('source,prompt,completion\na,"p\nstill p",c\nb,p,c,extra\n')
    with pytest.raises(DataError, match="row 2 has more fields than the header") as err:
        load_records(path)
    assert err.value.row == 2 and err.value.line == 4 and "line 4" in str(err.value)

    path.write_text("source,messages\ns,not json\n")
    with pytest.raises(DataError, match="not JSON") as err:
        load_records(path)
    _assert_names(err.value, row=1, field="messages")


# --------------------------------------------------------------------------- tokenizing

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def byte_tokenizers():
    """A real HF fast tokenizer, byte-level without merges (one token per UTF-8 byte), built
    in memory in milliseconds: (without a chat template, with a ChatML template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<pad>"])
    plain = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    chat = copy.deepcopy(plain)
    chat.chat_template = CHATML
    return plain, chat


@st.composite
def tokenizable(draw):
    sources = draw(st.lists(filled, min_size=1, max_size=3, unique=True))
    records = []
    for _ in range(draw(st.integers(1, 6))):
        prompt = draw(texts) * draw(st.sampled_from([1, 1, 4]))
        messages = draw(st.one_of(st.none(), _messages(["system", "user", "assistant"], 2)))
        records.append(
            {
                "source": draw(st.sampled_from(sources)),
                "prompt": prompt,
                "completion": draw(filled),
                "prompt_messages": messages or None,
            }
        )
    return records


def _prompt_len(tokenizer, record):
    if tokenizer.chat_template:
        messages = record["prompt_messages"] or [{"role": "user", "content": record["prompt"]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(tokenizer(record["prompt"])["input_ids"])


@FUZZ
@given(
    records=tokenizable(),
    max_length=st.integers(2, 48),
    overflow=st.sampled_from(["truncate", "drop"]),
    template=st.booleans(),
)
def test_tokenize_keeps_truncates_or_drops_and_counts_each(
    byte_tokenizers, records, max_length, overflow, template
):
    tokenizer = byte_tokenizers[template]
    eos = tokenizer.eos_token_id
    # The documented rule, from token counts alone.
    fate = []
    for r in records:
        p = _prompt_len(tokenizer, r)
        n = p + len(r["completion"].encode("utf-8")) + 1  # one token per byte, plus EOS
        if n <= max_length:
            fate.append("kept")
        elif overflow == "drop":
            fate.append("too_long")
        else:
            fate.append("truncated" if p < max_length else "no_completion")
    kept = Counter(r["source"] for r, f in zip(records, fate) if f in ("kept", "truncated"))
    lost = Counter(r["source"] for r, f in zip(records, fate) if f not in ("kept", "truncated"))
    starved = sorted(set(lost) - set(kept))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if starved:
            with pytest.raises(DataError, match="have no usable examples") as err:
                tokenize_records(records, tokenizer, max_length, overflow)
            named = repr(starved) if len(repr(starved)) <= 200 else repr(starved)[:197] + "..."
            assert named in str(err.value) and err.value.field == "source"
            return
        examples, report = tokenize_records(records, tokenizer, max_length, overflow)
    assert report.n_input == len(records)
    assert report.n_kept == len(examples) == fate.count("kept") + fate.count("truncated")
    assert report.n_truncated == fate.count("truncated")
    assert report.n_dropped_too_long == fate.count("too_long")
    assert report.n_dropped_no_completion == fate.count("no_completion")
    assert report.kept_per_source == dict(sorted(kept.items()))
    assert report.dropped_per_source == dict(sorted(lost.items()))
    assert report.n_kept + report.n_dropped == report.n_input
    noted = [str(w.message) for w in caught if "tokenize_records" in str(w.message)]
    assert noted == (
        [f"tokenize_records: {report.summary()}"] if report.n_dropped or report.n_truncated else []
    )
    survivors = [(r, f) for r, f in zip(records, fate) if f in ("kept", "truncated")]
    for ex, (r, f) in zip(examples, survivors):
        ids, labels = ex["input_ids"], ex["labels"]
        assert ex["source"] == r["source"] and len(ids) == len(labels) == len(ex["attention_mask"])
        assert len(ids) <= max_length
        n_prompt = labels.count(IGNORE_INDEX)
        assert (
            labels[:n_prompt] == [IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
        )
        assert len(ids) - n_prompt - (0 if n_prompt else 1) >= 1  # something to learn
        if f == "kept":
            assert tokenizer.decode(ids[n_prompt:]) == r["completion"] + "<|im_end|>"
            assert ids[-1] == eos
        else:
            assert len(ids) == max_length


@pytest.mark.parametrize("overflow, template", [("truncate", True), ("drop", False)])
def test_huge_strings_are_truncated_or_dropped_with_counts(
    tmp_path, byte_tokenizers, overflow, template
):
    tokenizer = byte_tokenizers[template]
    huge = "\u00e9\U0001f600" * 500 + "x" * 199_000  # 200k characters
    rows = [
        {"source": "big", "prompt": "short", "completion": huge},
        {"source": "big", "prompt": huge, "completion": "c"},
        {"source": "big", "prompt": "p", "completion": "fits"},
        {"source": "single", "prompt": "p", "completion": "c"},  # a one-example source
    ]
    path = _write(tmp_path / "huge.csv", rows)  # longer than csv's default field limit
    records = load_records(path)
    assert len(records[0]["completion"]) == len(records[1]["prompt"]) == 200_000
    n_kept = 3 if overflow == "truncate" else 2
    with pytest.warns(UserWarning, match=f"tokenize_records: {n_kept}/4 examples kept"):
        examples, report = tokenize_records(records, tokenizer, max_length=64, overflow=overflow)
    assert all(len(ex["input_ids"]) <= 64 for ex in examples)
    assert report.kept_per_source == {"big": 2 if overflow == "truncate" else 1, "single": 1}
    assert report.dropped_per_source == {"big": 1 if overflow == "truncate" else 2}
    if overflow == "truncate":
        assert (report.n_truncated, report.n_dropped_no_completion) == (1, 1)
        assert len(examples[0]["input_ids"]) == 64
    else:
        assert (report.n_truncated, report.n_dropped_too_long) == (0, 2)
    # The only example of a source, if lost, is an error that names the source.
    with pytest.raises(DataError, match=r"\['single'\] have no usable examples") as err:
        tokenize_records(
            records[2:3] + [dict(records[3], prompt=huge)], tokenizer, 64, overflow=overflow
        )
    assert err.value.field == "source"


def test_a_chat_template_that_rejects_the_messages_names_the_example(byte_tokenizers):
    strict = copy.deepcopy(byte_tokenizers[1])
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + CHATML
    )
    records = [
        {"source": "a", "prompt": "p", "completion": "c"},
        {
            "source": "a",
            "prompt": "",
            "completion": "c",
            "prompt_messages": [{"role": "system", "content": "be brief"}],
        },
    ]
    with pytest.raises(DataError, match="System role not supported") as err:
        tokenize_records(records, strict, 64)
    assert err.value.index == 1 and err.value.field == "prompt_messages"
    assert "example 1" in str(err.value)


@pytest.mark.parametrize(
    "records, max_length, overflow, match, index, field",
    [
        (GOOD, 64, "truncate", "wrap a single example in a list", None, None),
        (None, 64, "truncate", "needs a list of examples", None, None),
        ("text", 64, "truncate", "needs a list of examples", None, None),
        ([], 64, "truncate", "no examples", None, None),
        ([GOOD, 3], 64, "truncate", "example 1 is a int", 1, None),
        (
            [GOOD, {**GOOD, "source": None}],
            64,
            "truncate",
            "'source' must be a string",
            1,
            "source",
        ),
        ([{**GOOD, "prompt": ["x"]}], 64, "truncate", "'prompt' must be a string", 0, "prompt"),
        ([{"source": "a", "prompt": "p"}], 64, "truncate", "'completion' must be", 0, "completion"),
        (
            [{**GOOD, "prompt_messages": "hi"}],
            64,
            "truncate",
            "None or a list",
            0,
            "prompt_messages",
        ),
        (
            [{**GOOD, "prompt_messages": [{"role": 1}]}],
            64,
            "truncate",
            "message 0",
            0,
            "prompt_messages",
        ),
        ([GOOD], 1, "truncate", "max_length", None, None),
        ([GOOD], 2.5, "truncate", "max_length", None, None),
        ([GOOD], "64", "truncate", "max_length", None, None),
        ([GOOD], True, "truncate", "max_length", None, None),
        ([GOOD], None, "truncate", "max_length", None, None),
        ([GOOD], 64, "wrap", "overflow", None, None),
        ([GOOD], 64, ["drop"], "overflow", None, None),
    ],
)
def test_tokenize_misuse_is_a_data_error(
    byte_tokenizers, records, max_length, overflow, match, index, field
):
    with pytest.raises(DataError, match=match) as err:
        tokenize_records(records, byte_tokenizers[1], max_length, overflow)
    assert err.value.index == index and err.value.field == field


def test_numpy_integer_max_length_is_accepted(byte_tokenizers):
    import numpy as np

    examples, report = tokenize_records([GOOD], byte_tokenizers[0], np.int64(16))
    assert report.max_length == 16 and isinstance(report.max_length, int)
    assert len(examples) == 1


# --------------------------------------------------------------------------- source_counts


@FUZZ
@given(
    items=st.lists(
        st.one_of(
            st.fixed_dictionaries({"source": filled}),
            st.fixed_dictionaries({"source": st.one_of(not_text, st.none(), st.just(" "))}),
            st.fixed_dictionaries({"prompt": texts}),
            not_text,
            st.none(),
        ),
        max_size=6,
    )
)
def test_source_counts_counts_strings_and_names_the_first_bad_example(items):
    def bad(x):
        return not (
            isinstance(x, dict) and isinstance(x.get("source"), str) and x["source"].strip()
        )

    first_bad = next((i for i, x in enumerate(items) if bad(x)), None)
    if first_bad is None:
        counts = Counter(x["source"] for x in items)
        assert source_counts(items) == dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return
    with pytest.raises(DataError) as err:
        source_counts(items)
    assert err.value.index == first_bad and f"example {first_bad}" in str(err.value)
    if isinstance(items[first_bad], dict):
        assert err.value.field == "source" and "'source'" in str(err.value)


@pytest.mark.parametrize("thing", [None, 3, "abc", GOOD])
def test_source_counts_needs_a_list(thing):
    with pytest.raises(DataError, match="needs a list of examples"):
        source_counts(thing)


# --------------------------------------------------------------------------- collating


@st.composite
def features(draw):
    n = draw(st.integers(1, 4))
    out = []
    for _ in range(n):
        ids = draw(st.lists(st.integers(0, 300), min_size=1, max_size=10))
        n_prompt = draw(st.integers(0, len(ids)))
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:],
                "source": draw(st.sampled_from(["a", "b", 7])),
            }
        )
    return out


@FUZZ
@given(feats=features(), multiple=st.one_of(st.none(), st.integers(1, 8)), tensors=st.booleans())
def test_collator_pads_valid_features(byte_tokenizers, feats, multiple, tensors):
    collate = CoLMCollator(byte_tokenizers[0], pad_to_multiple_of=multiple)
    given_feats = (
        [{k: torch.tensor(v) if k != "source" else v for k, v in f.items()} for f in feats]
        if tensors
        else feats
    )
    batch = collate(given_feats)
    width = max(len(f["input_ids"]) for f in feats)
    if multiple:
        width = -(-width // multiple) * multiple
    assert batch["input_ids"].shape == batch["labels"].shape == (len(feats), width)
    assert batch["source"] == [str(f["source"]) for f in feats]
    pad = byte_tokenizers[0].pad_token_id
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][i].tolist() == f["input_ids"] + [pad] * (width - n)
        assert batch["labels"][i].tolist() == f["labels"] + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)


def _bad_value(draw, key, length):
    """A value for `key` that no example may hold (input_ids has `length` entries)."""
    element = {
        "input_ids": st.sampled_from([-1, -100, 2**63, 1.5, None, "3", [1]]),
        "attention_mask": st.sampled_from([2, -1, 0.5, None, "1", [1]]),
        "labels": st.sampled_from([-1, -99, 2**64, 1.5, None, "x", (1,)]),
    }[key]
    whole = st.sampled_from(["123", None, 5, {"a": 1}, b"\x01\x02"])
    choice = draw(st.sampled_from(["element", "whole", "length", "missing"]))
    if choice == "element":
        values = [1] * length
        values[draw(st.integers(0, length - 1))] = draw(element)
        return values
    if choice == "whole":
        return draw(whole)
    if choice == "length":
        return [] if key == "input_ids" else [1] * (length + draw(st.sampled_from([-1, 1])))
    return "MISSING"


@FUZZ
@given(
    feats=features(),
    data=st.data(),
    key=st.sampled_from(["input_ids", "attention_mask", "labels", "source"]),
)
def test_a_bad_feature_names_the_example_and_the_key(byte_tokenizers, feats, data, key):
    i = data.draw(st.integers(0, len(feats) - 1), label="bad example")
    if key == "source":
        value = data.draw(st.sampled_from([None, 1.5, True, ["a"], {"s": 1}, "MISSING"]))
    else:
        value = _bad_value(data.draw, key, len(feats[i]["input_ids"]))
    if key == "attention_mask" and value == "MISSING":
        value = None  # a missing mask is allowed (all ones); None is not
    # Without other examples to compare with, no labels / no source at all is allowed.
    assume(not (value == "MISSING" and key in ("labels", "source") and len(feats) == 1))
    if value == "MISSING":
        del feats[i][key]
    else:
        feats[i][key] = value
    with pytest.raises(DataError) as err:
        CoLMCollator(byte_tokenizers[0])(feats)
    assert err.value.index == i and f"example {i}" in str(err.value), str(err.value)
    assert err.value.field == key and f"'{key}'" in str(err.value), str(err.value)


@pytest.mark.parametrize("thing", [None, 3, "abc", {"input_ids": [1]}, [], [3], [None]])
def test_collator_needs_a_list_of_dicts(byte_tokenizers, thing):
    with pytest.raises(DataError):
        CoLMCollator(byte_tokenizers[0])(thing)


@pytest.mark.parametrize("multiple", [0, -2, 1.5, "8", True])
def test_collator_rejects_a_bad_pad_multiple(byte_tokenizers, multiple):
    with pytest.raises(DataError, match="pad_to_multiple_of"):
        CoLMCollator(byte_tokenizers[0], pad_to_multiple_of=multiple)
