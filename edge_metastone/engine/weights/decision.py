"""The weight-buffer mode for a load, decided from the request and what the build offers (no
canary, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_metastone.engine.weights.build import BuildReport
from edge_metastone.types import WeightBuffers

# Extra buffer types auto never uses, and why.
KNOWN_BAD = {
    "AMX": "llama.cpp's AMX matmul segfaults in the first decode on some CPUs "
    "(llama.cpp issue 20824)"
}
REPACK = "CPU_REPACK"


@dataclass(frozen=True)
class WeightPlan:
    """The weight-buffer mode a model loads with, and why."""

    mode: WeightBuffers  # extra, repack or plain (never auto)
    requested: WeightBuffers
    reason: str
    repacked: int = 0  # weights placed in CPU_REPACK by override (repack mode)

    def summary(self) -> str:
        """One line: `repack (auto: ...)`."""
        return f"{self.mode.value} ({self.requested.value}: {self.reason})"

    def to_json(self) -> dict[str, str | int]:
        """JSON-ready."""
        return {
            "mode": self.mode.value,
            "requested": self.requested.value,
            "reason": self.reason,
            "repacked": self.repacked,
        }


def decide(requested: WeightBuffers, report: BuildReport, *, gpu_layers: int = 0) -> WeightPlan:
    """The mode for a load, from the request and what the build offers (no canary, no I/O)."""
    offered = report.extra_bufts
    bad = [b for b in offered if b in KNOWN_BAD]
    if requested is WeightBuffers.EXTRA:
        why = "as asked: llama.cpp's default"
        if bad:
            why += f", including {', '.join(bad)} ({KNOWN_BAD[bad[0]]})"
        return WeightPlan(WeightBuffers.EXTRA, requested, why)
    if requested is WeightBuffers.PLAIN:
        return WeightPlan(WeightBuffers.PLAIN, requested, "as asked: no extra buffer types")
    if requested is WeightBuffers.REPACK:
        if REPACK not in offered:
            return WeightPlan(WeightBuffers.PLAIN, requested, f"this build has no {REPACK}")
        if gpu_layers:
            return WeightPlan(
                WeightBuffers.PLAIN, requested, "GPU offload: overrides would pin layers to the CPU"
            )
        return WeightPlan(WeightBuffers.REPACK, requested, f"as asked: {REPACK} without the rest")
    # auto
    if not bad:
        listed = ", ".join(offered) if offered else "none"
        return WeightPlan(
            WeightBuffers.EXTRA, requested, f"llama.cpp's default; extra buffer types: {listed}"
        )
    skipped = f"{', '.join(bad)} skipped: {KNOWN_BAD[bad[0]]}"
    if gpu_layers:
        return WeightPlan(WeightBuffers.PLAIN, requested, f"{skipped}; GPU offload")
    if REPACK not in offered:
        return WeightPlan(WeightBuffers.PLAIN, requested, f"{skipped}; no {REPACK} in this build")
    return WeightPlan(WeightBuffers.REPACK, requested, f"{skipped}; {REPACK} kept")
