"""Sample k candidates per problem with the engine, keep the layer-(L-2) feature of each step the
candidate wrote (a step in the prompt is the same for every candidate, right or wrong: a model
without a think window scores its prompt's lines too, SPEC §1, and none of them is trained on),
and its token log-probabilities; label candidates by final-answer correctness, and cache it all
on disk one problem at a time, so a killed run resumes where it stopped.

Cache layout (DIR): `settings.json` (what the samples depend on; a mismatch is refused),
one `<key>.npz` per problem (written atomically), and `journal.log` (one line per problem sampled).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_metastone.answers import answers_equivalent, extract_answer
from edge_metastone.backend import Backend, generate_all
from edge_metastone.errors import EdgeMetastoneError, InvalidRequestError
from edge_metastone.paths import write_text_atomic
from edge_metastone.types import Candidate, GenerationSettings, SamplingSettings

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 100_000
CACHE_FORMAT = 2  # 2: response steps only, token log-probabilities kept


@dataclass(frozen=True)
class Problem:
    """One training problem: a prompt and its gold final answer."""

    prompt: str
    answer: str

    @property
    def key(self) -> str:
        """Stable identity (prompt and answer), the cache file's name."""
        return hashlib.sha1(f"{self.prompt}\0{self.answer}".encode()).hexdigest()[:16]


def read_problems(path: Path | str) -> list[Problem]:
    """`{"prompt", "answer"}` JSON lines; a bad line is an error naming it. Duplicates are dropped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise EdgeMetastoneError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise EdgeMetastoneError(f"{path}: not UTF-8 text") from None
    out: list[Problem] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise InvalidRequestError(f"{path}:{n}: not a JSON object") from None
        if not isinstance(rec, dict):
            raise InvalidRequestError(f"{path}:{n}: not a JSON object")
        prompt, answer = rec.get("prompt"), rec.get("answer")
        if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(f"{path}:{n}: 'prompt' must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise InvalidRequestError(f"{path}:{n}: 'answer' must be a string or a number")
        p = Problem(prompt, str(answer))
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    if not out:
        raise InvalidRequestError(f"{path}: no problems")
    return out


@dataclass(frozen=True)
class CollectSettings:
    """What the samples depend on (stored in the cache; a resumed run must match it)."""

    samples: int = 8
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    seed: int = 0
    raw: bool = False  # prompts are pre-rendered text (no chat template), as `reason --raw`
    stop: tuple[str, ...] = ()  # stop strings (a few-shot prompt's separator)

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise InvalidRequestError("samples per problem must be >= 2")
        if self.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be >= 1")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings")


@dataclass(frozen=True)
class ProblemData:
    """One problem's k candidates: step features (concatenated) and outcome labels."""

    key: str
    features: np.ndarray  # [sum(steps), C] float32
    steps: np.ndarray  # [k] int: scored steps per candidate
    correct: np.ndarray  # [k] bool (truncated candidates are wrong)
    truncated: np.ndarray  # [k] bool
    mean_logprob: np.ndarray  # [k] float
    tokens: np.ndarray  # [k] int
    answers: list[str]
    token_logprobs: np.ndarray  # [sum(n_logprobs)] float: each candidate's, concatenated
    n_logprobs: np.ndarray  # [k] int

    def candidate_features(self) -> list[np.ndarray]:
        """The features split per candidate."""
        return np.split(self.features, np.cumsum(self.steps)[:-1])

    def candidate_logprobs(self) -> list[np.ndarray]:
        """The token log-probabilities split per candidate."""
        return np.split(self.token_logprobs, np.cumsum(self.n_logprobs)[:-1])

    def save(self, path: Path) -> None:
        """Write atomically: a killed writer leaves no half file."""
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".npz.partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                self._savez(f)
            os.replace(tmp, path)
        except BaseException:  # Ctrl-C and a full disk included: no half file is left behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _savez(self, f) -> None:
        np.savez(
            f,
            features=self.features,
            steps=self.steps,
            correct=self.correct,
            truncated=self.truncated,
            mean_logprob=self.mean_logprob,
            tokens=self.tokens,
            answers=np.array(self.answers, dtype=str),
            token_logprobs=self.token_logprobs,
            n_logprobs=self.n_logprobs,
        )

    @classmethod
    def load(cls, path: Path) -> ProblemData:
        """Read one cache file (no pickles)."""
        with np.load(path, allow_pickle=False) as z:
            return cls(
                key=path.stem,
                features=z["features"],
                steps=z["steps"],
                correct=z["correct"],
                truncated=z["truncated"],
                mean_logprob=z["mean_logprob"],
                tokens=z["tokens"],
                answers=[str(a) for a in z["answers"]],
                token_logprobs=z["token_logprobs"],
                n_logprobs=z["n_logprobs"],
            )


