"""The real model through the whole pipeline: SmolLM2-135M-Instruct (Q4_1, tests/real_model.py)
gets an SPRM head from `train-sprm`, and every selector is measured on held-out problems.

    while python bench/real_model.py --chunk-minutes 12; [ $? -eq 3 ]; do sleep 30; done
    (options: --test-problems 320, --work DIR, --out bench/results/real_model, --threads 2;
    on a shared machine wrap each run in `flock /tmp/edge-cpu.lock`)

Problems: a + b + c with digits 1-9, a 2-shot raw prompt (no chat template), one step per line,
then `Answer: N` (stop at the blank line), T=0.7, top-p 0.95, at most 48 new tokens: one sample is
right about half the time. Training problems have sums of 1 or 2 mod 4, test problems 0 or 3, so
no test problem's operand set and no test answer value occurs in training (the issue's caution: a
head on a small answer space learns which values tend to be right), and both sides hold odd and
even answers. The shots' operand sets are in neither.

Phases, each resumable, so the bench runs as short chunks under a shared CPU lock (it exits 3
while work remains, 0 when the results are written):
1. `edge-metastone train-sprm --raw --stop '\\n\\n'` on the training problems (8 samples each; it
   holds out 20% of them, by answer value, to fit and measure the combined selector), once per
   head: the linear form and the paper's MLP with the SPR loss -> WORK/smol-{linear,mlp-spr}.sprm.gguf.
   The head whose validation AUC is higher is the one measured in full (the other's AUC and k=8
   accuracies are reported beside it).
2. The test pool: 32 candidates per test problem with token log-probabilities and the layer-(L-2)
   feature of each step, generated once -> WORK/pool.jsonl (one line per problem) and
   WORK/pool/*.npz; the analysis scores the steps with phase 1's head (the runtime's head math).
3. Speed: tokens/s at k=1 and k=8 against stock llama-cpp-python (same file, threads, prompt,
   token count, greedy; k=8 stock = 8 sequential generations), plain and with the head + logprobs.
4. Selectors at k = 1, 2, 8, 32 on the one pool: k < 32 uses the 32/k disjoint groups of
   consecutive candidates (each is what a k-run with those seeds generates) and averages them; 95%
   intervals by bootstrap over problems. Adaptive (Effort.ADAPTIVE at default settings with the
   recorded selector) is replayed on the pool (training.adaptive_fit, exact in tokens).
Writes OUT.json and OUT.png (accuracy against k per selector).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # before bench/: `real_model` is the tests' fixture

from real_model import smollm2_gguf  # noqa: E402

from edge_metastone.answers import answers_equivalent, extract_answer  # noqa: E402
from edge_metastone.modelfile.read import open_model_file  # noqa: E402
from edge_metastone.search.adaptive import AdaptiveSettings  # noqa: E402
from edge_metastone.search.base import StrategyName, select_by_logprob, select_by_score  # noqa: E402
from edge_metastone.search.combined import (  # noqa: E402
    Combined,
    Selector,
    candidate_features,
    generated_step_scores,
)
from edge_metastone.search.vote import Vote  # noqa: E402
from edge_metastone.sprm import trajectory_score  # noqa: E402
from edge_metastone.training.adaptive_fit import RecordedRun  # noqa: E402
from edge_metastone.training.metrics import within_auc  # noqa: E402
from edge_metastone.types import Candidate, FinishReason  # noqa: E402

INSTRUCTION = "Add the numbers, one step per line, then give the answer."
SHOTS = ((2, 3, 4), (7, 1, 5))
TEMPERATURE, TOP_P, MAX_NEW, STOP = 0.7, 0.95, 48, "\n\n"
TRAIN_SAMPLES, POOL_K = 8, 32
KS = (1, 2, 8, 32)
MORE_WORK = 3  # exit status while phases remain
WORK = Path.home() / ".cache" / "edge-metastone-bench" / "real_model"


def worked(q: Sequence[int]) -> str:
    a, b, c = q
    return (
        f"Question: {a} + {b} + {c}\nStep 1: {a} + {b} = {a + b}\n"
        f"Step 2: {a + b} + {c} = {a + b + c}\nAnswer: {a + b + c}"
    )


def prompt(q: Sequence[int]) -> str:
    """The 2-shot raw prompt for operands q."""
    shots = "\n\n".join(worked(s) for s in SHOTS)
    return f"{INSTRUCTION}\n\n{shots}\n\nQuestion: {q[0]} + {q[1]} + {q[2]}\n"


def problems(n_test: int, seed: int = 0) -> tuple[list[tuple], list[tuple]]:
    """(training, test) operand triples, split by the sum mod 4 (training 1 and 2, test 0 and 3):
    no test problem's operand set and no test answer value occurs in training, and both sides
    hold odd and even answers (a split by parity would teach a head "odd is right" where every
    training answer is odd). The shots' operand sets are in neither; `n_test` of the test ones
    (a seeded sample, in a seeded order)."""
    shots = {tuple(sorted(s)) for s in SHOTS}
    triples = [
        q for q in itertools.product(range(1, 10), repeat=3) if tuple(sorted(q)) not in shots
    ]
    train = [q for q in triples if sum(q) % 4 in (1, 2)]
    test = [q for q in triples if sum(q) % 4 in (0, 3)]
    random.Random(seed).shuffle(test)
    return train, test[:n_test]


class Clock:
    """This invocation's chunk of CPU time."""

    def __init__(self, minutes: float) -> None:
        self.end = time.monotonic() + 60 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()


