"""Stage `data`: the data a target build needs (calibration pool, validation and test splits), saved so
that `build` runs on another machine without the data source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgebundle.core.artifact import Artifact
from edgebundle.core.data import Split, data_config_json
from edgebundle.core.errors import DataError
from edgebundle.core.rows import LazyRows
from edgebundle.core.sources import unpack_images
from edgebundle.core.recipe import Recipe
from edgebundle.stages.registry import register_stage
from edgebundle.stages.base import StageBase, StageContext


def save_split(split: Split, path: Path) -> None:
    """One split as an .npz: each input's rows as arrays, or in its source's compact form where it has one
    (an image folder's rows as the files' bytes, not decoded float32: a folder of JPEG crops takes a fraction)."""
    arrays: dict[str, np.ndarray] = {}
    for k, v in split.inputs.items():
        lazy = split.lazy(k)
        packed = lazy.packed() if lazy is not None else None
        if packed is None:
            arrays[f"input:{k}"] = np.asarray(v)
        else:
            arrays.update({f"packed:{k}:{name}": a for name, a in packed.items()})
    if split.labels is not None:
        arrays["labels"] = split.labels
    if split.groups is not None:
        arrays["groups"] = split.groups.astype(str)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_split(path: Path) -> Split:
    with np.load(path, allow_pickle=False) as z:
        inputs = {k.removeprefix("input:"): z[k] for k in z.files if k.startswith("input:")}
        packed: dict[str, dict[str, np.ndarray]] = {}
        lazy: dict[str, LazyRows] = {}
        for k in z.files:
            if k.startswith("packed:"):
                _, name, part = k.split(":", 2)
                packed.setdefault(name, {})[part] = z[k]
        for name, arrays in packed.items():
            if str(arrays["codec"]) != "images":
                raise DataError(f"{path}: input '{name}' is packed as '{arrays['codec']}', which this version "
                                "cannot read")
            lazy[name] = unpack_images(arrays, f"{path.name}:{name}")
        labels = z["labels"] if "labels" in z.files else None
        groups = z["groups"] if "groups" in z.files else None
    # packed rows are decoded once here: a build judges the same split many times (accuracy control)
    made = {**inputs, **{k: np.asarray(v) for k, v in lazy.items()}}
    order = dict.fromkeys(k.split(":")[1] for k in z.files if k.startswith(("input:", "packed:")))  # as saved
    return Split({k: made[k] for k in order}, labels, groups, lazy or None)


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
