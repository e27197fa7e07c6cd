"""The backend boundary: what the `Reasoner`, the calibration, the search strategies and the fronts
need from a model opened on a runtime. Types only: `edge_metastone.runtime.open_backend` opens one
(a `.gguf` file on llama.cpp, an ONNX model directory on onnxruntime).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from edge_metastone.chat import PromptFormat
from edge_metastone.sprm import StepRule
from edge_metastone.types import (
    Candidate,
    Event,
    FinishEvent,
    GenerationControl,
    GenerationSettings,
    KVLayout,
    KVType,
    ModelFacts,
    PolicyKeys,
    SamplingSettings,
    ScoreResult,
)


@runtime_checkable
class Backend(Protocol):
    """A model opened on one runtime: text in, scored candidates out.

    Timings are per call: `generate` fills the `GenerationControl` it is given (there is no shared
    "last timings" state to read afterwards).
    """

    @property
    def path(self) -> Path:
        """The model file or directory."""
        ...

    @property
    def runtime(self) -> str:
        """Runtime and build identity (e.g. `llama.cpp/llama-cpp-python 0.3.36 cpu`): part of
        the calibration cache key, so a new build or a GPU offload is measured again."""
        ...

    @property
    def facts(self) -> ModelFacts:
        """What the scheduler's latency and memory models need."""
        ...

    @property
    def has_head(self) -> bool:
        """True when the model scores steps (an SPRM head is loaded)."""
        ...

    @property
    def policy_keys(self) -> PolicyKeys:
        """The model's recorded default strategy, adaptive settings, combined selector and
        thinking-scaling table, as stored (`model_records.ModelRecords` reads them)."""
        ...

    @property
    def rule(self) -> StepRule:
        """Which tokens end a step and open/close the think window (SPEC §1, §2)."""
        ...

    @property
    def feature_layer(self) -> int:
        """The layer whose output the head reads (the head's, else L-2)."""
        ...

    @property
    def eog_ids(self) -> tuple[int, ...]:
        """Token ids that end a turn."""
        ...

    @property
    def kv_layouts(self) -> tuple[KVLayout, ...]:
        """The KV layouts `generate` can run (`GenerationSettings.kv_layout`), besides AUTO."""
        ...

    @property
    def kv_types(self) -> tuple[KVType, ...]:
        """The `GenerationSettings.kv_type` values it accepts; F16 is its native cache."""
        ...

    @property
    def busy_sequences(self) -> int:
        """Sequences other requests' candidates are decoding now (a runtime that batches
        requests together; 0 for one that runs them one at a time): the batch a request joins."""
        ...

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for a conversation, by the model's own sandboxed chat template."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Pre-rendered prompt text -> token ids, control-token markup parsed."""
        ...

    @property
    def prompt_format(self) -> PromptFormat:
        """How chat prompts are written (the file's template, a fallback, or raw only)."""
        ...

    def tokenize_prompt(self, text: str) -> list[int]:
        """A raw prompt -> ids as the runtime's own completion makes them: markup parsed, the
        model's BOS (and EOS) added where its tokenizer asks for them, a BOS never doubled."""
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[int]]:
        """(prompt text, ids) of a conversation; message text never becomes control tokens."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        k: int,
        sampling: SamplingSettings,
        settings: GenerationSettings,
        *,
        control: GenerationControl | None = None,
        candidate_offset: int = 0,
    ) -> Iterator[Event]:
        """Stream token, step and finish events of k candidates generated together over one
        prompt; candidate i samples with the seed (sampling.seed, candidate_offset + i)."""
        ...

    def score_tokens(self, token_ids: Sequence[int]) -> ScoreResult:
        """Score a full token sequence in one pass, exactly as the reference scorer (SPEC §1)."""
        ...

    def score_text(self, text: str) -> ScoreResult:
        """Tokenize a full text (prompt and response) and score it (`edge-metastone score`)."""
        ...

    def close(self) -> None:
        """Free the model. Callers make sure no generation is running."""
        ...


def generate_all(
    backend: Backend,
    prompt_ids: Sequence[int],
    k: int,
    sampling: SamplingSettings,
    settings: GenerationSettings,
    *,
    control: GenerationControl | None = None,
    candidate_offset: int = 0,
) -> list[Candidate]:
    """Run a generation to its end; the candidates in index order."""
    events = backend.generate(
        prompt_ids, k, sampling, settings, control=control, candidate_offset=candidate_offset
    )
    done = [e.result for e in events if isinstance(e, FinishEvent)]
    return sorted(done, key=lambda c: c.index)