# --- 1. train-sprm --------------------------------------------------------------------------------


HEADS = {  # sidecar name -> train-sprm's options for it
    "linear": ["--form", "linear", "--loss", "bce"],
    "mlp-spr": ["--form", "mlp", "--loss", "spr"],  # the paper's head and loss
}


def sidecar(work: Path, name: str) -> Path:
    return work / f"smol-{name}.sprm.gguf"


def train_head(
    work: Path, model: Path, train: list[tuple], threads: int, clock: Clock, name: str
) -> bool:
    """Run train-sprm for head `name` (killed at the chunk's end: its sample cache, shared by
    the heads, resumes); True when done."""
    side = sidecar(work, name)
    if report_path(work, name).is_file():
        return True
    data = work / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": prompt(q), "answer": sum(q)}) + "\n" for q in train)
    )
    cmd = [
        sys.executable,
        "-m",
        "edge_metastone",
        "train-sprm",
        "--model",
        str(model),
        "--data",
        str(data),
        "-o",
        str(side),
        "--cache",
        str(work / "samples"),
        *HEADS[name],
        "--raw",
        "--stop",
        "\\n\\n",
        "--samples",
        str(TRAIN_SAMPLES),
        "--temperature",
        str(TEMPERATURE),
        "--top-p",
        str(TOP_P),
        "--max-new-tokens",
        str(MAX_NEW),
        "--threads",
        str(threads),
        "--no-progress",
        "--json",
    ]
    print(f"train-sprm ({name}) on {len(train)} problems x {TRAIN_SAMPLES} samples", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(clock.left(), 1))
    except subprocess.TimeoutExpired:
        done = len(list((work / "samples").glob("*.npz")))
        print(f"  chunk over: {done}/{len(train)} problems sampled (resumes)", flush=True)
        return False
    if proc.returncode != 0:
        raise SystemExit(f"train-sprm failed:\n{proc.stderr}")
    timing = {"train_sprm_s": round(time.perf_counter() - t0, 1)}
    side.with_name(side.name + ".timing.json").write_text(json.dumps(timing))
    return True


# --- 2. the test pool -----------------------------------------------------------------------------

_FIELDS = ("index", "token_ids", "text", "mean_logprob", "token_logprobs")


