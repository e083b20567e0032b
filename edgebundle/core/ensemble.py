"""Model averaging: several members in one graph, exported, calibrated and bundled as one model."""

from __future__ import annotations

import math

import torch
from torch import nn


class Ensemble(nn.Module):
    """Averages its members' outputs: `logits` (mean of logits) or `probs` (log of the mean probability,
    so the output is still a log-score whose argmax and softmax are the averaged prediction)."""

    def __init__(self, members: list[nn.Module], mode: str = "logits") -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)
        self.mode = mode

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        # a named first argument: torch.export maps the recipe's dynamic axes onto it (single-input models;
        # members with several inputs export with the extra inputs' shapes fixed)
        outs = torch.stack([m(x, *rest) for m in self.members])
        if self.mode == "probs":  # log(mean(softmax)), computed stably (no log(0) = -inf)
            return torch.logsumexp(torch.log_softmax(outs, dim=-1), dim=0) - math.log(len(self.members))
        return outs.mean(0)
