"""Stage `cluster` (optional): weight sharing by k-means, with an optional centroid fine-tune.

Not collective: under torchrun it runs on rank 0 alone, and its fine-tune trains in that one process
(`ddp=False`), so no rank waits in a DistributedDataParallel collective the others never join.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgebundle.core.artifact import Artifact
from edgebundle.core.modelio import save_structured
from edgebundle.core.recipe import DistillStage, Recipe
import edgebundle.stages.clustering as cl
from edgebundle.stages.registry import register_stage
from edgebundle.stages.base import StageBase, StageContext, dump
from edgebundle.stages.training import accuracy, distill, predict


@register_stage
class Cluster(StageBase):
    name = "cluster"
    label = "cluster (weights)"
    after = ("distill",)
    compresses = "clustering"
    collective = False
    makes_model = True

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.stages.cluster.enabled

    def one_output(self, recipe: Recipe) -> bool:
        return self.enabled(recipe)

    def config(self, ctx: StageContext) -> dict[str, Any]:
        return {"cluster": dump(ctx.recipe.stages.cluster), "seed": ctx.recipe.seed}

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return [ctx.student, ctx.artifacts["teacher"]]

    def extra(self, ctx: StageContext) -> str:
        return ctx.dataset.fingerprint

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        recipe, ds, names, c = ctx.recipe, ctx.dataset, ctx.names, ctx.recipe.stages.cluster
        labels = ds.test.labels
        model = ctx.load(ctx.student)
        before = accuracy(predict(model, ds.test, names), labels) if labels is not None else None
        clustered = cl.cluster(model, c, seed=recipe.seed)
        metrics: dict[str, Any] = {"clusters": c.clusters, "sharing": c.sharing, "layers": sorted(clustered),
                                   "test_accuracy_before": before,
                                   "clustered_params": sum(x.assignment.numel() for x in clustered.values()),
                                   "total_params": sum(p.numel() for p in model.parameters())}
        if labels is not None:
            metrics["test_accuracy_after_kmeans"] = accuracy(predict(model, ds.test, names), labels)
        if c.finetune_epochs:
            cfg = DistillStage(epochs=c.finetune_epochs, lr=c.lr, temperature=c.temperature, alpha=c.alpha,
                               batch_size=c.batch_size, weight_decay=0.0)
            cl.share(model, clustered)
            fit = distill(model, ctx.load(ctx.artifacts["teacher"]), ds.train, ds.val, names, cfg, seed=recipe.seed,
                          device=ctx.device, ddp=False)
            model = model.cpu()
            cl.bake(model)
            metrics["finetune_best_val_accuracy"] = fit.best_val_accuracy
        model.eval()
        metrics["distinct_values"] = cl.distinct_values(model, c)
        if labels is not None:
            metrics["test_accuracy"] = accuracy(predict(model, ds.test, names), labels)
        save_structured(model, folder)
        return metrics