def to_row(c: Candidate, generated_steps: int) -> dict:
    """A candidate as pool.jsonl keeps it (its step features go to the problem's .npz)."""
    d = {f: getattr(c, f) for f in _FIELDS}
    return {
        **d,
        "finish_reason": c.finish_reason.value,
        "step_positions": c.step_positions,
        "step_confidence": c.step_confidence,
        "generated_steps": generated_steps,
    }


def generate_pool(work: Path, model: Path, test: list[tuple], threads: int, clock: Clock) -> bool:
    """32 candidates per test problem, appended to WORK/pool.jsonl, with the layer-(L-2) feature of
    every step (WORK/pool/<i>.npz: the prompt's steps once, then each candidate's own), so the
    head trained by phase 1 scores them exactly as the engine does in-stream (`SprmHead.scores`,
    the runtime's head math); True when all are there."""
    import numpy as np

    from edge_metastone.engine.engine import Engine
    from edge_metastone.training.collect import response_features
    from edge_metastone.types import GenerationSettings, SamplingSettings

    pool = work / "pool.jsonl"
    (work / "pool").mkdir(exist_ok=True)
    have = len(pool.read_text().splitlines()) if pool.is_file() else 0
    if have >= len(test):
        return True
    settings = GenerationSettings(
        max_new_tokens=MAX_NEW, stop=(STOP,), logprobs=True, keep_features=True, score_steps=False
    )
    with Engine(model, n_threads=threads) as engine, pool.open("a") as f:
        t0, n0 = time.perf_counter(), have
        for i in range(have, len(test)):
            if clock.left() < 20:
                break
            ids = engine.tokenize_prompt(prompt(test[i]))
            sampling = SamplingSettings(temperature=TEMPERATURE, top_p=TOP_P, seed=1000 + i)
            cands = engine.generate_all(ids, POOL_K, sampling, settings)
            gen = [response_features(c, len(ids)) for c in cands]  # the steps each one wrote
            n_prompt_steps = len(cands[0].step_positions) - len(gen[0])
            np.savez(
                work / "pool" / f"{i}.npz",
                prompt=cands[0].step_features[:n_prompt_steps],
                generated=np.concatenate(gen),
            )
            rows = [to_row(c, len(g)) for c, g in zip(cands, gen, strict=True)]
            f.write(json.dumps({"q": test[i], "n_prompt": len(ids), "candidates": rows}) + "\n")
            f.flush()
            have = i + 1
        dt = time.perf_counter() - t0
    rate = (have - n0) / dt if have > n0 else 0.0
    print(f"pool: {have}/{len(test)} problems ({rate * 60:.1f} problems/min)", flush=True)
    return have >= len(test)


def load_pool(work: Path, head) -> list[RecordedRun]:
    """The pool's problems, each candidate's steps scored by `head` (prompt steps included, as
    the product's trajectory score has them)."""
    import numpy as np

    out = []
    for i, line in enumerate((work / "pool.jsonl").read_text().splitlines()):
        d = json.loads(line)
        with np.load(work / "pool" / f"{i}.npz", allow_pickle=False) as z:
            prompt_scores = [float(s) for s in head.scores(z["prompt"])]
            gen_scores = [float(s) for s in head.scores(z["generated"])]
        cands, at = [], 0
        for r in d["candidates"]:
            n = r["generated_steps"]
            steps = prompt_scores + gen_scores[at : at + n]
            at += n
            assert len(steps) == len(r["step_positions"]), (i, r["index"])
            cands.append(
                Candidate(
                    step_positions=r["step_positions"],
                    step_scores=steps,
                    score=trajectory_score(steps),
                    finish_reason=FinishReason(r["finish_reason"]),
                    step_confidence=r["step_confidence"],
                    **{f: r[f] for f in _FIELDS},
                )
            )
        assert at == len(gen_scores), i
        out.append(RecordedRun(cands, str(sum(d["q"]))))
    return out


# --- 3. speed -------------------------------------------------------------------------------------


