"""`edge-metastone batch IN.jsonl -o OUT.jsonl [--model F] [--effort ...|--sweep low,medium,high]
[--ray [ADDRESS]]`: reason over a file of problems, resumably (SPEC §3)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from edge_metastone.commands import print_json
from edge_metastone.commands.reason import add_reason_options, reason_options
from edge_metastone.errors import EdgeMetastoneError
from edge_metastone.scheduler import FIXED_EFFORTS, Effort
from edge_metastone.types import requested_mode

if TYPE_CHECKING:
    from edge_metastone.batch.job import BatchJob
    from edge_metastone.batch.runner import UnitRunner


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "batch",
        help="reason over a JSONL file of problems (resumable; --sweep; --ray)",
        description=(
            'Reads {"id", "prompt" | "messages"[, "answer"]} lines and writes one result line '
            "per line (per effort mode with --sweep) to OUT, in input order. Killed at any "
            "moment and rerun with the same command, it resumes. A summary is printed and "
            "written to OUT.summary.json."
        ),
    )
    p.add_argument("input", type=Path, metavar="IN.jsonl")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.jsonl")
    add_reason_options(p, effort_default=None)
    p.add_argument(
        "--sweep",
        metavar="MODES",
        default=None,
        help="run every listed effort mode (e.g. low,medium,high) on every line, then plot each "
        "selector's accuracy against thinking compute (OUT.sweep.png; needs matplotlib)",
    )
    _add_ray_options(p)
    p.add_argument(
        "--cache-prompt",
        action="store_true",
        help="reuse the cells of an earlier problem's prompt where the next starts the same way "
        "(a shared few-shot prefix): faster, but records may differ at the rounding level",
    )
    p.add_argument(
        "--window",
        type=int,
        default=8,
        metavar="N",
        help="problems in flight at once in one model, their candidates decoded as one batch "
        "(default 8); records are still written in input order. A problem's record can differ "
        "at the rounding level with its batch companions; 1: one at a time, exactly reproducible",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="also write every candidate's text, token ids and step scores, and the prompt text",
    )
    p.add_argument("--png", type=Path, default=None, help="sweep plot (default OUT.sweep.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run)


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    """--ray, --workers, --no-ship."""
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (no ADDRESS: start a local one); needs edge-metastone[ray]",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="Ray workers (default: each node's CPUs / --threads)"
    )
    p.add_argument(
        "--no-ship",
        action="store_true",
        help="refuse the Ray run when a node lacks the model file, instead of sending it there",
    )


def parse_modes(text: str) -> tuple[Effort, ...]:
    """`low,medium,high,adaptive` as effort modes (no auto; each once)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    allowed = [e.value for e in (*FIXED_EFFORTS, Effort.ADAPTIVE)]
    bad = [n for n in names if n not in allowed]
    if not names or bad or len(set(names)) != len(names):
        raise EdgeMetastoneError(
            f"--sweep takes distinct modes among {','.join(allowed)} (got {text!r})"
        )
    return tuple(Effort(n) for n in names)


def _check_extras(args: argparse.Namespace) -> None:
    """Missing extras are reported before any work, not after hours of it."""
    if args.ray is not None:
        from edge_metastone.batch.on_ray import import_ray

        import_ray()
    if args.sweep:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise EdgeMetastoneError(
                "--sweep draws with matplotlib: pip install 'edge-metastone[plot]'"
            ) from None


def _unit_runner(job: BatchJob) -> UnitRunner:
    """Where the units run: on Ray for `--ray`, else here."""
    if job.ray_address is not None:
        from edge_metastone.batch.on_ray import run_on_ray

        return run_on_ray
    from edge_metastone.batch.runner import run_local

    return run_local


