"""Adapter analyses of the paper (Tables 1-2, Figs. 3-4)."""

from .collect import LayerAdapters, load_source
from .report import summarise

__all__ = ["LayerAdapters", "load_source", "summarise"]
