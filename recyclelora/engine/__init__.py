"""The training engine: the recipe's loop, its schedules, validation and the multi-process
plumbing (docs/method.md §3-4).

``distributed`` is a module of its own (``distributed.init``, ``distributed.Context``...): the
command-line entry points join the process group through it before anything else.
"""

from . import distributed
from .distributed import Context
from .evaluator import evaluate, predict_labels
from .schedules import RecipeSchedule, cosine, poly
from .trainer import NonFiniteLoss, TrainResult, autocast_dtype, train

__all__ = [
    "Context",
    "NonFiniteLoss",
    "RecipeSchedule",
    "TrainResult",
    "autocast_dtype",
    "cosine",
    "distributed",
    "evaluate",
    "poly",
    "predict_labels",
    "train",
]
