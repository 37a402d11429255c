"""Data layer: the demo mixture; user data read (reading), normalised into records with a
source (records), tokenized (tokenize) and batched (collate), with one error type
(errors); pseudo-sources for data without source labels; answer grading."""

from colm.data.answers import extract_answer, gold_entry, score, score_answer
from colm.data.collate import CoLMCollator
from colm.data.errors import DataError
from colm.data.mixture import (
    ANSWER_PREFIX,
    Mixture,
    MixtureSpec,
    SourceSpec,
    build_default_mixture,
    format_completion,
)
from colm.data.pseudo_sources import PseudoSources, pseudo_sources
from colm.data.records import load_records, source_counts
from colm.data.tokenize import TokenizationReport, tokenize_records

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
