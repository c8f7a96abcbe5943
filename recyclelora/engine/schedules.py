"""Per-iteration schedules of the recipe (docs/method.md §3), in closed form so resume is exact.

Both follow mmengine's schedulers as the authors configured them: ``PolyLR(power=0.9, eta_min=0)``
on every group's lr, and ``CosineAnnealingParamScheduler(param_name="weight_decay",
eta_min=1e-5)`` on every group's weight decay — including the groups that start at 0, which
mmengine anneals *up* to 1e-5 with the same formula.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer


def poly(base: float, it: int, total: int, power: float = 0.9, eta_min: float = 0.0) -> float:
    return (base - eta_min) * (1 - min(it, total) / total) ** power + eta_min


def cosine(base: float, it: int, total: int, eta_min: float) -> float:
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * min(it, total) / total)) / 2


class RecipeSchedule:
    """Sets lr (PolyLR) and weight decay (cosine annealing) of every group for iteration ``it``.

    The groups' initial values are read once (``initial_lr`` / ``initial_weight_decay``, stored in
    the groups so they travel with the optimizer's state_dict).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int,
        power: float = 0.9,
        wd_min: float = 1e-5,
    ) -> None:
        self.optimizer, self.total, self.power, self.wd_min = optimizer, total_iters, power, wd_min
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
            g.setdefault("initial_weight_decay", g["weight_decay"])

    def step_to(self, it: int) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = poly(g["initial_lr"], it, self.total, self.power)
            g["weight_decay"] = cosine(g["initial_weight_decay"], it, self.total, self.wd_min)