def measure_speed(work: Path, model: Path, threads: int, rounds: int = 3) -> dict:
    """tokens/s of ours (plain; with head scoring + log-probabilities) and stock llama-cpp-python
    at k=1 and k=8, side by side (median of per-round ratios)."""
    import llama_cpp
    from runtime import side_by_side
    from stock_llama import stock_defaults

    from edge_metastone.engine.engine import Engine
    from edge_metastone.types import GenerationSettings, SamplingSettings

    engine = Engine(model, head_path=sidecar(work, "linear"), n_threads=threads)
    with stock_defaults(model, engine.model.weight_plan.mode):
        llm = llama_cpp.Llama(
            str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False
        )
    ids = engine.tokenize_prompt(prompt((3, 2, 5)))
    greedy = SamplingSettings(
        temperature=0.0, seed=0, logit_bias=tuple((t, -1e9) for t in engine.eog_ids)
    )
    out: dict = {
        "threads": threads,
        "prompt_tokens": len(ids),
        "rounds": rounds,
        "weights": engine.model.weight_plan.mode.value,
    }
    for k, n in ((1, 192), (8, 96)):

        def stock(k: int = k, n: int = n) -> None:
            for _ in range(k):  # stock has no batch of sequences: one after another
                llm.reset()
                for j, _tok in enumerate(llm.generate(ids, temp=0.0, repeat_penalty=1.0)):
                    if j + 1 >= n:
                        break

        variants = {
            "plain": GenerationSettings(max_new_tokens=n, score_steps=False),
            "head+logprobs": GenerationSettings(max_new_tokens=n, logprobs=True),
        }
        for label, settings in variants.items():

            def ours(k: int = k, n: int = n, settings=settings) -> None:
                cands = engine.generate_all(ids, k, greedy, settings)
                assert all(c.n_tokens == n for c in cands), [c.n_tokens for c in cands]

            ours()
            stock()
            ta, tb, r = side_by_side(ours, stock, rounds)
            row = {
                "tokens": k * n,
                "ours_tokens_per_s": round(k * n / ta, 1),
                "stock_tokens_per_s": round(k * n / tb, 1),
                "ratio": round(1 / r, 3),
            }
            out[f"k{k} {label}"] = row
            print(f"speed k={k} {label}: {row}", flush=True)
    llm.close()
    engine.close()
    return out


# --- 4. selection ---------------------------------------------------------------------------------


class _Stub:
    """What the selectors ask of an engine: it has a head (and the recorded selector)."""

    has_head = True

    def __init__(self, selector: str) -> None:
        self.selector = selector


def selectors(sel: Selector) -> dict[str, Callable[[list[Candidate]], int]]:
    """The package's own selection rules, by strategy name: candidates -> the chosen `.index`."""
    stub = _Stub(sel.to_json())

    def rule(strategy: Vote | Combined) -> Callable[[list[Candidate]], int]:
        return lambda cs: strategy.select(stub, cs, len(cs))[0]

    return {
        StrategyName.VOTE.value: rule(Vote()),
        StrategyName.LOGPROB.value: select_by_logprob,
        StrategyName.BEST_OF_K.value: select_by_score,  # as the product runs it (trajectory score)
        StrategyName.WEIGHTED_VOTE.value: rule(Vote(weighted=True)),
        StrategyName.COMBINED.value: rule(Combined(selector=sel)),
        StrategyName.COMBINED_VOTE.value: rule(Combined(vote=True, selector=sel)),
    }


class _Fixed:
    """A selection rule as adaptive compute's replay calls it."""

    def __init__(self, fn: Callable[[list[Candidate]], int], name: StrategyName) -> None:
        self.fn, self.name = fn, name

    def select(self, engine, cands, k):
        return self.fn(cands), ""