def run(args: argparse.Namespace) -> int:
    """Run or resume the job, then print the summary."""
    from edge_metastone.batch.job import BatchJob
    from edge_metastone.batch.jobfile import sidecar
    from edge_metastone.batch.report import write_report
    from edge_metastone.batch.runner import run_batch

    if args.sweep and args.effort:
        raise EdgeMetastoneError("give --effort or --sweep, not both")
    if args.workers < 0:
        raise EdgeMetastoneError("--workers must be >= 0")
    if (args.workers or args.no_ship) and args.ray is None:
        flag = "--workers counts Ray workers" if args.workers else "--no-ship is for Ray"
        raise EdgeMetastoneError(f"{flag}: give --ray too")
    modes = parse_modes(args.sweep) if args.sweep else (Effort(args.effort or "medium"),)
    _check_extras(args)
    # a sweep scores every selector on the same candidates: log-probabilities are needed
    options = reason_options(args, effort=modes[0], logprobs=bool(args.sweep))
    job = BatchJob(
        input=args.input,
        output=args.output,
        options=options,
        modes=modes,
        model=args.model,
        head=args.head,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        # settled here (the flag, else $EDGE_METASTONE_WEIGHT_BUFFERS): a Ray worker on another
        # machine does not see this process's environment
        weight_buffers=requested_mode(args.weight_buffers).value,
        full=args.full,
        ray_address=args.ray,
        ray_workers=args.workers,
        ray_ship=not args.no_ship,
        window=args.window,
    )
    if job.ray_address:  # a cluster that cannot be reached: one line before anything starts
        from edge_metastone.batch.on_ray import reachable

        reachable(job.ray_address)
    records, facts = run_batch(job, _unit_runner(job), progress=not args.no_progress)
    png = (args.png or sidecar(args.output, "sweep.png")) if args.sweep else None
    summary = write_report(job, records, facts, png)
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0


def _f(v: object, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def format_summary(s: dict) -> str:
    """The summary (and the sweep's table and fit) for a person."""
    run = s["this_run"]
    lines = [
        f"{s['output']}: {s['records']} records ({s['errors']} errors); "
        f"summary in {s['summary_file']}",
        f"  {'effort':<8}{'records':>8}{'errors':>8}{'accuracy (of)':>16}{'tokens':>10}"
        f"{'time_s':>10}{'tokens/s':>10}",
    ]
    for mode, m in s["modes"].items():
        acc = f"{_f(m['accuracy'])} ({m['with_answer']})" if m["with_answer"] else "n/a"
        lines.append(
            f"  {mode:<8}{m['records']:>8}{m['errors']:>8}{acc:>16}{m['tokens']:>10}"
            f"{m['time_s']:>10.1f}{_f(m['tokens_per_s'], '.0f'):>10}"
        )
    resumed = f", resumed after {run['resumed_after']}" if run["resumed_after"] else ""
    lines.append(
        f"this run: {run['records']} records in {run['wall_s']:.1f} s "
        f"({_f(run['records_per_s'], '.2f')} records/s){resumed}"
    )
    if ray := run.get("ray"):
        lines.append(
            f"Ray: {ray['workers']} workers on {ray['nodes']} nodes (model sent to "
            f"{ray['shipped']}); {ray['lost_workers']} workers lost, {ray['retried_units']} "
            f"units run again, {ray['poison_inputs']} poison inputs, {ray['failed_inputs']} "
            "inputs failed on a worker"
        )
    sweep = s.get("sweep")
    if sweep and sweep["points"]:
        lines += ["", _sweep_table(sweep)]
    elif sweep:
        lines.append("sweep: no line has a gold answer; nothing to plot")
    return "\n".join(lines)


def _sweep_table(sweep: dict) -> str:
    from edge_metastone.batch.report import SELECTORS

    points = sweep["points"]
    default = next(iter(points.values()))["default_strategy"]
    head = [*SELECTORS, "single", "oracle"]
    lines = [
        f"sweep ({sweep['n_params']:,} parameters): accuracy of each selector on the same "
        f"candidates (default = {default})",
        f"  {'effort':<8}{'k':>4}{'problems':>9}{'compute':>11}"
        + "".join(f"{h:>10}" for h in head),
    ]
    for mode, p in points.items():
        lines.append(
            f"  {mode:<8}{p['k']:>4}{p['problems']:>9}{p['compute']:>11.3g}"
            + "".join(f"{p[h]:>10.3f}" for h in head)
        )
    if sweep["fit"]:
        lines.append("log-linear fit: accuracy = a + b * log10(generated tokens x parameters)")
        for name in SELECTORS:
            f = sweep["fit"][name]
            lines.append(
                f"  {name:<10} a = {f['intercept']:+.3f}  b = {f['slope_per_decade']:+.4f} "
                f"per decade  R^2 = {_f(f['r2'], '.2f')}"
            )
    else:
        lines.append("log-linear fit: needs two or more modes")
    if sweep["png"]:
        lines.append(f"wrote {sweep['png']}")
    return "\n".join(lines)
