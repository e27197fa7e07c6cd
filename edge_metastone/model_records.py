"""What a model file records that decides how its requests run, read once when the model opens.

A backend hands over its model's policy keys as the file stores them (`Backend.policy_keys`: text,
JSON for the structured ones). Here each key
is parsed and checked once, as gguf-py's reader checks a field's type, into the type the policy
uses; a bad value is warned about once and stands as unrecorded. With them, what the provenance
says about the model (`modelfile.about`: its name, task and measured head quality), and the
warnings a prompt earns from them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_metastone.backend import Backend
from edge_metastone.chat import PromptFormat
from edge_metastone.modelfile.about import ModelAbout, about
from edge_metastone.search.adaptive import AdaptiveSettings
from edge_metastone.search.base import StrategyName
from edge_metastone.search.combined import Selector
from edge_metastone.thinking_scaling import ScalingTable

logger = logging.getLogger(__name__)

# strategies that read the SPRM head's scores, and those that need a fitted combined selector
NEEDS_HEAD = frozenset(
    {
        StrategyName.BEST_OF_K,
        StrategyName.PRUNE,
        StrategyName.WEIGHTED_VOTE,
        StrategyName.COMBINED,
        StrategyName.COMBINED_VOTE,
    }
)
NEEDS_SELECTOR = frozenset({StrategyName.COMBINED, StrategyName.COMBINED_VOTE})


@dataclass(frozen=True)
class ModelRecords:
    """The model's recorded policy, typed: the selector a request without one gets (one this
    model can run), the adaptive-compute settings (the recorded ones, else the safe defaults with
    that selector), the fitted combined selector and the thinking-scaling table (None where the
    file records none or a bad one), and what its provenance says about it."""

    default_strategy: StrategyName
    adaptive: AdaptiveSettings
    selector: Selector | None
    thinking_scaling: ScalingTable | None
    about: ModelAbout

    @classmethod
    def read(cls, backend: Backend, head: Path | str | None = None) -> ModelRecords:
        """Parse `backend`'s recorded keys (and the provenance of its file, or of `head`)."""
        keys = backend.policy_keys
        selector = Selector.from_json(keys.selector)
        strategy = _default_strategy(keys.default_strategy, backend.has_head, selector)
        adaptive = AdaptiveSettings.from_json(keys.adaptive)
        if not keys.adaptive:  # unrecorded: adaptive's waves choose as the model's default
            adaptive = dataclasses.replace(adaptive, selector=strategy)
        return cls(
            default_strategy=strategy,
            adaptive=adaptive,
            selector=selector,
            thinking_scaling=ScalingTable.from_json(keys.thinking_scaling),
            about=about(backend.path, head),
        )


def _default_strategy(named: str | None, has_head: bool, selector: Selector | None) -> StrategyName:
    """The model file's measured best selector (`metastone.default_strategy`) when it names one
    this model can run (the combined ones: with a readable `metastone.selector`); else best-of-k
    by SPRM score, or log-probability without a head."""
    try:
        choice = StrategyName(named) if named else None
    except ValueError:
        logger.warning("ignoring unknown default strategy %r in the model file", named)
        choice = None
    if choice in NEEDS_SELECTOR and selector is None:
        logger.warning("default strategy %r needs a recorded selector; none is readable", named)
        choice = None
    if choice is not None and (has_head or choice not in NEEDS_HEAD):
        return choice
    return StrategyName.BEST_OF_K if has_head else StrategyName.LOGPROB


def prompt_warnings(
    about: ModelAbout,
    fmt: PromptFormat,
    prompt: str | Sequence[Mapping[str, str]],
    *,
    raw: bool = False,
) -> tuple[str, ...]:
    """What a person should know before trusting an answer to `prompt`: its text (a chat's last
    user message) outside the model's known task (the embedded model answers any prompt with a
    number all the same), and a chat format that is a fallback (`fmt`). A raw prompt, fed as it
    is written, gets none."""
    if raw:
        return ()
    if isinstance(prompt, str):
        text = prompt
    else:
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        text = users[-1] if users else ""
    why = about.outside_task(text) if isinstance(text, str) else None
    return tuple(w for w in (why, fmt.warning) if w)
