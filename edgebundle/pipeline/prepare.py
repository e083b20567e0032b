"""prepare: the device-independent stages (the registered stages the recipe enables, in their declared order)
into a content-addressed work folder, and re-opening such a folder (`load_prepared`) for a build elsewhere."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import edgebundle
from edgebundle.core import distributed, progress
from edgebundle.core.artifact import ARTIFACT_FILE, Artifact, sha256_file
from edgebundle.core.data import Dataset, load_dataset
from edgebundle.core.errors import BundleError, EdgeBundleError, RecipeError, StageError, first_line
from edgebundle.core.modelio import build_model, check_accepts, example_inputs, import_object, source_fingerprint
from edgebundle.core.recipe import Recipe
from edgebundle.targets import registry
from edgebundle.pipeline.cache import StageCache
from edgebundle.pipeline.lock import work_lock
from edgebundle.pipeline.pricing import TargetPricer
from edgebundle.pipeline.records import Prepared, recipe_digest
from edgebundle.stages import StageContext, registry as stage_registry
from edgebundle.stages.teacher import trains
from edgebundle.stages.data import load_split


Event = Callable[..., None]  # on_event(kind, stage, **info); kinds: start, done, note


def _noop(*_a, **_k) -> None:
    return None


def _device() -> torch.device:
    return distributed.device()


class _Stages:
    """Runs named stages through the cache, remembering which ran, to name them in errors.

    Under torchrun, rank 0 decides hit or miss for everyone, only rank 0 writes the artifact (the other
    ranks of a collective stage train into a throw-away folder), and the others then read rank 0's.
    """

    def __init__(self, cache: StageCache, on_event: Event) -> None:
        self.cache, self.done = cache, []
        self.on_event = on_event if distributed.is_main() else _noop

    def run(self, stage: str, config: dict, parents: list[Artifact], fill, extra: str = "",
            collective: bool = False) -> Artifact:
        key = self.cache.key(stage, config, parents, extra)  # the same key with or without torchrun
        hit = self.cache.get(stage, key) if distributed.is_main() else None
        while self.cache.notes:
            self.on_event("note", stage, text=self.cache.notes.pop(0))
        cached = distributed.broadcast_flag(hit is not None)
        self.on_event("start", stage, cached=cached)
        if not cached:
            try:
                if distributed.is_main():
                    with progress.listening(lambda kind, **info: self.on_event(kind, stage, **info)):
                        hit = self.cache.put(stage, key, config, parents, fill)
                elif collective:  # every rank takes part (DDP); the others' artifacts are thrown away
                    with tempfile.TemporaryDirectory() as td:
                        fill(Path(td))
            except EdgeBundleError as e:
                raise type(e)(f"stage '{stage}' failed{self._after()}: {e}") from e
            except Exception as e:  # what the user's model, data or metric code raised there (--debug: where)
                raise StageError(f"stage '{stage}' failed{self._after()}: {first_line(e)}") from e
        distributed.barrier()
        if hit is None:
            hit = self.cache.get(stage, key)
            if hit is None:
                raise StageError(f"stage '{stage}': rank {distributed.rank()} cannot read rank 0's artifact in "
                                 f"{self.cache.root}; under multi-node torchrun the work folder must be shared")
        self.done.append(stage)
        self.on_event("done", stage, cached=cached, artifact=hit)
        return hit

    def _after(self) -> str:
        return f" (after {', '.join(self.done)})" if self.done else ""


def prepare(recipe: Recipe, work: Path, *, on_event: Event = _noop) -> Prepared:
    """Device-independent stages into a content-addressed work folder. Unchanged stages are reused.

    Also writes WORK/prepared.json so that `build` (maybe on another machine) can find the artifacts.
    A second process preparing the same work folder waits, then finds the stages cached.
    """
    work = Path(work)
    registry.check_targets(recipe)  # bad target names or options: one line before any work
    # under torchrun only rank 0 locks and cleans; the others must not block on rank 0's lock
    with work_lock(work) if distributed.is_main() else contextlib.nullcontext():
        # holding the lock, temporary stage folders are leftovers of a killed preparer: remove them
        for stale in work.glob(".*.tmp-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        prepared = _prepare(recipe, work, on_event)
    distributed.barrier()
    return prepared


def _check_inputs(recipe: Recipe) -> Dataset:
    """Cheap checks before any folder is made: the factory imports, the model takes the input spec and
    returns the recipe's outputs, the metric function imports, the data loads and fits the spec."""
    probe = build_model(recipe.model, recipe.base_dir, recipe.limits.user_code_s)
    outs = check_accepts(probe, recipe.inputs, len(recipe.outputs))
    out = outs[recipe.judged_output[0]]
    if len(outs) > 1:
        training = _learning_stages(recipe)
        if training:
            raise RecipeError(f"the model has {len(outs)} outputs; stages {', '.join(training)} train on one output "
                              "(logits): set their enabled: false (and give model.weights) to bundle it as it is")
    if recipe.metric.is_function:
        import_object(recipe.metric.name, base_dir=recipe.base_dir, what="metric", timeout_s=recipe.limits.user_code_s)
    dataset = load_dataset(recipe)
    _check_on_data(probe, dataset, recipe)
    if dataset.num_classes is not None and out.shape[-1] < dataset.num_classes:
        raise RecipeError(f"the model outputs {out.shape[-1]} values but the data has {dataset.num_classes} classes")
    return dataset


