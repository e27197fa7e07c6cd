"""edge-metastone: reflective generative models (MetaStone-S1) on ordinary machines."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["ReasonResult", "Reasoner", "__version__"]

if TYPE_CHECKING:
    from edge_metastone.reasoner import Reasoner, ReasonResult


def __getattr__(name: str) -> object:
    # imported lazily: `converters` and `quant_kernels` use this package without loading llama.cpp
    if name in ("Reasoner", "ReasonResult"):
        from edge_metastone import reasoner

        return getattr(reasoner, name)
    raise AttributeError(name)
