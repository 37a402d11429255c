"""colm: memory-efficient fine-tuning on data mixtures with mini-batch coresets (CoLM)."""

from .facility import FacilityLocationResult, facility_location, pairwise_distances
from .features import BlockNotFoundError, ValueBlock, find_value_block
from .selector import CoresetSelector, Selection, SelectionOutOfMemoryError, SelectorConfig
from .sources import allocate_budget, find_small_sources

__version__ = "0.1.0"

__all__ = [
    "BlockNotFoundError",
    "CoresetSelector",
    "FacilityLocationResult",
    "Selection",
    "SelectionOutOfMemoryError",
    "SelectorConfig",
    "ValueBlock",
    "allocate_budget",
    "facility_location",
    "find_small_sources",
    "find_value_block",
    "pairwise_distances",
]
