"""A whole prepare stage in one file, outside the package: it scales the student's last linear layer (its
logits) by `factor`. It declares itself (config, label, where it runs) and registers on import; a package
declares it through the `edgebundle.stages` entry-point group. The recipe configures it under
`stages: {scale: {enabled: true, factor: 2.0}}`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgebundle.core.modelio import save_structured
from edgebundle.core.recipe import Recipe
from edgebundle.stages.base import StageBase, StageContext
from edgebundle.stages.registry import config_of, register_stage


class ScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = False
    factor: float = Field(1.0, gt=0)


@register_stage
class Scale(StageBase):
    name = "scale"
    label = "scale (logits)"
    Config = ScaleConfig
    after = ("distill",)
    before = ("export",)
    makes_model = True

    def enabled(self, recipe: Recipe) -> bool:
        return config_of(self, recipe).enabled

    def config(self, ctx: StageContext) -> dict[str, Any]:
        return {"scale": config_of(self, ctx.recipe).model_dump()}

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        model = ctx.load(ctx.student)
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        factor = config_of(self, ctx.recipe).factor
        with torch.no_grad():
            last.weight.mul_(factor)
            last.bias.mul_(factor)
        save_structured(model.eval(), folder)
        return {"factor": factor}
