"""edge-metastone: reflective generative models (MetaStone-S1) on ordinary machines."""

from __future__ import annotations

# the one place the version is written (pyproject.toml reads it; `edge-metastone --version` shows it)
__version__ = "0.1.0"
__all__ = ["ReasonResult", "Reasoner", "__version__"]

TYPE_CHECKING = False  # not `typing`'s: importing the package stays instant (the CLI's first step)
if TYPE_CHECKING:
    from edge_metastone.options import ReasonResult
    from edge_metastone.reasoner import Reasoner


def __getattr__(name: str) -> object:
    # imported lazily: the converters and kernels use this package without loading llama.cpp
    if name == "Reasoner":
        from edge_metastone.reasoner import Reasoner

        return Reasoner
    if name == "ReasonResult":
        from edge_metastone.options import ReasonResult

        return ReasonResult
    raise AttributeError(name)
