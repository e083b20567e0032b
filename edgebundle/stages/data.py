"""Stage `data`: the data a target build needs (calibration pool, validation and test splits), saved so
that `build` runs on another machine without the data source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgebundle.core.artifact import Artifact
from edgebundle.core.data import Split, data_config_json
from edgebundle.core.recipe import Recipe
from edgebundle.stages.registry import register_stage
from edgebundle.stages.base import StageBase, StageContext


def save_split(split: Split, path: Path) -> None:
    arrays = {f"input:{k}": v for k, v in split.inputs.items()}
    if split.labels is not None:
        arrays["labels"] = split.labels
    if split.groups is not None:
        arrays["groups"] = split.groups.astype(str)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_split(path: Path) -> Split:
    with np.load(path, allow_pickle=False) as z:
        inputs = {k.removeprefix("input:"): z[k] for k in z.files if k.startswith("input:")}
        labels = z["labels"] if "labels" in z.files else None
        groups = z["groups"] if "groups" in z.files else None
    return Split(inputs, labels, groups)


def pool_size(recipe: Recipe) -> int:
    return max([recipe.data.calibration_samples] + [t.calibration.samples or 0 for t in recipe.targets])


@register_stage
class Data(StageBase):
    name = "data"
    label = "data (splits)"
    key = None
    after = ("export",)
    role = "data"
    in_lineage = False
    collective = False
    makes_model = False

    def enabled(self, recipe: Recipe) -> bool:
        return True

    def config(self, ctx: StageContext) -> dict[str, Any]:
        return {"data": json.loads(data_config_json(ctx.recipe.data)), "pool": pool_size(ctx.recipe)}

    def inputs(self, ctx: StageContext) -> list[Artifact]:
        return []

    def extra(self, ctx: StageContext) -> str:
        return ctx.dataset.fingerprint

    def run(self, ctx: StageContext, folder: Path) -> dict[str, Any]:
        ds, recipe = ctx.dataset, ctx.recipe
        cal = ds.split(recipe.data.calibration_split).head(pool_size(recipe))
        for name, split in (("calibration", cal), ("val", ds.val), ("test", ds.test)):
            save_split(split, folder / f"{name}.npz")
        return {"fingerprint": ds.fingerprint, "num_classes": ds.num_classes,
                **({"classes": list(ds.classes)} if ds.classes else {}),
                "samples": {"calibration": len(cal), "val": len(ds.val), "test": len(ds.test)},
                **({"splits": ds.splits} if ds.splits else {})}
