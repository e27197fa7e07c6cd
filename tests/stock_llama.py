"""Stock llama-cpp-python in this package's weight-buffer mode: for baselines (the benchmarks)
and tests that must run llama-cpp-python's own `Llama` the way the engine loads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from edge_metastone.engine.weights.placement import Placement
from edge_metastone.engine.weights.plan import plan_for
from edge_metastone.types import WeightBuffers


@contextlib.contextmanager
def stock_defaults(
    path: Path | str, requested: WeightBuffers | str | None = None, *, gpu_layers: int = 0
) -> Iterator[Placement]:
    """Within the block, llama-cpp-python's own `Llama(path, ...)` loads with this package's
    placement for `path` (its constructor has no weight-buffer options): for baselines and
    tests that must run stock llama-cpp-python in the same mode as the engine."""
    import llama_cpp.llama_cpp as lc

    placement = plan_for(path, requested, gpu_layers=gpu_layers)
    original = lc.llama_model_default_params

    def defaults() -> object:
        params = original()
        placement.apply(params)
        return params

    lc.llama_model_default_params = defaults
    try:
        yield placement
    finally:
        lc.llama_model_default_params = original
