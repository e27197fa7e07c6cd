"""`Engine`: a GGUF model file opened on llama.cpp for generation with in-stream step scoring (the
llama.cpp implementation of `edge_metastone.backend.Backend`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import llama_cpp

from edge_metastone.chat import ChatTemplate, prompt_format
from edge_metastone.decode.backend import DecodingBackend
from edge_metastone.engine.llama import Model, prompt_ids
from edge_metastone.engine.pool import SequencePool
from edge_metastone.engine.scoring import score_tokens
from edge_metastone.engine.slots import LlamaSetup, LlamaSlots
from edge_metastone.errors import MissingHeadError
from edge_metastone.limits import default_threads
from edge_metastone.modelfile.read import ModelFile, open_model_file
from edge_metastone.normalization import NormalForm
from edge_metastone.sprm import STEP_DELIMITER, THINK_END, THINK_START, StepRule, line_delimiters
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


def step_rule(mf: ModelFile, model: Model) -> StepRule:
    """The file's step facts; for a plain GGUF without them, the tokenizer's own: `.\\n\\n` where
    it is one token (the Qwen2 family), else every token that ends a line (one step per line:
    Llama, Gemma, ...); and `<think>` / `</think>` where each is one token."""
    if mf.step_token_ids:
        return StepRule.of(mf.step_token_ids, mf.think_start_id, mf.think_end_id)

    def single(text: str) -> int:
        ids = model.tokenize(text, parse_special=True)
        return ids[0] if len(ids) == 1 else -1

    step_ids = model.tokenize(STEP_DELIMITER, parse_special=False)
    if len(step_ids) != 1:  # split (`.` + `\n\n`): `.` alone would end a step at every period
        texts = (model.token_to_bytes(t, special=False) for t in range(model.n_vocab))
        step_ids = line_delimiters(
            (t, b.decode("utf-8", errors="replace")) for t, b in enumerate(texts)
        )
    return StepRule.of(step_ids, single(THINK_START), single(THINK_END))


def prompt_facts(mf: ModelFile, model: Model) -> dict[str, object]:
    """How prompts are written for the file (`inspect`, `doctor --model`): the chat prompt's
    format and why, the BOS/EOS a raw prompt gets, the think tags and the step delimiter."""
    fmt = prompt_format(mf.chat_template, model.control_texts)
    rule = step_rule(mf, model)

    def text(t: int) -> str | None:
        return model.token_to_bytes(t).decode("utf-8", errors="replace") if t >= 0 else None

    steps = sorted(rule.step_token_ids)
    single = len(steps) == 1
    return {
        "prompt_format": fmt.name,
        "prompt_format_reason": fmt.describe,
        "add_bos": model.add_bos,
        "bos": text(model.bos_id),
        "add_eos": model.add_eos,
        "eos": text(model.eos_id),
        "think_tags": [rule.think_start_id, rule.think_end_id] if rule.thinks else None,
        "step_token_ids": steps,
        "step_delimiter": (
            f"{text(steps[0])!r} (one token)"
            if single
            else f"every token that ends a line ({len(steps)} tokens)"
        ),
    }


def model_facts(mf: ModelFile) -> ModelFacts:
    """What the scheduler needs to know of an opened GGUF model file."""
    head_bytes = 0
    if mf.head is not None:
        h = mf.head
        head_bytes = h.fc1_weight.nbytes + h.fc1_bias.nbytes + h.fc2_weight.nbytes + 8
    return ModelFacts(
        weight_bytes=mf.n_bytes,
        n_layers=mf.n_layers,
        n_kv_heads=mf.n_kv_heads,
        head_dim=mf.head_dim,
        n_embd=mf.n_embd,
        n_ff=mf.n_ff,
        n_heads=mf.n_heads,
        n_vocab=mf.n_vocab,
        n_ctx_train=mf.context_length,
        head_bytes=head_bytes,
    )


class Engine(DecodingBackend):
    """Loads a model file (and its SPRM head) once; generates k scored candidates per request."""

    kv_layouts = (KVLayout.UNIFIED, KVLayout.STREAMS)
    kv_types = (KVType.F16, KVType.Q8_0, KVType.Q4_0)

    def __init__(
        self,
        model_path: Path | str,
        *,
        head_path: Path | str | None = None,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        parity: bool = False,
        weight_buffers: str | None = None,
        min_sequences: int = 1,
    ) -> None:
        self.model_file: ModelFile = open_model_file(model_path, head_path)
        mf = self.model_file
        self.model = Model(mf.path, n_gpu_layers=n_gpu_layers, weight_buffers=weight_buffers)
        model = self.model
        self.n_gpu_layers = n_gpu_layers
        self.n_threads = n_threads or default_threads()
        self.facts = model_facts(mf)
        # chat prompts: the file's template, else ChatML where the vocabulary has it, else none
        self.prompt_format = prompt_format(mf.chat_template, model.control_texts)
        self.template = ChatTemplate(self.prompt_format.template, variables=mf.template_variables)
        self.bos_id = model.bos_id if model.bos_id >= 0 else None
        self.rule = step_rule(mf, model)
        layer = mf.head.feature_layer if mf.head is not None else model.n_layer - 2
        self.pool = SequencePool(model, n_threads, layer, min_sequences)
        self._setup = LlamaSetup(model, mf.head, layer, n_threads, parity, self.pool)

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids, control-token markup in it parsed."""
        return self._open_model().tokenize(text)

    def tokenize_prompt(self, text: str) -> list[int]:
        """A raw prompt -> ids as llama.cpp's completion makes them (the file's BOS/EOS)."""
        return prompt_ids(self._open_model(), text)

    def tokenize_text(self, text: str) -> list[int]:
        """Plain text -> ids: markup in it stays text."""
        return self._open_model().tokenize(text, parse_special=False)

    def _open_model(self) -> Model:
        """The model, or a clear error once it is closed (its memory is freed)."""
        self.model.ptr  # noqa: B018 - raises "model is closed"
        return self.model

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
    def policy_keys(self) -> PolicyKeys:
        """The file's (or its sidecar head's) recorded policy keys."""
        return self.model_file.policy_keys

    @property
    def eog_ids(self) -> tuple[int, ...]:
        """Token ids that end a turn."""
        return self._open_model().eog_ids

    @property
    def feature_layer(self) -> int:
        """The layer whose output the head reads (the head's, else L-2; SPEC §1)."""
        return self._setup.feature_layer

    @property
    def normalizer(self) -> NormalForm | None:
        """The tokenizer's normal form (llama.cpp reads it from the file)."""
        return self.model.normalizer

    @property
    def control_texts(self) -> tuple[str, ...]:
        """Control tokens' spellings."""
        return self._open_model().control_texts

    @property
    def busy_sequences(self) -> int:
        """Sequences of the shared context that hold running candidates now."""
        return self.pool.live_sequences

    @property
    def n_ctx(self) -> int:
        """The model's training context."""
        return self.model.n_ctx_train

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Token ids -> text (control tokens spelled out)."""
        return self._open_model().detokenize(token_ids)

    def open_slots(
        self,
        prompt: list[int],
        k: int,
        settings: GenerationSettings,
        scoring: bool,
        tm: Timings,
        control: GenerationControl | None = None,
    ) -> LlamaSlots:
        """k sequences of the model's pool over `prompt`, in the layout and KV type `settings`
        name (waiting, in arrival order, while the pool has no room)."""
        return LlamaSlots(self._setup, prompt, k, settings, scoring, tm, control)

    def score_tokens(self, token_ids: Sequence[int], *, parity: bool = True) -> ScoreResult:
        """One forward over the full sequence, features at the scored positions through the head
        (SPEC §1); `parity` keeps the KV cache in F32, as the reference scorer computes."""
        if self.model_file.head is None:
            raise MissingHeadError(f"{self.path} has no SPRM head; scoring is unavailable")
        return score_tokens(self.model_file, self.model, list(token_ids), parity=parity)

    def score_text(self, text: str, *, parity: bool = True) -> ScoreResult:
        """Tokenize a full text (prompt and response, markup parsed) and score it."""
        return self.score_tokens(self.tokenize(text), parity=parity)

    def close(self) -> None:
        """Free the shared context and the model."""
        self.pool.close()
        self.model.close()
