"""What a model file says about itself in its provenance (`metastone.provenance`): its name, the
task it was trained for (and so which prompts it can answer and how long an answer runs), and
whether its SPRM head was measured to separate right from wrong within a problem.

The fronts use this to show the signal that decides: where the head is measured uninformative,
steps are shown by the model's own confidence (token log-probabilities) and the SPRM score is
labelled as not informative."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.modelfile.copy import provenance
from edge_metastone.modelfile.read import sidecar_path
from edge_metastone.models.arithmetic import TASKS, Task

# a head whose within-problem trajectory AUC (right vs wrong candidates of the same problem) was
# measured below this does not tell a person which candidate to trust
INFORMATIVE_AUC = 0.65
DEFAULT_MAX_NEW_TOKENS = 1024  # a model without a known task
SPRM_LABEL = "SPRM"
SPRM_UNINFORMATIVE_LABEL = "SPRM (not informative on this model)"


@dataclass(frozen=True)
class ModelAbout:
    """A model's name, task and measured head quality, from its provenance (all optional)."""

    name: str | None = None
    task: Task | None = None
    task_text: str | None = None  # the provenance's "task" (also when no check is known for it)
    head_auc_within: float | None = None  # the head's measured within-problem trajectory AUC
    logprob_auc_within: float | None = None  # the same for mean token log-probability

    @property
    def head_informative(self) -> bool:
        """False only when the head was measured and found below `INFORMATIVE_AUC`."""
        return self.head_auc_within is None or self.head_auc_within >= INFORMATIVE_AUC

    @property
    def sprm_label(self) -> str:
        """How the SPRM score is named where a person reads it."""
        return SPRM_LABEL if self.head_informative else SPRM_UNINFORMATIVE_LABEL

    @property
    def max_new_tokens(self) -> int:
        """Tokens per candidate when a request names none: the model's task's (its answers'
        length with room for a slow trace; a degenerate candidate stops there), else 1024."""
        return self.task.max_new_tokens if self.task is not None else DEFAULT_MAX_NEW_TOKENS

    def outside_task(self, prompt: str) -> str | None:
        """A warning when `prompt` is outside the model's known task (None: inside, or unknown)."""
        if self.task is None:
            return None
        why = self.task.outside(prompt)
        if why is None:
            return None
        return f"the prompt is outside what {self.name or 'this model'} can do ({why}): {self.task.domain}"

    def to_json(self) -> dict[str, Any]:
        """The facts as the server's model card and `inspect --json` show them."""
        return {
            "name": self.name,
            "task": self.task_text,
            "domain": self.task.domain if self.task else None,
            "head_auc_within": self.head_auc_within,
            "logprob_auc_within": self.logprob_auc_within,
            "head_informative": self.head_informative,
            "step_signal": "sprm" if self.head_informative else "confidence",
            "sprm_label": self.sprm_label,
        }


def _number(d: Any, *path: str) -> float | None:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def _provenance(p: Path) -> dict:
    try:
        return provenance(p) if p.is_file() else {}
    except (OSError, ValueError, EdgeMetastoneError):
        return {}


def about(path: Path | str, head: Path | str | None = None) -> ModelAbout:
    """The facts `path`'s provenance records (a directory or a file without one: none). The head's
    measured quality comes from `head` (a sidecar), else from `path`, else from the sidecar beside
    it (`NAME.sprm.gguf`, as the loader finds it) when `train-sprm` recorded it there."""
    p = Path(path)
    prov = _provenance(p)
    side = Path(head) if head is not None else sidecar_path(p)
    mine = prov.get("sprm")
    if head is not None or not (isinstance(mine, dict) and "validation" in mine):
        sprm = _provenance(side).get("sprm")
        if isinstance(sprm, dict) and isinstance(sprm.get("validation"), dict):
            prov = {**prov, "sprm": sprm}
    task_text = prov.get("task") if isinstance(prov.get("task"), str) else None
    name = prov.get("name") if isinstance(prov.get("name"), str) else None
    return ModelAbout(
        name=name,
        task=TASKS.get(task_text) if task_text else None,
        task_text=task_text,
        head_auc_within=_number(prov, "sprm", "validation", "trajectory_auc_within"),
        logprob_auc_within=_number(prov, "sprm", "validation", "logprob_auc_within"),
    )


def model_max_new_tokens(path: Path | str) -> int:
    """Tokens per candidate when a request names none (`ModelAbout.max_new_tokens`)."""
    return about(path).max_new_tokens
