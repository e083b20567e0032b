"""Padded text batches cut to their longest real sequence while a model trains.

Text inputs come padded to the recipe's sequence length (`input_ids` and `attention_mask` of shape [N, 64]),
and a transformer's cost goes with the positions it is shown: a batch of short sentences spends most of its
time on padding that the attention mask then ignores. Where the inputs have an attention mask (a 2-D integer
input whose name holds "mask"), each training batch is cut after the last column any of its rows uses, on
every 2-D integer input of the mask's shape (ids, token types). That changes nothing a model that honours its
mask computes; whether the models at hand do is measured, not assumed: the shortest training inputs and those
of median length go through each model padded and cut, and their outputs must agree (`Trim.checked`). A model
that reads its padding (sums over every position, a fixed-length layer) keeps full-length batches.

Cutting pays when a batch's rows are of similar length: `grouped` draws batches as Hugging Face Trainer's
`group_by_length` does (a shuffled order cut into mega-batches of 50 batches, each sorted by length, the
batches then shuffled), so one long sentence does not set the length of 31 short ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgebundle.core.data import Split

MEGA_BATCHES = 50  # batches per length-sorted group (Hugging Face's LengthGroupedSampler uses 50)
PROBE_ROWS = 4
RTOL = 1e-3  # of the output's largest magnitude


def is_mask(name: str, ndim: int, integer: bool) -> bool:
    """Whether an input is an attention mask: a 2-D ([batch, sequence]) integer input whose name holds "mask"."""
    return "mask" in name.lower() and ndim == 2 and integer


def masked(inputs: list) -> bool:
    """Whether a recipe's inputs (InputSpecs) hold an attention mask: the model's training batches are cut."""
    return any(is_mask(s.name, len(s.shape), "int" in s.dtype) for s in inputs)


def batches_key(inputs: list, by_length: bool) -> dict[str, str]:
    """What a training stage's cache key says of how its text batches are drawn ({} without a mask)."""
    return {"batches": "cut where lossless" + (", grouped by length" if by_length else "")} if masked(inputs) else {}


@dataclass(frozen=True)
class Trim:
    """Which of a model's inputs hold the sequence axis (dim 1) and which of them is the attention mask."""

    mask: int
    seq: tuple[int, ...]

    @staticmethod
    def find(split: Split, names: list[str]) -> Trim | None:
        """The split's attention mask and the inputs cut with it, or None where it has no mask."""
        shapes = {n: tuple(getattr(split.inputs[n], "shape", ())) for n in names}
        dtypes = {n: np.asarray(split.inputs[n][:1]).dtype for n in names}
        mask = next((i for i, n in enumerate(names)
                     if is_mask(n, len(shapes[n]), np.issubdtype(dtypes[n], np.integer))), None)
        if mask is None or shapes[names[mask]][1] < 2:
            return None
        seq = tuple(i for i, n in enumerate(names)
                    if shapes[n] == shapes[names[mask]] and np.issubdtype(dtypes[n], np.integer))
        return Trim(mask, seq)

    def lengths(self, split: Split, names: list[str]) -> np.ndarray:
        """Each input's real length: one past its last masked-in position."""
        m = np.asarray(split.inputs[names[self.mask]]) != 0
        return np.where(m.any(1), m.shape[1] - np.argmax(m[:, ::-1], axis=1), 0)

    def cut(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The batch cut after the last position any row's mask uses (at least one position)."""
        used = (xs[self.mask] != 0).any(0).nonzero()
        keep = int(used[-1]) + 1 if len(used) else 1
        if keep >= xs[self.mask].shape[1]:
            return xs
        return [x[:, :keep] if i in self.seq else x for i, x in enumerate(xs)]

    def lossless(self, models: list[nn.Module], split: Split, names: list[str], device: torch.device) -> bool:
        """Whether every model gives the same outputs on training inputs padded and cut: the shortest ones and
        those around the median length (a model that reads padding only past some length fails the second)."""
        by_length = np.argsort(self.lengths(split, names), kind="stable")
        mid = max(0, len(by_length) // 2 - PROBE_ROWS // 2)
        probes = [np.sort(by_length[:PROBE_ROWS]), np.sort(by_length[mid:mid + PROBE_ROWS])]
        for k, rows in enumerate(probes):
            full = [torch.from_numpy(np.ascontiguousarray(split.inputs[n][rows])).to(device) for n in names]
            short = self.cut(full)
            if short is full:
                if k == 0:
                    return False  # nothing to cut on the shortest inputs: nothing gained
                continue
            if not _same(models, full, short):
                return False
        return True

    @staticmethod
    def checked(models: list[nn.Module], split: Split, names: list[str], device: torch.device) -> Trim | None:
        """The cut for this split where every model keeps its outputs under it; else None."""
        trim = Trim.find(split, names) if len(split) else None
        return trim if trim is not None and trim.lossless(models, split, names, device) else None


def _same(models: list[nn.Module], full: list[torch.Tensor], short: list[torch.Tensor]) -> bool:
    """Whether every model (in eval mode) answers the full and the cut batch alike."""
    try:
        with torch.no_grad():
            for m in models:
                was = m.training
                m.eval()
                a, b = _first(m(*full)), _first(m(*short))
                m.train(was)
                if a.shape != b.shape or not torch.allclose(a, b, rtol=0, atol=RTOL * max(float(a.abs().max()), 1e-6)):
                    return False
    except Exception:  # a model that cannot take the shorter batch keeps full-length ones
        return False
    return True


def _first(y) -> torch.Tensor:
    return (y[0] if isinstance(y, (tuple, list)) else y).float()


def grouped(order: torch.Tensor, lengths: np.ndarray, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """`order` (a shuffled permutation of row numbers) as batches of rows of similar length: mega-batches of
    MEGA_BATCHES batches sorted longest first, cut into batches, the batches shuffled."""
    mega = batch_size * MEGA_BATCHES
    out = []
    for i in range(0, len(order), mega):
        part = order[i:i + mega]
        by_length = part[torch.from_numpy(np.argsort(-lengths[part.cpu().numpy()], kind="stable")).to(part.device)]
        out += [by_length[j:j + batch_size] for j in range(0, len(by_length), batch_size)]
    return [out[k] for k in torch.randperm(len(out), generator=gen).tolist()]
