"""A batch job and its units of work: what a run does (`BatchJob`), the (effort mode, input line)
units in output order, and one unit's record (`make_record`), the same for a local run and a Ray
worker."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_metastone.answers import answers_equivalent, counting_fallbacks
from edge_metastone.batch.jobfile import Item, record_seed, short_text
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.scheduler import Effort

if TYPE_CHECKING:
    from edge_metastone.options import ReasonOptions, ReasonResult
    from edge_metastone.reasoner import Reasoner

RECORD_VERSION = 1
Unit = tuple[Effort, Item]


@dataclass(frozen=True)
class BatchJob:
    """What a batch run does; `identity()` is what a resumed run must match."""

    input: Path
    output: Path
    options: ReasonOptions  # the request settings; `seed` is the job's seed, `effort` ignored
    modes: tuple[Effort, ...] = (Effort.MEDIUM,)  # several: a sweep
    model: Path | None = None  # None: the embedded default model
    head: Path | None = None
    threads: int = 0
    gpu_layers: int = 0
    weight_buffers: str | None = None  # None: $EDGE_METASTONE_WEIGHT_BUFFERS or auto, per worker
    full: bool = False  # every candidate's text, token ids and step scores, and the prompt text
    ray_address: str | None = None  # None: run here; "" or an address: on Ray
    ray_workers: int = 0  # 0: each node's CPUs / threads per worker
    ray_ship: bool = True  # send the model to a node without it (False: refuse the run)
    window: int = 8  # problems in flight at once in one model (their candidates batched together)

    def __post_init__(self) -> None:
        if not 1 <= self.window <= 256:
            raise EdgeMetastoneError("--window must be between 1 and 256")
        object.__setattr__(self, "modes", tuple(Effort(m) for m in self.modes))
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise EdgeMetastoneError("give each effort mode once")
        if self.input.resolve() == self.output.resolve():
            raise EdgeMetastoneError("the output must not be the input file")

    @property
    def model_path(self) -> Path:
        """The model file this job runs."""
        from edge_metastone.models import default_model_path

        return self.model if self.model is not None else default_model_path()

    def identity(self, input_sha256: str) -> dict[str, Any]:
        """Everything a record depends on (threads and Ray do not change results). The token
        limit is the one the run uses: the given one, else the model's own, as the Reasoner
        picks it, so a run without --max-new-tokens and one that names the same value match."""
        from edge_metastone.modelfile.about import model_max_new_tokens
        from edge_metastone.training.collect import model_identity

        used = self.options.max_new_tokens or model_max_new_tokens(self.model_path)
        o = dataclasses.replace(self.options, max_new_tokens=used)
        opts = {
            k: (v.value if hasattr(v, "value") else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(o).items()
            if k != "effort"
        }
        return {
            "record_version": RECORD_VERSION,
            "input_sha256": input_sha256,
            "model": model_identity(self.model_path),
            "head": model_identity(self.head) if self.head is not None else None,
            "modes": [m.value for m in self.modes],
            "options": opts,
            "full": self.full,
        }


def reasoner_for(job: BatchJob, n_threads: int | None = None) -> Reasoner:
    """The job's model, opened once per process (or Ray worker)."""
    from edge_metastone.reasoner import Reasoner

    threads = job.threads if n_threads is None else n_threads
    return Reasoner(
        job.model,
        head=job.head,
        n_threads=threads,
        n_gpu_layers=job.gpu_layers,
        weight_buffers=job.weight_buffers,
    )


def _result_record(res: ReasonResult, item: Item, full: bool) -> dict[str, Any]:
    checked: dict[str, bool] = {}  # one answer check per distinct answer

    def right(answer: str) -> bool:
        if answer not in checked:
            checked[answer] = answers_equivalent(answer, item.answer or "")
        return checked[answer]

    cands = []
    for c in res.candidates:
        d: dict[str, Any] = {
            "answer": c.answer,
            "score": c.score,
            "mean_logprob": c.mean_logprob,
            "tokens": c.tokens,
            "finish_reason": c.finish_reason,
        }
        if c.stopped_early:
            d["stopped_early"] = c.stopped_early
        if c.thought_ended:  # its thinking budget ended its thought
            d["thought_ended"] = True
        if item.answer is not None:  # truncated candidates count as wrong (as in training)
            d["correct"] = not c.truncated and right(c.answer)
        if full:
            d.update(text=c.text, token_ids=c.token_ids, step_scores=c.step_scores)
        cands.append(d)
    rec: dict[str, Any] = {
        "k": res.k,
        "chosen": res.chosen,
        "answer": res.answer,
        "strategy": res.strategy,
        "tokens": sum(c.tokens for c in res.candidates),
        "early_stop": res.early_stop,
    }
    if res.warnings:  # what `reason` warns of: a prompt outside the model's task, a fallback format
        rec["warnings"] = list(res.warnings)
    if res.think_budget is not None:  # the request's, or the one auto chose with k
        rec["think_budget"] = res.think_budget
    if res.waves:  # adaptive: candidates and tokens after each wave, and why it stopped
        rec["waves"], rec["stop_reason"] = res.waves, res.stop_reason
    if item.answer is not None:
        rec["gold"] = item.answer
        rec["correct"] = cands[res.chosen]["correct"]
    rec["text"] = res.chosen_candidate.text
    if full:
        rec["prompt_text"] = res.prompt_text
    rec["candidates"] = cands
    return rec


def make_record(
    reasoner: Reasoner, item: Item, mode: Effort, options: ReasonOptions, full: bool
) -> dict[str, Any]:
    """One unit's output record (a bad line or a refused request: an error record)."""
    head: dict[str, Any] = {"id": item.id, "line": item.line, "effort": mode.value}
    if item.error is not None:
        return {**head, "error": item.error}
    seed = record_seed(options.seed, item.id)
    t0 = time.perf_counter()
    try:
        res = reasoner.reason(item.prompt, dataclasses.replace(options, effort=mode, seed=seed))
        with counting_fallbacks() as grading:
            rec = {**head, "seed": seed, **_result_record(res, item, full)}
        fallbacks = res.answer_check_fallbacks + grading.n
        if fallbacks:  # answers compared as text where math-verify ran out of time
            rec["answer_check_fallbacks"] = fallbacks
        if res.effort != mode.value:
            rec["ran_effort"] = res.effort
    except EdgeMetastoneError as e:  # this request only (too long, bad messages, budget)
        rec = {**head, "seed": seed, "error": short_text(str(e))}
    rec["time_s"] = round(time.perf_counter() - t0, 4)
    return rec


def units_of(job: BatchJob, items: Sequence[Item]) -> list[Unit]:
    """The job's work in output order: every line for the first mode, then the next mode."""
    return [(mode, item) for mode in job.modes for item in items]