def _learning_stages(recipe: Recipe) -> list[str]:
    """The enabled stages that train or rank on one output (logits), by the names the recipe knows them by."""
    return [(s.key or s.name) for s in stage_registry.ordered() if s.enabled(recipe) and s.one_output(recipe)]


def _check_on_data(model: torch.nn.Module, dataset: Dataset, recipe: Recipe) -> None:
    """The model on two real inputs, as the stages run it (batches of the data, not zeros of the input's shape):
    it takes them, gives one row per input in floating point, logits of [batch, classes] where it learns from
    class labels, and has weights to learn where a stage trains it."""
    split = dataset.train if len(dataset.train) >= 2 else dataset.test
    static = [s.shape[0] for s in recipe.inputs if 0 not in s.dynamic_axes]  # a fixed batch: judged at that size
    rows = np.arange(min(static[0] if static else 2, len(split)))
    batch = [torch.from_numpy(np.ascontiguousarray(split.inputs[s.name][rows])) for s in recipe.inputs]
    try:
        with torch.no_grad():
            out = model(*batch)
    except Exception as e:  # whatever the user's forward raises
        raise RecipeError(f"the model fails on {len(rows)} inputs of the data (the stages run it on batches of "
                          f"them): {first_line(e)}") from e
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    for name, o in zip(recipe.outputs, outs):
        if o.dim() == 0 or o.shape[0] != len(rows):
            raise RecipeError(f"output '{name}' has shape {list(o.shape)} for a batch of {len(rows)} inputs; its "
                              "first dimension must be the batch (one row per input)")
        if not o.is_floating_point():
            raise RecipeError(f"output '{name}' is {str(o.dtype).replace('torch.', '')}; metrics and distillation "
                              "compare floating-point outputs (return the scores, not a cast of them)")
    judged = outs[recipe.judged_output[0]]
    if trains(recipe) and dataset.train.labels is not None and judged.dim() != 2:
        raise RecipeError(f"output '{recipe.judged_output[1]}' has shape {list(judged.shape)} for {len(rows)} inputs; "
                          "training on class labels needs logits of [batch, classes]")
    learning = _learning_stages(recipe)
    if learning and not any(p.requires_grad for p in model.parameters()):
        raise RecipeError(f"the model has no weights to learn; stages {', '.join(learning)} change them: set their "
                          "enabled: false")


def _prepare(recipe: Recipe, work: Path, on_event: Event) -> Prepared:
    """Walk the registered stages the recipe enables, in their declared order, through the cache."""
    torch.manual_seed(recipe.seed)
    stage_registry.check_stages(recipe)
    dataset = _check_inputs(recipe)
    ctx = StageContext(recipe, dataset, example_inputs(recipe.inputs), _device(),
                       source_fingerprint(recipe.model, recipe.base_dir), pricer=TargetPricer, work=work)
    runner = _Stages(StageCache(work), on_event)
    lineage: list[Artifact] = []
    roles: dict[str, Artifact] = {}
    for stage in stage_registry.ordered():
        if not stage.enabled(recipe):
            continue
        art = runner.run(stage.name, stage.config(ctx), stage.inputs(ctx), lambda folder, s=stage: s.run(ctx, folder),
                         extra=stage.extra(ctx), collective=stage.collective)
        ctx.artifacts[stage.name] = art
        if stage.makes_model:
            ctx.student = art
        if stage.in_lineage:
            lineage.append(art)
        if stage.role:
            roles[stage.role] = art
    missing = {"original", "onnx", "data"} - set(roles)
    if missing:
        raise StageError(f"no stage gave {', '.join(sorted(missing))} (the registered stages: "
                         f"{', '.join(s.name for s in stage_registry.ordered())})")
    prepared = Prepared(recipe, dataset, roles["original"], ctx.student, roles["onnx"], lineage)
    if distributed.is_main():
        _write_prepared(work, prepared, roles["data"])
    return prepared


