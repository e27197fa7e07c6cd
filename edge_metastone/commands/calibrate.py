"""`edge-metastone calibrate [--model FILE.gguf] [--force] [--json]`: measure (and check) this
machine for the budget scheduler now, rather than inside the first budgeted request; and the
progress bar every command draws on stderr while a calibration runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from edge_metastone.commands import (
    add_threads_and_gpu,
    add_weight_buffers,
    open_reasoner,
    print_json,
)

if TYPE_CHECKING:
    from edge_metastone.calibration import CalibrationProgress, Outcome


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the command."""
    p = sub.add_parser(
        "calibrate",
        help="measure this machine for --effort auto and the budgets (checked, then cached)",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="model GGUF (default: the embedded model)"
    )
    p.add_argument("--head", type=Path, default=None, help="a sidecar GGUF holding the SPRM head")
    add_threads_and_gpu(p)
    p.add_argument(
        "--force", action="store_true", help="measure again even when a calibration is cached"
    )
    p.add_argument("--json", action="store_true", help="print the calibration as JSON")
    add_weight_buffers(p)
    p.set_defaults(run=run)


class ProgressBar:
    """Draws `CalibrationProgress` on a stream (stderr): a bar with the fraction done, what runs
    and the time left, redrawn in place on a terminal (at most every 0.2 s elsewhere, one line per
    5 s); the final line says what was measured."""

    def __init__(self, stream: TextIO | None = None, width: int = 24) -> None:
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = float("-inf")

    def __call__(self, p: CalibrationProgress) -> None:
        if p.finished:
            self._write(f"calibration: {p.finished}", final=True)
            return
        now = time.monotonic()
        if now - self._last < (0.2 if self.tty else 5.0):
            return
        self._last = now
        self._write(render(p, self.width), final=False)

    def _write(self, text: str, *, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def render(p: CalibrationProgress, width: int = 24) -> str:
    """`calibrating [#####-----]  42% a decode step at k=8 (1/2), ETA 12 s`."""
    frac = min(max(p.done / p.total, 0.0), 1.0) if p.total > 0 else 0.0
    filled = round(frac * width)
    eta = f"ETA {p.elapsed_s * (1 - frac) / frac:.0f} s" if frac > 0.02 else "ETA ?"
    bar = "#" * filled + "-" * (width - filled)
    return f"calibrating [{bar}] {frac * 100:3.0f}% {p.doing}, {eta}"


def run(args: argparse.Namespace) -> int:
    """Calibrate (or show the cached calibration) and print it."""
    from edge_metastone.calibration import calibration_for

    with open_reasoner(args) as r:
        out = calibration_for(
            r.backend, r.n_threads, r.sampling, refresh=args.force, progress=ProgressBar()
        )
        name = r.model_path.name
    if args.json:
        print_json({**out.as_dict(), "model": name, "calibration": out.calibration.to_json()})
    else:
        print(format_outcome(out, name))
    return 0


def format_outcome(out: Outcome, model: str) -> str:
    """The calibration for a person: where it came from, its checks, its step-time table."""
    cal = out.calibration
    how = {"cached": "cached (use --force to measure again)"}.get(
        out.status.value, out.status.value
    )
    checks = "checks passed" if out.verified else "NOT cached: " + "; ".join(out.problems)
    lines = [f"{model}, {cal.n_threads} threads: {how}, {checks}", "", "     k  step (ms)"]
    lines += [f"  {b:>4}  {s * 1e3:9.3f}" for b, s in sorted(cal.step_seconds.items())]
    lines += [
        "",
        f"prefill {cal.prefill_tokens_per_s:.0f} tokens/s; RSS after loading "
        f"{cal.base_rss_bytes / 2**20:.0f} MiB; measured "
        + time.strftime("%Y-%m-%d %H:%M", time.localtime(cal.measured_at)),
    ]
    return "\n".join(lines)
