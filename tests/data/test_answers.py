"""Answer extraction and grading with the generators' own checkers, on real entries."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colm.data.answers import extract_answer, gold_entry, score, score_answer
from colm.data.mixture import MixtureSpec, SourceSpec, build_default_mixture, format_completion

DEFAULT = MixtureSpec()
ALL_GENERATORS = [s.name for s in DEFAULT.train] + [s.name for s in DEFAULT.ood]


@pytest.fixture(scope="module")
def records():
    """A few real examples of every generator of the default mixture, per split."""
    spec = MixtureSpec(
        train=[SourceSpec(s.name, 6, s.config) for s in DEFAULT.train],
        test_per_source=3,
        ood=[SourceSpec(s.name, 4, s.config) for s in DEFAULT.ood],
        seed=11,
    )
    train, test_in, test_out = build_default_mixture(spec)
    return train + test_in + test_out


def _by_task(records, task):
    return [r for r in records if r["task"] == task]


@pytest.mark.parametrize("task", ALL_GENERATORS)
def test_gold_completion_scores_one(records, task):
    for r in _by_task(records, task):
        # Plain values lose a "$...$" wrapper; the checkers accept either form.
        assert extract_answer(r["completion"]) in (r["answer"], r["answer"].strip("$"))
        assert score(r, r["completion"]) == 1.0
        # A model that also echoes some reasoning first is graded the same.
        assert (
            score(r, "Let me think.\nThe numbers 1, 2 and 3 are involved.\n" + r["completion"])
            == 1.0
        )


def _wrong(answer: str) -> str:
    """A different answer of the same shape: bump the last digit, or reverse a list.

    (number_sorting's checker allows each number to be off by up to 1.)
    """
    if answer.startswith("["):
        items = answer.strip("[]").split(", ")
        return "[" + ", ".join(reversed(items)) + "]"
    for i in range(len(answer) - 1, -1, -1):
        if answer[i].isdigit():
            d = str((int(answer[i]) + 1) % 10)
            return answer[:i] + d + answer[i + 1 :]
    return answer + "x"


@pytest.mark.parametrize("task", ALL_GENERATORS)
def test_wrong_answer_scores_below_one(records, task):
    for r in _by_task(records, task):
        wrong = _wrong(r["answer"])
        assert wrong != r["answer"]
        assert score(r, format_completion(wrong)) < 1.0, (r["answer"], wrong)


def test_no_answer_scores_zero(records):
    r = records[0]
    assert score(r, "") == 0.0
    assert score(r, None) == 0.0
    assert score(r, "I do not know.") == 0.0


def test_gsm_worked_solution_numbers_do_not_confuse_the_extractor(records):
    gsm = _by_task(records, "gsm_symbolic")
    assert gsm
    for r in gsm:
        solution = r["completion"].rsplit("\n", 1)[0]
        assert solution.strip()
        # Without the answer line the fallback takes the last number of the solution.
        assert extract_answer(solution) is not None


def test_gold_entry_recreates_the_generator_entry(records):
    import reasoning_gym

    r = _by_task(records, "fraction_simplification")[0]
    entry = gold_entry(r)
    ds = reasoning_gym.create_dataset(r["task"], seed=r["task_seed"], size=r["task_size"])
    assert entry == ds[r["task_index"]]
    assert entry["question"].strip() == r["prompt"]


def test_record_carrying_its_entry_needs_no_recreation(records):
    r = _by_task(records, "leg_counting")[0]
    entry = gold_entry(r)
    carried = {"entry": entry, "prompt": r["prompt"]}  # no task fields at all
    assert score(carried, r["completion"]) == 1.0
    assert score(carried, format_completion(_wrong(r["answer"]))) < 1.0


def test_stale_record_is_reported(records):
    r = dict(_by_task(records, "gcd")[0])
    r["answer"] = "not what the generator says"
    with pytest.raises(ValueError, match="another reasoning-gym version"):
        score(r, "Answer: 1")


def test_user_record_with_answer_field_is_graded_by_value():
    r = {"source": "mine", "prompt": "2/4?", "completion": "Answer: 1/2", "answer": "0.5"}
    assert score(r, "Answer: 1/2") == 1.0
    assert score(r, "so it is 0.50.") == 1.0
    assert score(r, "Answer: 0.6") == 0.0
    text = {"source": "mine", "answer": "Friday"}
    assert score(text, "Answer: friday.") == 1.0
    assert score(text, "Answer: Monday") == 0.0


def test_record_without_any_gold_is_an_error():
    with pytest.raises(ValueError, match="answer"):
        score({"source": "x", "prompt": "p", "completion": "c"}, "Answer: 3")


def test_checker_crash_counts_as_wrong():
    # number_sorting's checker parses JSON; junk must give 0, not an exception.
    spec = MixtureSpec(train=[SourceSpec("number_sorting", 2)], test_per_source=0, ood=[])
    r = build_default_mixture(spec).train[0]
    assert score(r, "Answer: [1, 2,") == 0.0


def test_task_config_round_trips_into_the_checker():
    # products with max_digits=2 re-creates the same entries only with its config.
    spec = MixtureSpec(
        train=[SourceSpec("gcd", 2)],
        test_per_source=0,
        ood=[SourceSpec("products", 3, {"max_digits": 2})],
    )
    _, _, test_out = build_default_mixture(spec)
    for r in test_out:
        assert json.loads(r["task_config"]) == {"max_digits": 2}
        assert score(r, r["completion"]) == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: 42", "42"),
        ("Answer: 42.", "42"),
        ("answer:42", "42"),
        ("Answer: -17", "-17"),
        ("Answer: \u221217", "-17"),
        ("Answer: 3.25", "3.25"),
        ("Answer: 3/4", "3/4"),
        ("Answer: 0.5!", "0.5"),
        ("Final answer: 7", "7"),
        ("**Answer:** 12", "12"),
        ("**Answer: 12**", "12"),
        ("Answer: $12$", "12"),
        ("Answer: \\boxed{12}", "12"),
        ("Answer: $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("Answer: $\\dfrac{3}{4}$", "$\\dfrac{3}{4}$"),  # generator checkers accept "$"
        ("Answer: ['1', '2', '3']", "['1', '2', '3']"),
        ("Answer: 2 × 3 × 7", "2 × 3 × 7"),
        ("Answer: Friday.", "Friday"),
        ("Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14\nAnswer: 14\n", "14"),
        # The first answer line wins: what follows is a run-on new question.
        ("Answer: 5\nQuestion: what is 2+2?\nAnswer: 4", "5"),
        # An empty answer line takes the next non-empty line.
        ("Answer:\n\n  81  \n", "81"),
        # Fallbacks when there is no answer line.
        ("so the result is \\boxed{-3}", "-3"),
        ("\\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"),
        ("12 + 30 = 42\n#### 42", "42"),
        ("Therefore the answer is 64.", "64"),
        ("I think the final answer is -2.5", "-2.5"),
        ("It costs 1,234 dollars", "1234"),
        ("From 10 we get 3/7", "3/7"),
        ("x = -4", "-4"),
        ("5-3", "3"),
        ("it is 1.5e+3", "1.5e+3"),
    ],
)
def test_extract_answer_cases(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [None, "", "   \n ", "no numbers here", "Answer:   \n"])
def test_extract_answer_none(text):
    assert extract_answer(text) is None


@given(
    st.one_of(
        st.integers(-(10**9), 10**9).map(str),
        st.decimals(-1000, 1000, places=3, allow_nan=False, allow_infinity=False).map(str),
        st.tuples(st.integers(1, 999), st.integers(1, 999)).map(lambda t: f"{t[0]}/{t[1]}"),
    ),
    st.sampled_from(["", ".", " ", "\n", " .\n"]),
    st.text(alphabet="abc +=\n0123", max_size=40),
)
def test_extract_answer_reads_the_answer_line(value, tail, prefix):
    text = f"{prefix}\nAnswer: {value}{tail}"
    assert extract_answer(text) == value


@given(st.integers(-(10**6), 10**6))
def test_last_number_fallback(value):
    assert extract_answer(f"we add 3 and 4, then we get {value}") == str(value)


def test_score_answer_takes_extracted_text(records):
    r = _by_task(records, "chain_sum")[0]
    assert score_answer(r, r["answer"]) == 1.0
    assert score_answer(r, None) == 0.0
