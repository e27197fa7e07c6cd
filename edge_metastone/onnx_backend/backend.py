"""`OnnxBackend`: an ONNX model directory opened on onnxruntime (the second implementation of
`edge_metastone.backend.Backend`)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_metastone.chat import ChatTemplate, prompt_format
from edge_metastone.decode.backend import DecodingBackend
from edge_metastone.errors import (
    ContextExceededError,
    EdgeMetastoneError,
    MissingHeadError,
    RequestCancelledError,
)
from edge_metastone.limits import PREFILL_BATCH
from edge_metastone.onnx_backend.modeldir import HfTokenizer, OnnxModelDir, read_model_dir
from edge_metastone.onnx_backend.session import KVCache, Session
from edge_metastone.onnx_backend.slots import OnnxSlots, prompt_pass
from edge_metastone.sprm import StepRule, sigmoid, trajectory_score
from edge_metastone.types import (
    GenerationControl,
    GenerationSettings,
    KVLayout,
    KVType,
    ModelFacts,
    PolicyKeys,
    ScoreResult,
    Timings,
)


def _facts(md: OnnxModelDir) -> ModelFacts:
    """What the scheduler needs to know of the model directory."""
    head_bytes = 4 * (2 * md.hidden_size**2 + 4 * md.hidden_size + 1) if md.has_head else 0
    return ModelFacts(
        weight_bytes=md.n_bytes,
        n_layers=md.n_layers,
        n_kv_heads=md.n_kv_heads,
        head_dim=md.head_dim,
        n_embd=md.hidden_size,
        n_ff=md.intermediate_size,
        n_heads=md.n_heads,
        n_vocab=md.vocab_size,
        n_ctx_train=md.context_length,
        head_bytes=head_bytes,
    )


class OnnxBackend(DecodingBackend):
    """Loads an ONNX model directory once; generates k scored candidates per request."""

    def __init__(
        self, path: Path | str, *, n_threads: int = 0, provider: str | None = None
    ) -> None:
        self.md = read_model_dir(Path(path))
        md = self.md
        self.tok = HfTokenizer(md.path, md.vocab_size)
        self.rule = StepRule.of(md.step_token_ids, md.think_start_id, md.think_end_id)
        self.session = Session(md, n_threads=n_threads, provider=provider)
        self._turn = threading.Lock()  # the generation running (see open_slots)
        self.normalizer = md.normalizer
        self.control_texts = self.tok.control_texts
        self.tokenize = self.tok.encode  # added-token spellings in the text are parsed
        self.tokenize_text = self.tok.encode  # the template's markup is split out before
        self.prompt_format = prompt_format(md.chat_template, self.control_texts)
        self.template = ChatTemplate(self.prompt_format.template, variables=md.template_variables)
        # a raw prompt: markup parsed, the tokenizer's own specials added (as HF does, once)
        self.tokenize_prompt = functools.partial(self.tok.encode, add_special=True)
        self.bos_id = None
        self.facts = _facts(md)

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
    def policy_keys(self) -> PolicyKeys:
        """The policy keys metastone.json records (copied from the GGUF at export)."""
        return self.md.policy_keys

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

    @property
    def n_ctx(self) -> int:
        """The model's context length."""
        return self.md.context_length

    def open_slots(
        self,
        prompt: list[int],
        k: int,
        settings: GenerationSettings,
        scoring: bool,
        tm: Timings,
        control: GenerationControl | None = None,
    ) -> OnnxSlots:
        """k cache rows over `prompt` (one float cache per candidate). One generation at a time:
        its cache is a set of arrays of its own shape, so requests take turns (in arrival order,
        polling `control.aborted` while they wait) rather than batching together."""
        _take_turn(self._turn, control)
        try:
            steps = OnnxSlots(self.session, self.tok, prompt, k, settings, scoring, tm)
        except BaseException:
            self._turn.release()
            raise
        steps.on_close = self._turn.release
        return steps

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text (control tokens spelled out)."""
        return self.tok.decode(list(token_ids))

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
        pre = prompt_pass(self.session, self.md, ids, set(positions), sprm=True, features=False)
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


def _take_turn(turn: threading.Lock, control: GenerationControl | None) -> None:
    """Wait for `turn`, giving up when the request is cancelled meanwhile."""
    while not turn.acquire(timeout=0.05):
        if control is not None and control.aborted is not None and control.aborted():
            raise RequestCancelledError("the request was cancelled while it waited")
