"""Which head generalises to answers it never saw: 4-fold cross-validation on bench/real_model.py's
training samples (SmolLM2-135M, a+b+c), folds grouped by answer value, so a held-out fold's
answers are never right in training. Within-problem AUC of the trajectory score (the runtime's
geometric mean of step scores) for the paper's MLP (SPR loss, BCE) and the linear form at several
L2 strengths, each trained by the package's own `train_head`.

    python bench/real_model.py            # first: it collects WORK/samples
    python bench/head_forms.py [--work DIR] > bench/results/head_forms.txt
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_metastone.training.collect import Problem, ProblemData  # noqa: E402
from edge_metastone.training.metrics import auc_report  # noqa: E402
from edge_metastone.training.train import (  # noqa: E402
    TrainSettings,
    samples_for,
    train_head,
    training_steps,
)

WORK = Path.home() / ".cache" / "edge-metastone-bench" / "real_model"
FOLDS = 4
VARIANTS = {
    "mlp, spr loss (the paper's; train-sprm's default)": {"loss": "spr"},
    "mlp, bce": {"loss": "bce"},
    **{f"linear, l2 {l2:g}": {"loss": "bce", "form": "linear", "l2": l2} for l2 in (1, 30, 300)},
}


def load(work: Path) -> tuple[list[ProblemData], list[str]]:
    data, gold = [], []
    for line in (work / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        p = Problem(r["prompt"], str(r["answer"]))
        path = work / "samples" / f"{p.key}.npz"
        if path.is_file():
            data.append(ProblemData.load(path))
            gold.append(p.answer)
    return data, gold


def auc_of(head, data: list[ProblemData]) -> float:
    """The head's within-problem trajectory AUC, as train-sprm's report measures it."""
    value = auc_report(samples_for(data, head))["trajectory_auc_within"]
    assert value is not None
    return value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=WORK)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    data, gold = load(args.work)
    values = sorted(set(gold))
    random.Random(0).shuffle(values)
    fold_of = {v: i % FOLDS for i, v in enumerate(values)}
    print(f"{len(data)} problems, {len(values)} answer values, {FOLDS} folds grouped by value")
    for name, kw in VARIANTS.items():
        aucs = []
        for f in range(FOLDS):
            train = [d for d, g in zip(data, gold, strict=True) if fold_of[g] != f]
            test = [d for d, g in zip(data, gold, strict=True) if fold_of[g] == f]
            x, y = training_steps(train)
            head, _ = train_head(x, y, TrainSettings(**kw), feature_layer=0)
            aucs.append(auc_of(head, test))
        folds = " ".join(f"{a:.3f}" for a in aucs)
        print(f"{name:52s} within-problem AUC {np.mean(aucs):.3f}  (folds {folds})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