def groups(p: RecordedRun, k: int) -> list[list[Candidate]]:
    """The pool's 32/k disjoint runs of k candidates."""
    return [p.candidates[g * k : (g + 1) * k] for g in range(POOL_K // k)]


def bootstrap(per_problem: Sequence[float], n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean over problems."""
    import numpy as np

    x = np.asarray(per_problem, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def summary(per_problem: Sequence[float]) -> dict:
    return {"acc": round(sum(per_problem) / len(per_problem), 4), "ci95": bootstrap(per_problem)}


def accuracy_table(
    pool: list[RecordedRun], oks: list[dict[int, bool]], sel: Selector
) -> tuple[dict, dict]:
    """(per selector and k: summary), and the per-problem accuracies behind them."""
    rules = selectors(sel)
    per: dict[str, dict[int, list[float]]] = {name: {} for name in ("one_sample", *rules, "oracle")}
    per["one_sample"][1] = [sum(ok.values()) / len(ok) for ok in oks]
    for k in KS[1:]:
        per["oracle"][k] = [
            sum(any(ok[c.index] for c in g) for g in groups(p, k)) / (POOL_K // k)
            for p, ok in zip(pool, oks, strict=True)
        ]
        for name, rule in rules.items():
            per[name][k] = [
                sum(ok[rule(g)] for g in groups(p, k)) / (POOL_K // k)
                for p, ok in zip(pool, oks, strict=True)
            ]
    table = {name: {str(k): summary(v) for k, v in d.items()} for name, d in per.items()}
    return table, per


def adaptive_table(
    pool: list[RecordedRun], oks: list[dict[int, bool]], sel: Selector, strategy: StrategyName
) -> dict:
    """Adaptive compute at its default waves with the recorded selector, capped at each k,
    replayed on each of the pool's runs of k."""
    from edge_metastone.training.adaptive_fit import replay

    rule = _Fixed(selectors(sel)[strategy.value], strategy)
    out = {}
    for k in KS[1:]:
        s = dataclasses.replace(AdaptiveSettings(selector=strategy), measured={}).capped(k)
        per, cands, tokens = [], 0, 0
        for p in pool:
            got = [replay(RecordedRun(g, p.gold), s, rule) for g in groups(p, k)]  # type: ignore[arg-type]
            per.append(sum(ok for ok, _, _ in got) / len(got))
            tokens += sum(t for _, t, _ in got) / len(got)
            cands += sum(n for _, _, n in got) / len(got)
        out[str(k)] = {
            **summary(per),
            "waves": list(s.waves),
            "mean_candidates": round(cands / len(pool), 2),
            "tokens_per_problem": round(tokens / len(pool), 1),
        }
    return out


def auc_table(pool: list[RecordedRun], oks: list[dict[int, bool]], sel: Selector) -> dict:
    """Within-problem AUC (over each problem's 32 candidates) of each signal."""
    signals: dict[str, Callable[[Candidate], float]] = {
        "head": lambda c: trajectory_score(generated_step_scores(c)),
        "head_min_step": lambda c: candidate_features(c)["sprm_min"],
        "head_with_prompt_steps": lambda c: c.score or 0.0,  # what best-of-k ranks by
        "logprob": lambda c: c.mean_logprob if c.mean_logprob is not None else -math.inf,
        "logprob_lowest": lambda c: candidate_features(c, sel.window)["logprob_lowest"],
        "combined": sel.logit,
    }
    labels = [[float(ok[c.index]) for c in p.candidates] for p, ok in zip(pool, oks, strict=True)]
    out = {}
    for name, f in signals.items():
        value, n = within_auc([[f(c) for c in p.candidates] for p in pool], labels)
        out[name] = round(value, 4) if value is not None else None
    out["problems_with_both_classes"] = n
    return out


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of a - b over problems, with its bootstrap interval."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return {"diff": round(sum(d) / len(d), 4), "ci95": bootstrap(d)}


def report_path(work: Path, name: str) -> Path:
    """Where train-sprm writes head `name`'s report (beside its output)."""
    side = sidecar(work, name)
    return side.with_name(side.name + ".report.json")


def head_report(work: Path, name: str) -> dict:
    return json.loads(report_path(work, name).read_text())


def chosen_head(work: Path) -> str:
    """The head train-sprm measured best: the higher within-problem AUC on its own validation
    problems (held out by answer value), never on the test pool."""
    return max(HEADS, key=lambda n: head_report(work, n)["validation"]["trajectory_auc_within"])


def evaluate_head(
    work: Path, name: str
) -> tuple[list[RecordedRun], list[dict[int, bool]], Selector, dict]:
    """The pool scored by head `name`, right/wrong per candidate, its fitted selector, report."""
    report = head_report(work, name)
    sel = Selector.from_json(json.dumps(report["selector"]))
    assert sel is not None
    head = open_model_file(smollm2_gguf(), sidecar(work, name)).head
    assert head is not None
    pool = load_pool(work, head)
    oks = [
        {
            c.index: (not c.truncated) and answers_equivalent(extract_answer(c.text), p.gold)
            for c in p.candidates
        }
        for p in pool
    ]
    return pool, oks, sel, report


HEAD_RULES = tuple(  # the strategies that use the head: best-of-k, weighted vote, combined (vote)
    s.value
    for s in (
        StrategyName.BEST_OF_K,
        StrategyName.WEIGHTED_VOTE,
        StrategyName.COMBINED,
        StrategyName.COMBINED_VOTE,
    )
)
VOTE = StrategyName.VOTE.value  # the baseline the head's strategies are measured against


def analyse(work: Path, n_train: int) -> dict:
    """Everything measured on the pool, the training reports and the speed."""
    name = chosen_head(work)
    pool, oks, sel, report = evaluate_head(work, name)
    strategy = StrategyName(report["default_strategy"])
    table, per = accuracy_table(pool, oks, sel)
    best = max(HEAD_RULES, key=lambda r: table[r]["8"]["acc"])
    others = {}
    for other in HEADS:
        if other != name:
            p2, o2, s2, r2 = evaluate_head(work, other)
            t2, _ = accuracy_table(p2, o2, s2)
            others[other] = {
                "validation": r2["validation"],
                "validation_split": r2.get("validation_split"),
                "selector_measured": r2["selector"]["measured"],
                "default_strategy": r2["default_strategy"],
                "auc_within": auc_table(p2, o2, s2),
                "accuracy_k8": {r: t2[r]["8"] for r in HEAD_RULES},
            }
    cands = [c for p in pool for c in p.candidates]
    return {
        "model": smollm2_gguf().name,
        "setup": {
            "prompt_example": prompt((3, 2, 5)),
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "max_new_tokens": MAX_NEW,
            "stop": STOP,
            "train_samples": TRAIN_SAMPLES,
            "pool_k": POOL_K,
        },
        "problems": {
            "train": n_train,
            "test": len(pool),
            "split": "train: sums 1 or 2 mod 4, test: sums 0 or 3 mod 4 (operand sets and "
            "answer values held out, odd and even on both sides); the shots' sets in neither",
        },
        "pool": {
            "candidates": len(cands),
            "tokens": sum(c.n_tokens for c in cands),
            "truncated": sum(c.truncated for c in cands),
        },
        "head": {
            "chosen": name,
            "options": HEADS[name],
            "why": "the higher within-problem AUC on train-sprm's validation problems",
        },
        "other_heads": others,
        "train_sprm": {
            "validation_split": report.get("validation_split"),
            "validation": report["validation"],
            "selector": report["selector"],
            "default_strategy": report["default_strategy"],
            "train": report["train"],
        },
        "accuracy": table,
        "adaptive": adaptive_table(pool, oks, sel, strategy),
        "auc_within": auc_table(pool, oks, sel),
        "k8": {  # paired differences "a - b": strategy a's accuracy minus b's, per problem
            "combined-vote - vote": paired(per[StrategyName.COMBINED_VOTE.value][8], per[VOTE][8]),
            "combined - vote": paired(per[StrategyName.COMBINED.value][8], per[VOTE][8]),
            "best_head_selector": best,
            "best - vote": paired(per[best][8], per[VOTE][8]),
        },
        "speed": json.loads((work / "speed.json").read_text()),
    }


def targets(d: dict) -> dict:
    """The issue's targets against what was measured."""
    auc = d["auc_within"]["head"]
    best = d["k8"]["best - vote"]["diff"]
    k1 = d["speed"]["k1 plain"]["ratio"]
    return {
        "head_auc_within >= 0.80": {"measured": auc, "met": auc >= 0.80},
        "best head selector at k=8 >= majority + 0.05": {
            "selector": d["k8"]["best_head_selector"],
            "measured": best,
            "met": best >= 0.05,
        },
        "k=1 tokens/s >= 0.95 x stock": {"measured": k1, "met": k1 >= 0.95},
    }


# --- 5. the plot ----------------------------------------------------------------------------------

LABELS = {  # strategy name (and "adaptive", "oracle") -> its label in the plot and the table
    StrategyName.VOTE.value: "majority vote",
    StrategyName.LOGPROB.value: "log-prob best-of-k",
    StrategyName.BEST_OF_K.value: "SPRM best-of-k",
    StrategyName.WEIGHTED_VOTE.value: "SPRM-weighted vote",
    StrategyName.COMBINED.value: "combined best-of-k",
    StrategyName.COMBINED_VOTE.value: "combined vote",
    "adaptive": "adaptive",
    "oracle": "oracle pass@k",
}


def plot(d: dict, path: Path) -> None:
    """Accuracy against k per selector (95% bootstrap intervals), AUCs and speed beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, side) = plt.subplots(1, 2, figsize=(12.5, 6), gridspec_kw={"width_ratios": [2.2, 1]})
    one = d["accuracy"]["one_sample"]["1"]
    rows = {
        **{n: d["accuracy"][n] for n in LABELS if n in d["accuracy"]},
        "adaptive": d["adaptive"],
    }
    for j, (name, by_k) in enumerate(rows.items()):
        ks = [1, *[int(k) for k in by_k]]
        acc = [one["acc"], *[v["acc"] for v in by_k.values()]]
        lo = [one["ci95"][0], *[v["ci95"][0] for v in by_k.values()]]
        hi = [one["ci95"][1], *[v["ci95"][1] for v in by_k.values()]]
        x = [k * (1 + 0.025 * (j - 3)) for k in ks]  # a nudge so the bars do not overlap
        err = [
            [a - low for a, low in zip(acc, lo, strict=True)],
            [h - a for a, h in zip(acc, hi, strict=True)],
        ]
        style = "--" if name == "oracle" else "-"
        label = LABELS[name]
        if name == "adaptive":
            label += f" (waves 3/8/32, {d['train_sprm']['default_strategy']})"
        ax.errorbar(x, acc, yerr=err, fmt=style + "o", ms=4, capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("k (candidates per problem)")
    n = d["problems"]
    ax.set_ylabel(f"accuracy on {n['test']} held-out test problems (bars: 95% bootstrap)")
    ax.set_title(
        f"SmolLM2-135M-Instruct Q4_1, a+b+c: {d['head']['chosen']} head trained on "
        f"{n['train']} problems\n(sums 1, 2 mod 4), tested on {n['test']} held-out problems "
        "(sums 0, 3 mod 4)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    auc = d["auc_within"]
    names = ["head", "head_min_step", "logprob", "logprob_lowest", "combined"]
    values = [auc[a] or 0 for a in names]
    names[:2] = [f"head ({d['head']['chosen']})", "its lowest step"]
    for other, v in d.get("other_heads", {}).items():
        names.append(f"head ({other})")
        values.append(v["auc_within"]["head"] or 0)
    side.barh(names, values, color="tab:gray")
    side.axvline(0.5, color="k", lw=0.8)
    side.axvline(0.8, color="tab:red", lw=0.8, ls="--", label="target 0.80")
    val = d["train_sprm"]["selector"]["measured"]["auc_within"]
    side.scatter([val["head"], val["logprob"], val["combined"]], [names[0], "logprob", "combined"],
                 marker="x", color="tab:red", zorder=3, label="train-sprm validation")  # fmt: skip
    side.legend(fontsize=7, loc="lower right")
    side.set_xlim(0.3, 1.0)
    side.set_title(
        f"within-problem AUC, test ({auc['problems_with_both_classes']} problems "
        "with both classes)",
        fontsize=9,
    )
    sp = d["speed"]
    text = "\n".join(
        f"k={key.split()[0][1:]} {key.split(' ', 1)[1]}: {v['ours_tokens_per_s']:.0f} vs stock "
        f"{v['stock_tokens_per_s']:.0f} tok/s ({v['ratio']:.2f}x)"
        for key, v in sp.items()
        if isinstance(v, dict)
    )
    side.text(
        0.0,
        -0.1,
        f"speed, {sp['threads']} threads:\n{text}",
        fontsize=7.5,
        va="top",
        transform=side.transAxes,
    )
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.24)
    fig.savefig(path, dpi=110)


def markdown(d: dict) -> str:
    """The accuracy table as the README shows it."""
    acc = d["accuracy"]
    rows = [
        ("one sample", {"1": acc["one_sample"]["1"]}),
        *((LABELS[n], acc[n]) for n in LABELS if n in acc and n != "oracle"),
        ("adaptive (waves 3/8/32)", d["adaptive"]),
        (LABELS["oracle"], acc["oracle"]),
    ]

    def cell(v: dict | None) -> str:
        if v is None:
            return ""
        return f"{v['acc']:.3f} ({v['ci95'][0]:.2f}-{v['ci95'][1]:.2f})"

    out = ["| selector | k=2 | k=8 | k=32 |", "|---|---|---|---|"]
    for label, by_k in rows:
        if "1" in by_k:
            out.append(f"| {label} | {cell(by_k['1'])} (k=1) | | |")
            continue
        out.append(f"| {label} | " + " | ".join(cell(by_k.get(k)) for k in ("2", "8", "32")) + " |")
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-problems", type=int, default=320)
    ap.add_argument("--train-problems", type=int, default=0, help="default: all (a smoke test)")
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--chunk-minutes", type=float, default=12.0, help="stop (to resume) after this")
    ap.add_argument("--work", type=Path, default=WORK, help=f"resumable state (default {WORK})")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_model"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot-only", action="store_true", help="redraw OUT.png from OUT.json")
    args = ap.parse_args()
    if args.plot_only:
        d = json.loads(Path(f"{args.out}.json").read_text())
        plot(d, Path(f"{args.out}.png"))
        print(markdown(d))
        return 0
    clock = Clock(args.chunk_minutes)
    args.work.mkdir(parents=True, exist_ok=True)
    model = smollm2_gguf()
    train, test = problems(args.test_problems)
    train = train[: args.train_problems or None]
    for name in HEADS:
        if not train_head(args.work, model, train, args.threads, clock, name):
            return MORE_WORK
    if not generate_pool(args.work, model, test, args.threads, clock):
        return MORE_WORK
    if not (args.work / "speed.json").is_file():
        if clock.left() < 8 * 60:
            print("speed: next chunk", flush=True)
            return MORE_WORK
        speed = measure_speed(args.work, model, args.threads, args.speed_rounds)
        (args.work / "speed.json").write_text(json.dumps(speed, indent=1))
    d = analyse(args.work, len(train))
    d["targets"] = targets(d)
    Path(f"{args.out}.json").write_text(json.dumps(d, indent=1) + "\n")
    plot(d, Path(f"{args.out}.png"))
    print(markdown(d))
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
