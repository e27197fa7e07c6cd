"""`edge-metastone train-sprm --model FILE.gguf --data PROBLEMS.jsonl -o OUT` (SPEC §3)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_metastone.commands import (
    add_stop,
    add_threads_and_gpu,
    add_weight_buffers,
    print_json,
    stop_strings,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "train-sprm",
        help="train an SPRM head with the SPR loss from final-answer correctness (CPU)",
        description=(
            "Sample candidates per problem, label them by final-answer correctness, train the "
            "head (SPEC §1's SPR loss) on the training problems, fit the selector that combines "
            "it with the model's own log-probabilities on the held-out ones, report, and write "
            "a model copy or, for OUT ending in .sprm.gguf, a sidecar head, recording the "
            "selector and the best measured strategy. The input is never modified. Needs torch "
            "(pip install 'edge-metastone[train]')."
        ),
    )
    p.add_argument("--model", type=Path, required=True, metavar="FILE.gguf")
    p.add_argument("--data", type=Path, required=True, metavar="PROBLEMS.jsonl")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")
    p.add_argument("--head", type=Path, default=None, help="a sidecar GGUF holding a head")
    p.add_argument("--samples", type=int, default=8, help="candidates per problem (default 8)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument(
        "--raw",
        action="store_true",
        help="prompts are pre-rendered text, fed as they are (default: each is a user message "
        "in the model's chat template)",
    )
    add_stop(p)
    _add_training_options(p)
    p.add_argument("--cache", type=Path, default=None, help="sample cache (default OUT.samples/)")
    add_threads_and_gpu(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_weight_buffers(p)
    p.set_defaults(run=run)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """How the head is trained and validated."""
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--val-split", type=float, default=0.2, help="fraction of problems held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warm-start", action="store_true", help="start from the model's (or --head's) head"
    )
    p.add_argument(
        "--loss",
        choices=["spr", "bce"],
        default="spr",
        help="spr: the paper's (default); bce: plain outcome BCE, a deviation for comparison",
    )
    p.add_argument(
        "--form",
        choices=["mlp", "linear", "auto"],
        default="mlp",
        help="mlp: the paper's head, trained by --loss (default); linear: an L2-regularised "
        "logistic regression on each step's feature (needs --loss bce), written in the same head "
        "shape; it learns less of which answer values tend to be right, so it holds up better "
        "on answers it never saw; auto: both, keeping the higher within-problem AUC on the "
        "validation problems",
    )
    p.add_argument(
        "--l2", type=float, default=30.0, help="the linear form's L2 strength (default 30)"
    )


def run(args: argparse.Namespace) -> int:
    """Train and print the report."""
    from edge_metastone.errors import EdgeMetastoneError
    from edge_metastone.training.collect import CollectSettings

    try:  # every module that imports torch, before any work: no torch is one line
        from edge_metastone.training.pipeline import train_sprm
        from edge_metastone.training.train import TrainSettings
    except ImportError as e:
        if (e.name or "").partition(".")[0] != "torch":
            raise
        raise EdgeMetastoneError(
            f"train-sprm needs torch ({e}); pip install 'edge-metastone[train]'"
        ) from None
    collect = CollectSettings(
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        raw=args.raw,
        stop=stop_strings(args),
    )
    train = TrainSettings(
        loss=args.loss,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        val_split=args.val_split,
        seed=args.seed,
        form=args.form,
        l2=args.l2,
    )
    result = train_sprm(
        args.model,
        args.data,
        args.output,
        collect_settings=collect,
        train_settings=train,
        warm_start=args.warm_start,
        head_path=args.head,
        cache_dir=args.cache,
        n_threads=args.threads,
        n_gpu_layers=args.gpu_layers,
        weight_buffers=args.weight_buffers,
        progress=not args.no_progress,
    )
    if args.json:
        print_json(result)
        return 0
    print(format_report(result))
    return 0


def _f(v: object) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def format_report(result: dict) -> str:
    """The report as a few human lines."""
    v = result["validation"]
    t = result["train"]
    lines = [
        f"wrote {result['output']} (report: {result['report_file']})",
        f"train: {t['problems']} problems, {t['steps']} steps ({t['positive_steps']} positive), "
        f"{t['form']} head, loss {t['loss']}, final {t['final_loss']:.4f}, sign filter kept "
        f"{t['sign_filter_kept']:.2f}",
        f"validation{' (= training set)' if result['validation_is_training_set'] else ''}"
        f"{', held out by answer value' if result.get('validation_split') == 'answer' else ''}: "
        f"{v['problems']} problems x k={v['k']}, accuracy {_f(v['accuracy'])}, "
        f"{v['truncated']} truncated",
        f"  step AUC        pooled {_f(v['step_auc'])}   within problem {_f(v['step_auc_within'])}",
        f"  trajectory AUC  pooled {_f(v['trajectory_auc'])}   within problem "
        f"{_f(v['trajectory_auc_within'])}   ({v['problems_with_both_classes']} problems "
        f"with both right and wrong candidates)",
        f"  mean log-prob   within problem {_f(v['logprob_auc_within'])}",
        "  best-of-k: " + ", ".join(f"{name} {_f(acc)}" for name, acc in v["best_of_k"].items()),
    ]
    m = result["selector"]["measured"]
    auc = m["auc_within"]
    lines += [
        f"selector (head + log-probability, {m['folds']}-fold cross-fitted on "
        f"{m['problems']} problems): within-problem AUC head {_f(auc['head'])}, log-prob "
        f"{_f(auc['logprob'])}, combined {_f(auc['combined'])}",
        "  accuracy: " + ", ".join(f"{name} {_f(acc)}" for name, acc in m["accuracy"].items()),
        f"  default strategy recorded: {result['default_strategy']}",
    ]
    if "forms" in result:
        f = result["forms"]
        lines.append(
            f"forms (validation within-problem AUC): mlp {_f(f['mlp']['trajectory_auc_within'])}, "
            f"linear {_f(f['linear']['trajectory_auc_within'])}; kept {f['chosen']}"
        )
    return "\n".join(lines)
