"""Data layer: the demo mixture, user data loading, tokenization, answer grading."""

from colm.data.answers import extract_answer, gold_entry, score, score_answer
from colm.data.loading import (
    CoLMCollator,
    DataError,
    TokenizationReport,
    load_records,
    source_counts,
    tokenize_records,
)
from colm.data.mixture import (
    ANSWER_PREFIX,
    Mixture,
    MixtureSpec,
    SourceSpec,
    build_default_mixture,
    format_completion,
)
from colm.data.pseudo_sources import PseudoSources, pseudo_sources

__all__ = [
    "ANSWER_PREFIX",
    "CoLMCollator",
    "DataError",
    "Mixture",
    "MixtureSpec",
    "PseudoSources",
    "SourceSpec",
    "TokenizationReport",
    "build_default_mixture",
    "extract_answer",
    "format_completion",
    "gold_entry",
    "load_records",
    "pseudo_sources",
    "score",
    "score_answer",
    "source_counts",
    "tokenize_records",
]
