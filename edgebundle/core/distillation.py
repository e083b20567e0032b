"""The distillation loss, shared by the distill stage and quantization-aware distillation: which loss a
metric calls for, and its value on a batch of outputs against the reference model's."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def loss_for_metric(metric: str | None) -> str:
    """Class metrics (top1, agreement) -> KL on softened logits; cosine -> cosine of the outputs; anything
    else -> relative MSE."""
    return {"top1": "kl", "agreement": "kl", "cosine": "cosine"}.get(metric or "top1", "mse")


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=1e-12)


def soft_loss(kind: str, out: torch.Tensor, ref: torch.Tensor, temperature: float) -> torch.Tensor:
    """`out` against the reference outputs `ref`: KL on logits softened by `temperature` (scaled by its
    square), 1 - cosine, or MSE relative to the reference's mean square."""
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(out / t, dim=1), F.log_softmax(ref / t, dim=1),
                        reduction="batchmean", log_target=True) * (t * t)
    if kind == "cosine":
        return (1.0 - row_cosine(out, ref)).mean()
    return F.mse_loss(out.float(), ref.float()) / (ref.float().pow(2).mean() + 1e-8)
