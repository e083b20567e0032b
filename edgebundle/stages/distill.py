"""Stage `distill`: the pruned student learns from the original teacher (KL on softened logits, CE on
labels where there are some, hidden states where asked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgebundle.core.artifact import Artifact
from edgebundle.core.modelio import save_structured
from edgebundle.core.recipe import Recipe
from edgebundle.stages.base import StageContext, dump
from edgebundle.stages.pruning import count
from edgebundle.stages.training import accuracy, distill, predict


class Distill:
    name = "distill"
    collective = True  # trains with DDP under torchrun
    makes_model = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.stages.distill.enabled

    def config(self, ctx: StageContext) -> dict[str, Any]:
        return {"distill": dump(ctx.recipe.stages.distill), "seed": ctx.recipe.seed}

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return [ctx.student, ctx.artifacts["teacher"]]

    def extra(self, ctx: StageContext) -> str:
        return ctx.dataset.fingerprint

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        recipe, ds, names = ctx.recipe, ctx.dataset, ctx.names
        teacher = ctx.artifacts["teacher"]
        t_model, s_model = ctx.load(teacher), ctx.load(ctx.student)
        fit = distill(s_model, t_model, ds.train, ds.val, names, recipe.stages.distill, seed=recipe.seed,
                      device=ctx.device)
        s_model = s_model.cpu().eval()
        save_structured(s_model, folder)
        macs, params = count(s_model, ctx.example)
        metrics = {"best_val_accuracy": fit.best_val_accuracy, "best_epoch": fit.best_epoch,
                   "val_history": fit.history, "macs": macs, "params": params, "device": str(ctx.device)}
        if ds.test.labels is not None:
            metrics["teacher_test_accuracy"] = teacher.metrics.get("test_accuracy")
            metrics["test_accuracy"] = accuracy(predict(s_model, ds.test, names), ds.test.labels)
        return metrics
