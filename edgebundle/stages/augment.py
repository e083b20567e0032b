"""Augmented views for label-free distillation (`distill: {augment: auto}`): the student sees a new view of
each training input every epoch and learns the teacher's output *on that view* (computed batch by batch),
so it learns the teacher's function instead of memorizing its outputs on a few inputs.

- Images (one float input, NCHW or NHWC, 1 or 3 channels, at least 16 x 16): a random resized crop (35-100 %
  of the area at 3/4-4/3 aspect, torchvision's RandomResizedCrop with a milder scale: the view must still
  show what the teacher saw) resized back bilinearly, and a horizontal flip with probability 0.5.
- Tokens (`input_ids` with `attention_mask`, BERT-style: first and last real token kept): span cropping, a
  random contiguous span of 50-100 % of the real tokens between them, then padding; `token_type_ids`
  follow. Span cropping is how sentence-embedding distillation commonly augments text (it keeps each view a
  fluent sentence, where token masking needs the tokenizer's mask id).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from edgebundle.core.errors import RecipeError
from edgebundle.core.recipe import InputSpec

Augment = Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]]
MIN_AREA = 0.35


def augmenter(specs: list[InputSpec]) -> Augment:
    """The augmentation for these inputs; a RecipeError when none applies."""
    names = [s.name for s in specs]
    if len(specs) == 1 and specs[0].dtype in ("float32", "float16") and len(specs[0].shape) == 4:
        s = specs[0].shape
        nhwc = s[3] in (1, 3) and s[1] not in (1, 3)
        h, w = (s[1], s[2]) if nhwc else (s[2], s[3])
        if min(h, w) >= 16:
            return lambda xs, gen: [_crop_flip(xs[0], gen, nhwc)]
    if "input_ids" in names and "attention_mask" in names:
        ids, mask = names.index("input_ids"), names.index("attention_mask")
        types = names.index("token_type_ids") if "token_type_ids" in names else None
        return lambda xs, gen: _span_crop(xs, gen, ids, mask, types)
    raise RecipeError("stages.distill.augment: no augmentation for these inputs (images: one float NCHW/NHWC input "
                      "of at least 16 x 16; text: input_ids with attention_mask); set augment: none")


def _crop_flip(x: torch.Tensor, gen: torch.Generator, nhwc: bool) -> torch.Tensor:
    if nhwc:
        x = x.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    r = torch.rand(n, 4, generator=gen)
    for i in range(n):
        area = MIN_AREA + (1 - MIN_AREA) * float(r[i, 0])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(r[i, 1]))
        ch = max(1, min(h, int(round(h * math.sqrt(area / aspect)))))
        cw = max(1, min(w, int(round(w * math.sqrt(area * aspect)))))
        top = int(float(r[i, 2]) * (h - ch + 1))
        left = int(float(r[i, 3]) * (w - cw + 1))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        view = F.interpolate(crop.float(), size=(h, w), mode="bilinear", align_corners=False).to(x.dtype)
        out[i] = view[0].flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else view[0]
    return out.permute(0, 2, 3, 1).contiguous() if nhwc else out


def _span_crop(xs: list[torch.Tensor], gen: torch.Generator, ids: int, mask: int, types: int | None) -> list[torch.Tensor]:
    tok, m = xs[ids].clone(), xs[mask].clone()
    tt = xs[types].clone() if types is not None else None
    n, t = tok.shape
    for i in range(n):
        length = int(m[i].sum())
        body = length - 2  # between the first ([CLS]) and the last ([SEP]) real token
        if body < 4:
            continue
        k = int(torch.randint(math.ceil(body / 2), body + 1, (1,), generator=gen))
        start = 1 + int(torch.randint(0, body - k + 1, (1,), generator=gen))
        pad = tok[i, length] if length < t else tok[i, 0] * 0
        row = torch.cat([tok[i, :1], tok[i, start:start + k], tok[i, length - 1:length]])
        tok[i] = pad
        tok[i, :len(row)] = row
        m[i] = 0
        m[i, :len(row)] = 1
        if tt is not None:
            tt[i] = 0
    out = list(xs)
    out[ids], out[mask] = tok, m
    if tt is not None:
        out[types] = tt
    return out
