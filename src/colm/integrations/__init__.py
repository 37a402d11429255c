"""Training integrations: Hugging Face Trainer / TRL SFTTrainer mixin and a plain loop."""

from .hf_trainer import TRAIN_METHODS, CoLMTrainerMixin, KeepSourceCollator

__all__ = [
    "TRAIN_METHODS",
    "CoLMTrainerMixin",
    "KeepSourceCollator",
    "CoLMTrainer",
    "CoLMSFTTrainer",
]


def __getattr__(name):
    if name in ("CoLMTrainer", "CoLMSFTTrainer"):
        from . import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(name)
