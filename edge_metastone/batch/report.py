"""What a batch output adds up to: accuracy, tokens and time per effort mode (the summary), and for
a sweep, every selector's accuracy on the same candidates against thinking compute, a log-linear
fit, and the plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_metastone.batch.jobfile import sidecar
from edge_metastone.paths import write_text_atomic
from edge_metastone.training.metrics import ProblemSamples, selection_report

if TYPE_CHECKING:
    from edge_metastone.batch.job import BatchJob

# "default": what the run chose (the model's default strategy); the others by strategy name
SELECTORS = ("default", "best-of-k", "vote", "logprob")
SELECTOR_LABELS = {
    "default": "default",
    "best-of-k": "SPRM best-of-k",
    "vote": "majority vote",
    "logprob": "mean log-prob",
}


def _by_mode(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        out.setdefault(rec["effort"], []).append(rec)
    return out


def summarize(records: Sequence[dict[str, Any]], facts: dict[str, Any]) -> dict[str, Any]:
    """Per effort mode: records, errors, accuracy over the lines with a gold answer, generated
    tokens, time spent reasoning (over every run that made the records) and tokens/s."""
    modes = {}
    for mode, recs in _by_mode(records).items():
        ok = [r for r in recs if "error" not in r]
        checked = [r for r in ok if "correct" in r]
        tokens = sum(r["tokens"] for r in ok)
        secs = sum(r.get("time_s", 0.0) for r in recs)
        modes[mode] = {
            "records": len(recs),
            "errors": len(recs) - len(ok),
            "with_answer": len(checked),
            "accuracy": sum(bool(r["correct"]) for r in checked) / len(checked)
            if checked
            else None,
            "tokens": tokens,
            "time_s": round(secs, 3),
            "tokens_per_s": round(tokens / secs, 1) if secs > 0 else None,
        }
    return {
        "records": len(records),
        "errors": sum(m["errors"] for m in modes.values()),
        "modes": modes,
        "this_run": {
            "records": facts["ran"],
            "resumed_after": facts["resumed"],
            "wall_s": round(facts["wall_s"], 3),
            "records_per_s": round(facts["ran"] / facts["wall_s"], 3) if facts["wall_s"] else None,
            **({"ray": facts["ray"]} if "ray" in facts else {}),
        },
    }


def _samples(rec: dict[str, Any]) -> ProblemSamples:
    cands = rec["candidates"]
    return ProblemSamples(
        answers=[c["answer"] for c in cands],
        correct=[bool(c["correct"]) for c in cands],
        score=[c["score"] if c["score"] is not None else 0.0 for c in cands],
        mean_logprob=[
            c["mean_logprob"] if c["mean_logprob"] is not None else -math.inf for c in cands
        ],
        step_scores=[[] for _ in cands],
    )


def sweep_points(records: Sequence[dict[str, Any]], n_params: int) -> dict[str, dict[str, Any]]:
    """Per mode, over the lines with a gold answer: each selector's accuracy on the same
    candidates, one sample's (the mean), the oracle pass@k, and the thinking compute (generated
    tokens x parameters)."""
    points = {}
    for mode, recs in _by_mode(records).items():
        checked = [r for r in recs if "error" not in r and "correct" in r]
        if not checked:
            continue
        sel = selection_report([_samples(r) for r in checked])
        tokens = sum(r["tokens"] for r in checked)
        strategies = sorted({r["strategy"] for r in checked})
        points[mode] = {
            "k": max(r["k"] for r in checked),
            "problems": len(checked),
            "tokens": tokens,
            "compute": float(tokens) * n_params,
            "default": float(np.mean([bool(r["correct"]) for r in checked])),
            "default_strategy": ",".join(strategies),
            **{name: sel[name] for name in SELECTORS[1:]},
            "single": sel["random"],
            "oracle": sel["oracle"],
        }
    return points


def loglinear_fit(points: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per selector, least squares accuracy = a + b * log10(compute), with R^2 (needs two
    distinct compute values)."""
    xs = [math.log10(p["compute"]) for p in points.values() if p["compute"] > 0]
    if len(set(xs)) < 2 or len(xs) != len(points):
        return {}
    x = np.array(xs)
    fits = {}
    for name in SELECTORS:
        y = np.array([p[name] for p in points.values()])
        b, a = np.polyfit(x, y, 1)
        resid = y - (a + b * x)
        ss = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float((resid**2).sum()) / ss if ss > 0 else None  # flat: R^2 undefined
        fits[name] = {"intercept": float(a), "slope_per_decade": float(b), "r2": r2}
    return fits


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson 95% interval of an accuracy `p` measured on `n` problems."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


