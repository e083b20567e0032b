"""Stage `prune`: structured pruning with Torch-Pruning (channels and whole attention heads really removed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgebundle.core.artifact import Artifact
from edgebundle.core.errors import RecipeError, StageError
from edgebundle.core.modelio import check_accepts, save_structured
from edgebundle.core.recipe import PruneStage, Recipe
from edgebundle.stages.registry import register_stage
from edgebundle.stages.base import StageBase, StageContext, without_defaults
from edgebundle.stages.depth import output_cost
from edgebundle.stages.distill import judged_metric
from edgebundle.stages.pruning import SIMD_ROUNDS, prune
from edgebundle.stages.training import accuracy, predict


SEARCH_FIELDS = ("search_minutes", "search_ratios", "search_depth_ratios", "search_input_scales", "search_samples",
                 "search_epochs")


@register_stage
class Prune(StageBase):
    name = "prune"
    label = "prune (Torch-Pruning)"
    after = ("teacher",)
    compresses = "pruning"
    collective = False
    makes_model = True

    def enabled(self, recipe: Recipe) -> bool:
        p = recipe.stages.prune
        return p.enabled and (p.searched or p.cuts)

    def one_output(self, recipe: Recipe) -> bool:
        return self.enabled(recipe)

    def config(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self._cfg(ctx)
        # round_to auto's widths enter the key: when they change, auto prunes differently
        # (over the pruned layers only with shared: false); BatchNorm re-centring and the least-squares refit
        # changed what a default prunes, and so did bridges in place of dropped blocks
        auto = cfg.round_to == "auto" and cfg.enabled
        return {"prune": without_defaults(cfg, *SEARCH_FIELDS, "depth_ratio", "input_scale"),
                **({"round_to_auto": list(SIMD_ROUNDS) + ([] if cfg.shared else ["pruned layers"])} if auto else {}),
                **({"batchnorm": "recentred"} if cfg.recenter and cfg.enabled else {}),
                **({"readers": "least-squares refit"} if cfg.compensate == "least_squares" and cfg.enabled else {}),
                **({"blocks": f"measured ({self._cost(ctx)}), bridged"} if self._measured(cfg) else {})}

    @staticmethod
    def _measured(cfg: PruneStage) -> bool:
        """Whether dropped blocks are chosen by measurement (and so by the metric's cost)."""
        return cfg.depth_ratio > 0 and cfg.compensate != "none"

    @staticmethod
    def _cost(ctx: StageContext) -> str:
        return output_cost(judged_metric(ctx))

    @staticmethod
    def _cfg(ctx: StageContext) -> PruneStage:
        """The recipe's prune settings; with ratio auto, the structure the search chose."""
        cfg = ctx.recipe.stages.prune
        if not cfg.searched:
            return cfg
        return cfg.model_copy(update={**ctx.artifacts["search"].metrics["chosen"],
                                      **{f: PruneStage.model_fields[f].get_default(call_default_factory=True)
                                         for f in SEARCH_FIELDS}})

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return [ctx.artifacts["teacher"]]

    def extra(self, ctx: StageContext) -> str:
        """The data's fingerprint where the pruned model depends on the training inputs (Taylor gradients,
        activation statistics, compensation)."""
        p = ctx.recipe.stages.prune
        return ctx.dataset.fingerprint if p.importance in ("taylor", "activation") or p.compensate != "none" \
            or p.recenter \
            else ""

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        recipe, ds = ctx.recipe, ctx.dataset
        model = ctx.load(ctx.artifacts["teacher"])
        cfg = self._cfg(ctx)
        if not cfg.cuts:  # the search kept the unpruned model
            save_structured(model, folder)
            return {"unchanged": True, "searched": True}
        rep = prune(model, cfg, ctx.example, train=ds.train, names=ctx.names,
                    metric=judged_metric(ctx) if self._measured(cfg) else None)
        try:
            check_accepts(model, recipe.inputs, len(recipe.outputs))
        except RecipeError as e:
            raise StageError(f"the pruned model no longer runs: {e}") from e
        save_structured(model, folder)
        metrics = {"params_before": rep.params_before, "params_after": rep.params_after,
                   "macs_before": rep.macs_before, "macs_after": rep.macs_after, "macs_ratio": rep.macs_ratio,
                   "ignored": rep.ignored, "layers": rep.layers, "heads": rep.heads, "round_to": rep.round_to,
                   "batchnorm_recentred": rep.recentred,
                   **({"blocks": rep.blocks} if rep.blocks else {}),
                   **({"input_size": list(rep.input_size)} if rep.input_size else {}),
                   **({"searched": True} if recipe.stages.prune.searched else {})}
        if ds.test.labels is not None:
            metrics["test_accuracy_before_finetune"] = accuracy(predict(model, ds.test, ctx.names), ds.test.labels)
        return metrics
