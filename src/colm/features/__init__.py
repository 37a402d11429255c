"""Per-example gradient features of the last transformer block's value projection."""

from .compute import FEATURE_KINDS, GradientFeatures
from .exact import exact_gradients
from .locate import BlockNotFoundError, ValueBlock, find_layers, find_value_block
from .normalize import (
    MOMENTS,
    AdamNormalizer,
    Moments,
    adam_features,
    batch_moments,
    optimizer_moments,
    top_dims,
)
from .replay import (
    LastBlockReplay,
    ReplayMismatchError,
    check_replay,
    full_model_losses,
    per_example_loss,
)
from .zeroth_order import draw_directions, lift, zo_coefficients

__all__ = [
    "FEATURE_KINDS",
    "MOMENTS",
    "AdamNormalizer",
    "Moments",
    "adam_features",
    "batch_moments",
    "optimizer_moments",
    "BlockNotFoundError",
    "GradientFeatures",
    "LastBlockReplay",
    "ReplayMismatchError",
    "ValueBlock",
    "check_replay",
    "draw_directions",
    "exact_gradients",
    "find_layers",
    "find_value_block",
    "full_model_losses",
    "lift",
    "per_example_loss",
    "top_dims",
    "zo_coefficients",
]
