"""Stage `teacher`: build the model from the recipe (factory, Hugging Face folder or ensemble), train it
when asked (`stages.train.enabled`, or `auto` without weights), and save it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgebundle.core.artifact import Artifact
from edgebundle.core.modelio import build_model, save_structured
from edgebundle.core.recipe import EnsembleSpec, Recipe
from edgebundle.stages.registry import register_stage
from edgebundle.stages.base import StageBase, StageContext, dump, model_key, without_defaults
from edgebundle.stages.padding import batches_key
from edgebundle.stages.pruning import count
from edgebundle.stages.training import accuracy, predict, train_supervised


def trains(recipe: Recipe) -> bool:
    """enabled true, or auto and the model comes without weights (a Hugging Face folder has its own)."""
    t = recipe.stages.train
    pretrained = recipe.model.weights is not None or getattr(recipe.model, "hf", None) is not None
    return t.enabled is True or (t.enabled == "auto" and not pretrained)


@register_stage
class Teacher(StageBase):
    name = "teacher"
    label = "teacher (load / train)"
    key = "train"
    role = "original"
    collective = True  # trains with DDP under torchrun
    makes_model = True

    def enabled(self, recipe: Recipe) -> bool:
        return True

    def one_output(self, recipe: Recipe) -> bool:
        return trains(recipe)

    def config(self, ctx: StageContext) -> dict[str, Any]:
        r, t = ctx.recipe, ctx.recipe.stages.train
        on = trains(r)
        return {"model": model_key(r.model), "train": without_defaults(t, "patience", "group_by_length") if on else None,
                "seed": r.seed, "inputs": [dump(i) for i in r.inputs],
                **(batches_key(r.inputs, t.group_by_length) if on else {})}

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return []

    def extra(self, ctx: StageContext) -> str:
        return ctx.source + ctx.dataset.fingerprint

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        recipe, ds, names, st = ctx.recipe, ctx.dataset, ctx.names, ctx.recipe.stages
        model = build_model(recipe.model, recipe.base_dir, recipe.limits.user_code_s)
        train_on = trains(recipe)
        metrics: dict[str, Any] = {"trained": train_on}
        if train_on and isinstance(recipe.model, EnsembleSpec):
            # model averaging: every member without weights trains on its own, with its own seed
            for i, (mspec, member) in enumerate(zip(recipe.model.members, model.members)):
                if mspec.weights is None:
                    train_supervised(member, ds.train, ds.val, names, st.train, seed=recipe.seed + i,
                                     device=ctx.device)
            model = model.cpu().eval()
            if ds.test.labels is not None:
                metrics["members_test_accuracy"] = [accuracy(predict(m, ds.test, names), ds.test.labels)
                                                    for m in model.members]
        elif train_on:
            fit = train_supervised(model, ds.train, ds.val, names, st.train, seed=recipe.seed, device=ctx.device)
            model = model.cpu().eval()
            metrics["best_val_accuracy"] = fit.best_val_accuracy
            metrics["best_epoch"] = fit.best_epoch
            metrics["epochs_run"] = fit.epochs
        macs, params = count(model, ctx.example)
        metrics.update(macs=macs, params=params)
        if ds.test.labels is not None:
            metrics["test_accuracy"] = accuracy(predict(model, ds.test, names), ds.test.labels)
        save_structured(model, folder)
        return metrics
