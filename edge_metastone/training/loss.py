"""The head's training losses (torch): the paper's SPR loss, and plain outcome BCE for comparison."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F


class Loss(str, enum.Enum):
    """How the head learns from final-answer correctness."""

    SPR = "spr"  # SPEC §1: sign filter, class weights with 1.5x positives (the paper's)
    BCE = "bce"  # every step labelled with its candidate's outcome, plain mean (a deviation)


def spr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SPEC §1: per-step BCE kept only where the logit's sign already agrees with y; with P, N the
    kept positive and negative counts (+1 each), positives weigh 1.5*N/(P+N), negatives P/(P+N);
    sum(w*l)/sum(w). Zero (with a gradient of zero) when no step is kept."""
    y = y.to(logits.dtype)
    per_step = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    with torch.no_grad():
        pos = (logits > 0) & (y == 1)
        neg = (logits < 0) & (y == 0)
        p = pos.sum().to(logits.dtype) + 1
        n = neg.sum().to(logits.dtype) + 1
        w = torch.where(pos, 1.5 * n / (p + n), torch.zeros_like(logits))
        w = torch.where(neg, p / (p + n), w)
    total = w.sum()
    if total == 0:
        return (per_step * 0).sum()
    return (w * per_step).sum() / total


def bce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain outcome BCE over every step (no sign filter, no weights)."""
    return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))


LOSSES = {Loss.SPR: spr_loss, Loss.BCE: bce_loss}
