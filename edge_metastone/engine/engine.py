"""`Engine`: a GGUF model file opened on llama.cpp for generation with in-stream step scoring (the
llama.cpp implementation of `edge_metastone.backend.Backend`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import llama_cpp

from edge_metastone.backend import generate_all
from edge_metastone.chat import ChatTemplate, encode_chat
from edge_metastone.engine.generate import BatchGenerator
from edge_metastone.engine.llama import Model, default_threads
from edge_metastone.errors import MissingHeadError
from edge_metastone.modelfile import ModelFile, open_model_file
from edge_metastone.normalization import normalize
from edge_metastone.scheduler import ModelFacts
from edge_metastone.scoring import score_tokens
from edge_metastone.sprm import STEP_DELIMITER, THINK_END, THINK_START, StepRule
from edge_metastone.types import (
    Candidate,
    Event,
    GenerationControl,
    GenerationSettings,
    KVLayout,
    KVType,
    SamplingSettings,
    ScoreResult,
)


def step_rule(mf: ModelFile, model: Model) -> StepRule:
    """The file's step facts; for a plain Qwen2-family GGUF without them, the tokenizer's own
    (`.\\n\\n` tokenized, and `<think>` / `</think>` where each is one token)."""
    if mf.step_token_ids:
        return StepRule.of(mf.step_token_ids, mf.think_start_id, mf.think_end_id)

    def single(text: str) -> int:
        ids = model.tokenize(text, parse_special=True)
        return ids[0] if len(ids) == 1 else -1

    step_ids = model.tokenize(STEP_DELIMITER, parse_special=False)
    return StepRule.of(step_ids, single(THINK_START), single(THINK_END))


class Engine:
    """Loads a model file (and its SPRM head) once; generates k scored candidates per request."""

    def __init__(
        self,
        model_path: Path | str,
        *,
        head_path: Path | str | None = None,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        parity: bool = False,
        weight_buffers: str | None = None,
    ) -> None:
        self.model_file: ModelFile = open_model_file(model_path, head_path)
        mf = self.model_file
        self.model = Model(mf.path, n_gpu_layers=n_gpu_layers, weight_buffers=weight_buffers)
        self.n_gpu_layers = n_gpu_layers
        self.n_threads = n_threads or default_threads()
        self.facts = ModelFacts.of(mf)
        self.template = ChatTemplate(mf.chat_template, variables=mf.template_variables)
        self.rule = step_rule(mf, self.model)
        self._generator = BatchGenerator(
            self.model, mf.head, self.rule, n_threads=n_threads, parity=parity
        )

    @property
    def path(self) -> Path:
        """The model file."""
        return self.model_file.path

    @property
    def runtime(self) -> str:
        """llama.cpp's build and the offload: a calibration is valid for this identity only."""
        plan = self.model.weight_plan
        return (
            f"llama.cpp/llama-cpp-python {llama_cpp.__version__} gpu-layers {self.n_gpu_layers} "
            f"weights {plan.mode.value}"
        )

    @property
    def has_head(self) -> bool:
        """True when step scores are available."""
        return self.model_file.head is not None

    @property
    def default_strategy(self) -> str | None:
        """The file's `metastone.default_strategy`, if it names one."""
        return self.model_file.default_strategy

    @property
    def eog_ids(self) -> tuple[int, ...]:
        """Token ids that end a turn."""
        return self.model.eog_ids

    kv_layouts = (KVLayout.UNIFIED, KVLayout.STREAMS)
    kv_types = (KVType.F16, KVType.Q8_0, KVType.Q4_0)

    @property
    def feature_layer(self) -> int:
        """The layer whose output the head reads (the head's, else L-2)."""
        return self._generator.feature_layer

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for a conversation, by the model's own (sandboxed) chat template."""
        return self.template.render(messages, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        """Prompt text -> token ids (special tokens in the text are parsed): for text the caller
        rendered on purpose. User messages go through `encode_chat`."""
        return self.model.tokenize(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text (control tokens spelled out)."""
        return self.model.detokenize(token_ids)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[int]]:
        """The prompt text and ids for a conversation. Only the template's own markup becomes
        control tokens: text in a message that spells one (`<|im_end|>`, `<think>`) stays text."""
        return encode_chat(
            self.render,
            messages,
            tokenize=self.model.tokenize,
            tokenize_text=functools.partial(self.model.tokenize, parse_special=False),
            control_texts=self.model.control_texts,
        )

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
        """Stream events for k candidates generated as one batch. Stop strings are matched in the
        tokenizer's normal form, the form the model reads and writes."""
        if settings.stop and self.model.normalizer is not None:
            keep = self.model.control_texts
            stop = tuple(normalize(s, self.model.normalizer, keep) for s in settings.stop)
            settings = dataclasses.replace(settings, stop=stop)
        return self._generator.generate(
            prompt_ids, k, sampling, settings, control=control, candidate_offset=candidate_offset
        )

    def generate_all(
        self,
        prompt_ids: Sequence[int],
        k: int,
        sampling: SamplingSettings,
        settings: GenerationSettings,
        *,
        control: GenerationControl | None = None,
        candidate_offset: int = 0,
    ) -> list[Candidate]:
        """Run to the end; candidates in index order (`backend.generate_all` on this engine)."""
        return generate_all(
            self,
            prompt_ids,
            k,
            sampling,
            settings,
            control=control,
            candidate_offset=candidate_offset,
        )

    def score_tokens(self, token_ids: Sequence[int], *, parity: bool = True) -> ScoreResult:
        """One forward over the full sequence, features at the scored positions through the head
        (SPEC §1); `parity` keeps the KV cache in F32, as the reference scorer computes."""
        if self.model_file.head is None:
            raise MissingHeadError(f"{self.path} has no SPRM head; scoring is unavailable")
        return score_tokens(self.model_file, self.model, list(token_ids), parity=parity)

    def score_text(self, text: str, *, parity: bool = True) -> ScoreResult:
        """Tokenize a full text (prompt and response, markup parsed) and score it."""
        return self.score_tokens(self.model.tokenize(text), parity=parity)

    def close(self) -> None:
        """Free the model."""
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