def _problem_seed(seed: int, key: str) -> int:
    return int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def prompt_ids(backend: Backend, problem: Problem, settings: CollectSettings) -> list[int]:
    """The problem's prompt as the model sees it: its chat template applied, or raw text."""
    if settings.raw:
        return backend.tokenize_prompt(problem.prompt)
    return backend.encode_chat([{"role": "user", "content": problem.prompt}])[1]


def response_features(c: Candidate, n_prompt: int) -> np.ndarray:
    """The features of the steps `c` wrote: position i is scored for the delimiter at i+1, so
    i >= n_prompt-1 (the first token generated may end a step the prompt's last token holds)."""
    if c.step_features is None:
        raise EdgeMetastoneError("the backend returned no step features (keep_features)")
    keep = [r for r, i in enumerate(c.step_positions) if i >= n_prompt - 1]
    return c.step_features[keep]


def sample_problem(backend: Backend, problem: Problem, settings: CollectSettings) -> ProblemData:
    """Generate `samples` candidates for one problem and label them."""
    ids = prompt_ids(backend, problem, settings)
    sampling = SamplingSettings(
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=_problem_seed(settings.seed, problem.key),
    )
    gen = GenerationSettings(
        max_new_tokens=settings.max_new_tokens,
        stop=settings.stop,
        keep_features=True,
        logprobs=True,
        score_steps=False,
    )
    cands = generate_all(backend, ids, settings.samples, sampling, gen)
    answers = [extract_answer(c.text) for c in cands]
    truncated = [c.truncated for c in cands]
    correct = [
        not t and answers_equivalent(a, problem.answer)
        for a, t in zip(answers, truncated, strict=True)
    ]
    feats = [response_features(c, len(ids)) for c in cands]
    lps = [np.asarray(c.token_logprobs or [], dtype=np.float32) for c in cands]
    return ProblemData(
        key=problem.key,
        features=np.concatenate(feats).astype(np.float32, copy=False),
        steps=np.array([len(f) for f in feats], dtype=np.int32),
        correct=np.array(correct, dtype=bool),
        truncated=np.array(truncated, dtype=bool),
        mean_logprob=np.array([c.mean_logprob or 0.0 for c in cands], dtype=np.float64),
        tokens=np.array([c.n_tokens for c in cands], dtype=np.int32),
        answers=answers,
        token_logprobs=np.concatenate(lps),
        n_logprobs=np.array([len(v) for v in lps], dtype=np.int32),
    )


class SampleCache:
    """The on-disk cache of one collection (see the module docstring)."""

    def __init__(self, root: Path | str, identity: dict[str, Any]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "settings.json"
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text())
            except ValueError:
                stored = None
            if stored != identity:
                raise EdgeMetastoneError(
                    f"{self.root} holds samples made with other settings or another model; "
                    "pass a new --cache folder or delete that one"
                )
        else:
            write_text_atomic(meta, json.dumps(identity, indent=2, sort_keys=True))
        # a writer killed mid-save (SIGKILL, power loss) cannot remove its temporary file: the
        # next collection on this cache does (one collection at a time per cache folder)
        for stale in self.root.glob(".*.npz.partial"):
            stale.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        """Where one problem's samples live."""
        return self.root / f"{key}.npz"

    def has(self, key: str) -> bool:
        """True when the problem was sampled (a complete file exists)."""
        return self.path(key).is_file()

    def put(self, data: ProblemData) -> None:
        """Store one problem and note it in the journal."""
        data.save(self.path(data.key))
        with (self.root / "journal.log").open("a") as j:
            j.write(data.key + "\n")

    def get(self, key: str) -> ProblemData:
        """Load one problem."""
        return ProblemData.load(self.path(key))


def model_identity(path: Path) -> dict[str, Any]:
    """The model file as the cache knows it: name, size and a hash of its first and last MiB
    (of each file, for a model directory such as an ONNX model)."""
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    size = 0
    h = hashlib.sha1()
    for file in files:
        n = file.stat().st_size
        size += n
        if path.is_dir():
            h.update(f"{file.name}:{n}".encode())
        with file.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, n - (1 << 20)))
            h.update(f.read(1 << 20))
    return {"name": path.name, "size": size, "sha1_ends": h.hexdigest()}


def collect(
    backend: Backend,
    problems: Sequence[Problem],
    settings: CollectSettings,
    cache: SampleCache,
) -> Iterator[tuple[Problem, ProblemData, bool]]:
    """Yield (problem, its data, freshly sampled?) in input order, sampling only what is missing."""
    for p in problems:
        if cache.has(p.key):
            yield p, cache.get(p.key), False
            continue
        data = sample_problem(backend, p, settings)
        cache.put(data)
        yield p, data, True


def identity(model_path: Path, settings: CollectSettings, feature_layer: int) -> dict[str, Any]:
    """The cache's settings.json content (as JSON reads it back: lists, not tuples)."""
    ident = {
        "format": CACHE_FORMAT,
        "model": model_identity(model_path),
        "feature_layer": feature_layer,
        **asdict(settings),
    }
    return json.loads(json.dumps(ident))
