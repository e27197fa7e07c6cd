"""`OnnxBackend`: an ONNX model directory opened on onnxruntime (the second implementation of
`edge_metastone.backend.Backend`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_metastone.chat import ChatTemplate, encode_chat
from edge_metastone.errors import (
    ContextExceededError,
    EdgeMetastoneError,
    MissingHeadError,
)
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.normalization import normalize
from edge_metastone.onnx_backend.generate import OnnxGenerator, sigmoid
from edge_metastone.onnx_backend.modeldir import HfTokenizer, read_model_dir
from edge_metastone.onnx_backend.session import KVCache, Session
from edge_metastone.scheduler import ModelFacts
from edge_metastone.sprm import StepRule, trajectory_score
from edge_metastone.types import (
    Event,
    GenerationControl,
    GenerationSettings,
    KVLayout,
    KVType,
    SamplingSettings,
    ScoreResult,
)


class OnnxBackend:
    """Loads an ONNX model directory once; generates k scored candidates per request."""

    def __init__(
        self, path: Path | str, *, n_threads: int = 0, provider: str | None = None
    ) -> None:
        self.md = read_model_dir(Path(path))
        md = self.md
        self.tok = HfTokenizer(md.path, md.vocab_size)
        self.template = ChatTemplate(md.chat_template, variables=md.template_variables)
        self.rule = StepRule.of(md.step_token_ids, md.think_start_id, md.think_end_id)
        self.session = Session(md, n_threads=n_threads, provider=provider)
        self._generator = OnnxGenerator(self.session, md, self.tok, self.rule)
        head_bytes = 4 * (2 * md.hidden_size**2 + 4 * md.hidden_size + 1) if md.has_head else 0
        self.facts = ModelFacts(
            weight_bytes=md.n_bytes,
            n_layers=md.n_layers,
            n_kv_heads=md.n_kv_heads,
            head_dim=md.head_dim,
            n_embd=md.hidden_size,
            n_ff=md.intermediate_size,
            n_head=md.n_heads,
            n_vocab=md.vocab_size,
            n_ctx_train=md.context_length,
            head_bytes=head_bytes,
        )

    @property
    def path(self) -> Path:
        """The model directory."""
        return self.md.path

    @property
    def runtime(self) -> str:
        """onnxruntime's version and the execution provider in use."""
        return f"onnxruntime {ort.__version__} {self.session.provider}"

    @property
    def has_head(self) -> bool:
        """True when the graph has the `sprm_logits` output."""
        return self.md.has_head

    @property
    def default_strategy(self) -> str | None:
        """`metastone.default_strategy` from metastone.json, if any."""
        return self.md.default_strategy

    @property
    def feature_layer(self) -> int:
        """The layer whose output the head reads (L-2)."""
        return self.md.feature_layer

    kv_layouts = (KVLayout.STREAMS,)  # one float cache per candidate row
    kv_types = (KVType.F16,)  # no quantized cache

    @property
    def eog_ids(self) -> tuple[int, ...]:
        """Token ids that end a turn (recorded at export as llama.cpp would choose them)."""
        return self.md.eog_token_ids

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt text for a conversation, by the model's own (sandboxed) chat template."""
        return self.template.render(messages, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        """Prompt text -> token ids (added-token spellings in the text are parsed)."""
        return self.tok.encode(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text (control tokens spelled out)."""
        return self.tok.decode(list(token_ids))

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[int]]:
        """The prompt text and ids; message text that spells a control token stays text (as the
        llama.cpp backend's)."""
        return encode_chat(
            self.render,
            messages,
            tokenize=self.tok.encode,
            tokenize_text=self.tok.encode,
            control_texts=self.tok.control_texts,
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
        tokenizer's normal form, the form the model reads and writes (as the llama.cpp backend)."""
        if settings.stop and self.md.normalizer is not None:
            form = self.md.normalizer
            stop = tuple(normalize(s, form, self.tok.control_texts) for s in settings.stop)
            settings = dataclasses.replace(settings, stop=stop)
        return self._generator.generate(
            prompt_ids, k, sampling, settings, control=control, candidate_offset=candidate_offset
        )

    def forward(self, token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One pass over `token_ids` (chunked): logits [T, V], features [T, C] and step logits
        [T] (None without a head); for parity checks."""
        ids = list(token_ids)
        logits, feats, steps = [], [], []
        cache = KVCache.empty(self.md)
        for start in range(0, len(ids), PREFILL_BATCH):
            chunk = np.asarray([ids[start : start + PREFILL_BATCH]], dtype=np.int64)
            out = self.session.forward(
                chunk, cache, keep_logits=chunk.shape[1], sprm=self.has_head, features=True
            )
            cache = out.cache
            logits.append(out.logits[0])
            feats.append(out.features[0])
            if out.sprm_logits is not None:
                steps.append(out.sprm_logits[0])
        step_logits = np.concatenate(steps) if steps else None
        return np.concatenate(logits), np.concatenate(feats), step_logits

    def score_tokens(self, token_ids: Sequence[int]) -> ScoreResult:
        """Step logits of one pass over the full sequence at the scored positions (SPEC §1)."""
        if not self.has_head:
            raise MissingHeadError(f"{self.path} has no SPRM head; scoring is unavailable")
        ids = list(token_ids)
        if len(ids) > self.md.context_length:
            raise ContextExceededError(
                f"the text is {len(ids)} tokens; the model's context is {self.md.context_length}"
            )
        positions = self.rule.scored_positions(ids)
        if not positions:
            return ScoreResult([], [], 0.0, len(ids), ids)
        pre = self._generator.prefill(ids, set(positions), sprm=True, features=False)
        steps = [float(s) for s in sigmoid([pre.step_logits[p] for p in positions])]
        if not all(np.isfinite(steps)):
            raise EdgeMetastoneError(
                f"{self.path}: the model produced non-finite step scores (its weights are broken)"
            )
        return ScoreResult(positions, steps, trajectory_score(steps), len(ids), ids)

    def score_text(self, text: str) -> ScoreResult:
        """Tokenize a full text (prompt and response, markup parsed) and score it."""
        return self.score_tokens(self.tok.encode(text))

    def close(self) -> None:
        """Free the session."""
        self.session.close()

    def __enter__(self) -> OnnxBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