PREPARED_FILE = "prepared.json"


def _write_prepared(work: Path, p: Prepared, data: Artifact) -> None:
    """WORK/prepared.json: what `build` needs to find the last prepared recipe's artifacts."""
    doc = {
        "format": 1,
        "edgebundle_version": edgebundle.__version__,
        "recipe": p.recipe.model_dump(mode="json", exclude={"base_dir"}),
        "recipe_sha256": recipe_digest(p.recipe),
        "base_dir": str(Path(p.recipe.base_dir).resolve()),
        "artifacts": {"teacher": p.teacher.folder.name, "student": p.student.folder.name,
                      "onnx": p.onnx.folder.name, "data": data.folder.name},
        "lineage": [a.folder.name for a in p.lineage],
    }
    tmp = work / f".{PREPARED_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, work / PREPARED_FILE)


def _load_artifact(work: Path, name: str) -> Artifact:
    folder = work / name
    if not (folder / ARTIFACT_FILE).is_file():
        raise BundleError(f"work folder {work} is incomplete: {name}/ is missing; run `edgebundle prepare` again")
    art = Artifact.load(folder)
    for fname, digest in art.files.items():
        f = folder / fname
        if not f.is_file() or sha256_file(f) != digest:
            raise BundleError(f"work folder {work}: {name}/{fname} is missing or changed since it was prepared")
    return art


def load_prepared(work: Path, recipe: Recipe | None = None) -> Prepared:
    """Re-open a work folder made by `prepare` (possibly on another machine) without recomputing anything.

    Every artifact's files are checked against their recorded sha256. `recipe`, when given, must be the
    recipe that was prepared (same digest); it supplies the folder its relative paths resolve against.
    """
    work = Path(work)
    doc_path = work / PREPARED_FILE
    if not doc_path.is_file():
        raise BundleError(f"{work} is not a prepared work folder (no {PREPARED_FILE}); run `edgebundle prepare` first")
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {doc_path}: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != 1:
        found = doc.get("format") if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise BundleError(f"{doc_path} has format {found}; this edgebundle reads format 1")
    try:
        return _open_prepared(work, doc, doc_path, recipe)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a record of another shape (edited by hand?)
        raise BundleError(f"work folder {work} holds records this edgebundle did not write ({first_line(e)}); "
                          "run `edgebundle prepare` again") from e


def _open_prepared(work: Path, doc: dict, doc_path: Path, recipe: Recipe | None) -> Prepared:
    from edgebundle.core.recipe import recipe_from_dict

    if recipe is not None:
        if recipe_digest(recipe) != doc["recipe_sha256"]:
            raise RecipeError(f"the recipe differs from the one prepared in {work}; run `edgebundle prepare` again")
    else:
        base = Path(doc["base_dir"])
        recipe = recipe_from_dict(doc["recipe"], base_dir=base if base.is_dir() else Path.cwd(),
                                  source=str(doc_path))
    arts = {k: _load_artifact(work, v) for k, v in doc["artifacts"].items()}
    lineage = [_load_artifact(work, n) for n in doc["lineage"]]
    d = arts["data"]
    cal, val, test = (load_split(d.path(f"{n}.npz")) for n in ("calibration", "val", "test"))
    train = cal if recipe.data.calibration_split == "train" else val.head(0)
    dataset = Dataset(train=train, val=val, test=test, fingerprint=d.metrics["fingerprint"],
                      num_classes=d.metrics["num_classes"], classes=tuple(d.metrics.get("classes", ())),
                      splits=d.metrics.get("splits"))
    return Prepared(recipe, dataset, arts["teacher"], arts["student"], arts["onnx"], lineage)


# ---- build ---------------------------------------------------------------------------------------------

