"""EMA of the weights with mmengine's semantics (``EMAHook`` + ``ExponentialMovingAverage``), as
SoMA's recipe uses it (docs/method.md §6.3).

After each training iteration ``done`` (1-based): while ``done < begin`` the average is the
weights themselves (mmengine copies them every iteration); at ``done >= begin`` the first update
copies them, every later one computes ``average = average * (1 - m) + weights * m``. Only the
parameters that train are averaged: the others are their own average (mmengine's
``(1 - m) x + m x``, equal up to rounding), so they are neither copied nor stored.

Validation runs on the average (:meth:`WeightEMA.applied`), a checkpoint's ``model`` holds it
(:meth:`WeightEMA.model_state`, what evaluation and export load) and its ``ema`` section the
training weights and the step count (:meth:`WeightEMA.state_dict`), from which resume restores
both exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightEMA:
    """The average of ``model``'s trainable parameters; ``enabled=False`` makes every method a
    no-op (the model's weights are then what is validated and saved)."""

    def __init__(self, model: nn.Module, momentum: float, begin: int, enabled: bool = True):
        if not 0 < momentum < 1:
            raise ValueError(f"EMA momentum must lie in (0, 1), got {momentum}")
        self.enabled, self.momentum, self.begin = enabled, momentum, begin
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.average: dict[str, torch.Tensor] = {}
        self.steps = 0  # updates so far (mmengine's ``steps``)

    @torch.no_grad()
    def update(self, done: int) -> None:
        """Call after the optimizer step of iteration ``done`` (1-based)."""
        if not self.enabled or done < self.begin:
            return
        if self.steps == 0:
            self.average = {n: p.detach().clone() for n, p in self.params.items()}
        else:
            m = self.momentum
            for n, p in self.params.items():
                a = self.average[n]
                a.copy_(a * (1 - m) + p.detach() * m)
        self.steps += 1

    @torch.no_grad()
    def _swap(self) -> None:
        for n, p in self.params.items():
            own = p.detach().clone()
            p.copy_(self.average[n])
            self.average[n].copy_(own)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block, its training weights after it."""
        if not self.average:
            yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def apply(self) -> None:
        """Give the model the average for good (the end of training)."""
        for n, p in self.params.items():
            if n in self.average:
                p.copy_(self.average[n])

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with the average in place of the averaged parameters."""
        state = model.state_dict()
        state.update(self.average)
        return state

    def state_dict(self) -> dict:
        """The step count and the training weights of the averaged parameters (the checkpoint's
        ``model`` holds the average)."""
        source = {n: p.detach() for n, p in self.params.items()} if self.average else {}
        return {
            "steps": self.steps,
            "momentum": self.momentum,
            "begin": self.begin,
            "source": source,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Resume: the model was loaded from the checkpoint's ``model`` (the average); the
        training weights come back from ``state["source"]``."""
        source = state["source"]
        if source.keys() not in (set(), self.params.keys()):
            raise ValueError(
                "the checkpoint's EMA does not cover the parameters this model trains: "
                f"{sorted(source.keys() ^ self.params.keys())[:4]}"
            )
        self.steps = int(state["steps"])
        self.average = {}
        if source:
            self.average = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(source[n])
