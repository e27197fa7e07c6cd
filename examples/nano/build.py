"""Build MetaStone-nano from a seed: the embedded default model (edge_metastone/models/default.gguf).

    python examples/nano/build.py WORK_DIR [--seed 0] [--install]     # ~80 min on 2 cores
    python examples/nano/build.py WORK_DIR --toy                      # the CI smoke test, seconds

1. train the backbone from scratch (train_backbone.py), save a MetaStone-format HF checkpoint;
2. convert it with `edge-metastone convert` (no head yet);
3. train its SPRM head with `edge-metastone train-sprm`'s pipeline (SPR loss, on its own samples);
4. measure the selectors on a validation set (medium effort) and record the best as
   `metastone.default_strategy`, with `metastone.provenance`;
5. measure adaptive compute on the validation set and record its settings as `metastone.adaptive`
   (record_adaptive.py);
6. with --install, copy the result into the package.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from record_adaptive import record as record_adaptive  # noqa: E402
from task import problems  # noqa: E402
from train_backbone import main as train_backbone_main  # noqa: E402

from edge_metastone import keys  # noqa: E402
from edge_metastone.converters.convert import convert  # noqa: E402
from edge_metastone.modelfile.copy import write_model_copy  # noqa: E402
from edge_metastone.options import ReasonOptions  # noqa: E402
from edge_metastone.reasoner import Reasoner  # noqa: E402
from edge_metastone.search.base import StrategyName  # noqa: E402
from edge_metastone.training.collect import CollectSettings  # noqa: E402
from edge_metastone.training.metrics import samples_from_result, selection_report  # noqa: E402
from edge_metastone.training.pipeline import train_sprm  # noqa: E402
from edge_metastone.training.train import TrainSettings  # noqa: E402

PACKAGED = REPO / "edge_metastone" / "models" / "default.gguf"
# ties: the paper's selector first
PREFERENCE = (
    StrategyName.BEST_OF_K,
    StrategyName.WEIGHTED_VOTE,
    StrategyName.VOTE,
    StrategyName.LOGPROB,
)


def write_problems(path: Path, seed: int, n: int) -> Path:
    """`{"prompt", "answer"}` lines for train-sprm."""
    with path.open("w") as f:
        for p in problems(seed, n):
            f.write(json.dumps({"prompt": p.prompt, "answer": str(p.answer)}) + "\n")
    return path


def measure_selectors(model: Path, seed: int, n: int, effort: str, max_new: int) -> dict:
    """Accuracy of each selector on the same medium-effort candidates of n validation problems."""
    samples = []
    with Reasoner(model, max_new_tokens=max_new) as r:
        for i, p in enumerate(problems(seed, n)):
            res = r.reason(p.prompt, ReasonOptions(effort=effort, seed=i, logprobs=True))
            samples.append(samples_from_result(res, str(p.answer)))
    return selection_report(samples)


def build(args: argparse.Namespace) -> Path:
    """Run every stage; returns the finished model file."""
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    toy = args.toy
    hf = work / "backbone" / "hf"
    if not (hf / "model.safetensors").is_file():
        argv = [str(work / "backbone"), "--seed", str(args.seed)]
        argv += ["--toy", "--steps", "300", "--eval-every", "300", "--lr", "5e-3"] if toy else []
        train_backbone_main(argv)
    base = work / f"nano-{args.outtype}-nohead.gguf"
    convert(hf, base, args.outtype)
    n_train, n_val = (6, 3) if toy else (args.train_problems, args.val_problems)
    data = write_problems(work / "sprm-train.jsonl", args.seed + 1, n_train)
    with_head = work / f"nano-{args.outtype}-sprm.gguf"
    collect = CollectSettings(
        samples=2 if toy else args.samples,
        temperature=args.temperature,
        max_new_tokens=96 if toy else 160,
        seed=args.seed,
    )
    train = TrainSettings(epochs=1 if toy else args.epochs, seed=args.seed, val_split=0.2)
    report = train_sprm(
        base,
        data,
        with_head,
        collect_settings=collect,
        train_settings=train,
        progress=not toy,
    )
    selectors = measure_selectors(
        with_head, args.seed + 2, n_val, "low" if toy else "medium", 96 if toy else 160
    )
    strategy = max(PREFERENCE, key=lambda s: (selectors[s.value], -PREFERENCE.index(s))).value
    training = json.loads((hf / "training.json").read_text())
    prov = {
        "name": "MetaStone-nano",
        "script": "examples/nano/build.py",
        "seed": args.seed,
        "task": "integer arithmetic, 2-5 operations, one step per operation",
        "backbone": training,
        "outtype": args.outtype,
        "sprm": {
            "loss": "spr",
            "problems": n_train,
            "samples": collect.samples,
            "temperature": collect.temperature,
            "epochs": train.epochs,
            "validation": report["validation"],
        },
        "selectors_at_medium": {"problems": n_val, **selectors},
        "default_strategy": strategy,
        "date": datetime.date.today().isoformat(),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    final = work / "default.gguf"
    labelled = work / f"nano-{args.outtype}-labelled.gguf"
    write_model_copy(
        with_head,
        labelled,
        extra={
            keys.DEFAULT_STRATEGY: strategy,
            keys.PROVENANCE: json.dumps(prov, sort_keys=True),
            "general.name": "MetaStone-nano",
        },
    )
    n_adaptive = 2 if toy else args.adaptive_problems
    record_adaptive(labelled, final, args.seed + 2, n_adaptive, max_new_tokens=96 if toy else 256)
    (work / "provenance.json").write_text(json.dumps(prov, indent=2))
    print(json.dumps({"selectors_at_medium": selectors, "default_strategy": strategy}))
    if args.install:
        shutil.copyfile(final, PACKAGED)
        print(f"installed {PACKAGED}")
    return final


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outtype", default="q8_0", choices=["f32", "f16", "q8_0", "q4_0", "q4_k_m"])
    ap.add_argument("--train-problems", type=int, default=1000)
    ap.add_argument("--val-problems", type=int, default=150)
    ap.add_argument("--adaptive-problems", type=int, default=300)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--toy", action="store_true", help="toy sizes: a smoke test in seconds")
    ap.add_argument("--install", action="store_true", help=f"copy the result to {PACKAGED}")
    args = ap.parse_args(argv)
    if args.toy and args.install:
        ap.error("--toy builds are never installed")
    print(build(args))


if __name__ == "__main__":
    main()