# each line's markers sit this far apart (in decades of compute), so equal lines stay visible
LINE_OFFSET_DECADES = 0.025


def _series(ax: Any, x: np.ndarray, ys: list[float], ns: list[int], shift: float, **kw: Any) -> Any:
    """One selector: its points shifted `shift` decades, each with its 95% interval."""
    xs = x * 10.0**shift
    lo_hi = [wilson(y, n) for y, n in zip(ys, ns, strict=True)]
    lo = np.array([a for a, _ in lo_hi])
    hi = np.array([b for _, b in lo_hi])
    err = np.vstack([np.asarray(ys) - lo, hi - np.asarray(ys)])
    return ax.errorbar(xs, ys, yerr=err, capsize=2.5, elinewidth=0.8, markersize=5, **kw)


def plot_sweep(
    points: dict[str, dict[str, Any]],
    fits: dict[str, dict[str, float | None]],
    path: Path,
    title: str,
) -> dict[str, Any]:
    """Accuracy (0-1) against thinking compute (log x), one line per selector with a 95% interval
    per point (Wilson, over the mode's problems); the lines are offset sideways so equal ones stay
    visible; fits thin; every label inside the frame. Returns the axes' limits and where the
    mode labels sit (for tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted(points, key=lambda m: points[m]["compute"])
    x = np.array([points[m]["compute"] for m in modes])
    ns = [int(points[m]["problems"]) for m in modes]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    default_name = points[modes[0]]["default_strategy"]
    series = [*SELECTORS, "oracle", "single"]
    styles = ("o-", "s--", "^-.", "d:", "x:", "+:")
    for i, (name, style) in enumerate(zip(series, styles, strict=True)):
        shift = (i - (len(series) - 1) / 2) * LINE_OFFSET_DECADES
        label = {"oracle": "oracle pass@k", "single": "one sample"}.get(name) or (
            SELECTOR_LABELS[name] + (f" ({default_name})" if name == "default" else "")
        )
        fit = fits.get(name)
        if fit:
            label += f"  [{fit['slope_per_decade']:+.3f}/decade]"
        colour = {"oracle": "grey", "single": "black"}.get(name)
        bar = _series(ax, x, [points[m][name] for m in modes], ns, shift, fmt=style, label=label, color=colour)  # fmt: skip
        if fit and len(x) > 1:
            xx = np.geomspace(x.min(), x.max(), 20)
            yy = fit["intercept"] + fit["slope_per_decade"] * np.log10(xx)
            ax.plot(xx, yy, color=bar.lines[0].get_color(), lw=0.7, alpha=0.4)
    for xi, m, n in zip(x, modes, ns, strict=True):
        ax.annotate(f"{m} k={points[m]['k']}\nn={n}", (xi, 0.02), fontsize=8, ha="center", va="bottom")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlim(x.min() / 2.5, x.max() * 2.5)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("thinking compute: generated tokens x parameters (log scale)")
    ax.set_ylabel("accuracy (bars: 95% interval over the problems)")
    ax.set_title(title + "\n(markers offset sideways so equal lines stay visible)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return {"ylim": ax.get_ylim(), "xlim": ax.get_xlim(), "labels": [float(v) for v in x]}


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_report(
    job: BatchJob, records: Sequence[dict[str, Any]], facts: dict[str, Any], png: Path | None
) -> dict[str, Any]:
    """The summary (written to OUT.summary.json); with `png`, the sweep too (points, fit, plot)."""
    summary = summarize(records, facts)
    summary["output"] = str(job.output)
    if png is not None:
        from edge_metastone.modelfile.read import open_model_file

        n_params = open_model_file(job.model_path, job.head).n_params
        points = sweep_points(records, n_params)
        fits = loglinear_fit(points)
        summary["sweep"] = {"n_params": n_params, "points": points, "fit": fits, "png": None}
        if points:
            n = max(p["problems"] for p in points.values())
            title = (
                f"{job.model_path.name}: accuracy vs thinking compute, {n} problems, "
                "every selector on the same candidates"
            )
            plot_sweep(points, fits, png, title)
            summary["sweep"]["png"] = str(png)
    path = sidecar(job.output, "summary.json")
    _write_json(path, summary)
    summary["summary_file"] = str(path)
    return summary
