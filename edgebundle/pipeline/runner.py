"""The stage runner: prepare (teacher -> prune -> distill -> export) and build (per target -> bundle).

The runner, not each stage, checks preconditions, caches by content, records lineage, owns evaluation
and timing, and wraps a stage's failure with the names of the stages that ran before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import edgebundle
from edgebundle.calibration.readers import run_outputs, run_split  # noqa: F401  (run_split: used by tests and bench)
from edgebundle.core.metrics import Contract, MetricFunctionError, Verdict, resolve_name
from edgebundle.errors import BundleError, DataError, EdgeBundleError, RecipeError, StageError, TargetUnavailable
from edgebundle.exporters.onnx import EXPORTER, check_parity, cosine, export
from edgebundle.pipeline import distributed, measure as measure_mod
from edgebundle.pipeline.bundle import SCHEMA_VERSION, check_output_folder, pack as pack_bundle, write_bundle
from edgebundle.pipeline.cache import Artifact, StageCache
from edgebundle.pipeline.data import Dataset, Split, data_config_json, load_dataset
from edgebundle.pipeline.host import fingerprint, usable_cores
from edgebundle.pipeline.lock import target_lock, work_lock
from edgebundle.pipeline.modelio import (
    build_model, check_accepts, example_inputs, import_object, load_structured, save_structured, source_fingerprint,
)
from edgebundle.pipeline.prune import count, prune
from edgebundle.pipeline.recipe import DistillStage, EnsembleSpec, MeasureSpec, Recipe, TargetSpec
from edgebundle.pipeline.training import accuracy, distill, predict, train_supervised
from edgebundle.targets import BuildContext, registry
from edgebundle.targets.base import Built

Event = Callable[..., None]  # on_event(kind, stage, **info); kinds: start, done, note


def _noop(*_a, **_k) -> None:
    return None


@dataclass
class Prepared:
    recipe: Recipe
    dataset: Dataset
    teacher: Artifact
    student: Artifact
    onnx: Artifact
    lineage: list[Artifact] = field(default_factory=list)

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.recipe.inputs]

    def load_teacher(self) -> nn.Module:
        return load_structured(self.recipe.model, self.recipe.base_dir, self.teacher.folder)

    def load_student(self) -> nn.Module:
        return load_structured(self.recipe.model, self.recipe.base_dir, self.student.folder)


@dataclass(frozen=True)
class BundleResult:
    target: str
    path: Path | None  # None: nothing written (failed, or rejected without keep_rejected)
    manifest: dict[str, Any] | None
    archive: Path | None = None  # OUT/<target>.tar.gz with --pack
    status: str = "complete"  # complete | pending | rejected | failed
    reason: str | None = None  # rejected or failed: one line that names the target
    error: BaseException | None = field(default=None, compare=False, repr=False)  # failed: the cause (--debug)

    @property
    def ok(self) -> bool:
        return self.status in ("complete", "pending")


@dataclass(frozen=True)
class RunResult:
    prepared: Prepared
    bundles: list[BundleResult]

    @property
    def ok(self) -> bool:
        """Every target produced a bundle within its budget."""
        return all(b.ok for b in self.bundles)


def recipe_digest(recipe: Recipe) -> str:
    return hashlib.sha256(recipe.model_dump_json(exclude={"base_dir", "output"}).encode()).hexdigest()


def _device() -> torch.device:
    return distributed.device()


COLLECTIVE_STAGES = ("teacher", "distill")  # every torchrun rank takes part (DDP); others run on rank 0


class _Stages:
    """Runs named stages through the cache, remembering which ran, to name them in errors.

    Under torchrun, rank 0 decides hit or miss for everyone, only rank 0 writes the artifact (the other
    ranks of a collective stage train into a throw-away folder), and the others then read rank 0's.
    """

    def __init__(self, cache: StageCache, on_event: Event) -> None:
        self.cache, self.done = cache, []
        self.on_event = on_event if distributed.is_main() else _noop

    def run(self, stage: str, config: dict, parents: list[Artifact], fill, extra: str = "") -> Artifact:
        key = self.cache.key(stage, config, parents, extra)  # the same key with or without torchrun
        hit = self.cache.get(stage, key) if distributed.is_main() else None
        cached = distributed.broadcast_flag(hit is not None)
        self.on_event("start", stage, cached=cached)
        if not cached:
            try:
                if distributed.is_main():
                    hit = self.cache.put(stage, key, config, parents, fill)
                elif stage in COLLECTIVE_STAGES:
                    with tempfile.TemporaryDirectory() as td:
                        fill(Path(td))
            except EdgeBundleError as e:
                after = f" (after {', '.join(self.done)})" if self.done else ""
                raise type(e)(f"stage '{stage}' failed{after}: {e}") from e
        distributed.barrier()
        if hit is None:
            hit = self.cache.get(stage, key)
            if hit is None:
                raise StageError(f"stage '{stage}': rank {distributed.rank()} cannot read rank 0's artifact in "
                                 f"{self.cache.root}; under multi-node torchrun the work folder must be shared")
        self.done.append(stage)
        self.on_event("done", stage, cached=cached, artifact=hit)
        return hit


def prepare(recipe: Recipe, work: Path, *, on_event: Event = _noop) -> Prepared:
    """Device-independent stages into a content-addressed work folder. Unchanged stages are reused.

    Also writes WORK/prepared.json so that `build` (maybe on another machine) can find the artifacts.
    A second process preparing the same work folder waits, then finds the stages cached.
    """
    work = Path(work)
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


def _prepare(recipe: Recipe, work: Path, on_event: Event) -> Prepared:
    torch.manual_seed(recipe.seed)
    names = [s.name for s in recipe.inputs]
    # Cheap checks before any folder is made: the factory imports, the model takes the input spec,
    # the data loads and fits the spec.
    probe = build_model(recipe.model, recipe.base_dir)
    outs = check_accepts(probe, recipe.inputs, len(recipe.outputs))
    out = outs[recipe.judged_output[0]]
    st = recipe.stages
    if len(outs) > 1:
        training = [n for n, on in (("train", st.train.enabled is True or (st.train.enabled == "auto"
                                                                            and recipe.model.weights is None)),
                                    ("prune", st.prune.enabled and (st.prune.ratio > 0 or st.prune.head_ratio > 0)),
                                    ("distill", st.distill.enabled), ("cluster", st.cluster.enabled)) if on]
        if training:
            raise RecipeError(f"the model has {len(outs)} outputs; stages {', '.join(training)} train on one output "
                              "(logits): set their enabled: false (and give model.weights) to bundle it as it is")
    if recipe.metric.is_function:
        import_object(recipe.metric.name, base_dir=recipe.base_dir, what="metric")
    dataset = load_dataset(recipe)
    if dataset.num_classes is not None and out.shape[-1] < dataset.num_classes:
        raise RecipeError(f"the model outputs {out.shape[-1]} values but the data has {dataset.num_classes} classes")
    src = source_fingerprint(recipe.model, recipe.base_dir)
    example = example_inputs(recipe.inputs)
    device = _device()
    st = recipe.stages
    stages = _Stages(StageCache(work), on_event)

    def dump(cfg) -> dict:
        return cfg.model_dump(mode="json")

    # 1. teacher: build (and train when asked) -----------------------------------------------------------
    train_on = st.train.enabled is True or (st.train.enabled == "auto" and recipe.model.weights is None)

    def make_teacher(folder: Path) -> dict:
        model = build_model(recipe.model, recipe.base_dir)
        metrics: dict[str, Any] = {"trained": train_on}
        if train_on and isinstance(recipe.model, EnsembleSpec):
            # model averaging: every member without weights trains on its own, with its own seed
            for i, (mspec, member) in enumerate(zip(recipe.model.members, model.members)):
                if mspec.weights is None:
                    train_supervised(member, dataset.train, dataset.val, names, st.train, seed=recipe.seed + i,
                                     device=device)
            model = model.cpu().eval()
            if dataset.test.labels is not None:
                metrics["members_test_accuracy"] = [accuracy(predict(m, dataset.test, names), dataset.test.labels)
                                                    for m in model.members]
        elif train_on:
            fit = train_supervised(model, dataset.train, dataset.val, names, st.train, seed=recipe.seed, device=device)
            model = model.cpu().eval()
            metrics["best_val_accuracy"] = fit.best_val_accuracy
            metrics["best_epoch"] = fit.best_epoch
        macs, params = count(model, example)
        metrics.update(macs=macs, params=params)
        if dataset.test.labels is not None:
            metrics["test_accuracy"] = accuracy(predict(model, dataset.test, names), dataset.test.labels)
        save_structured(model, folder)
        return metrics

    teacher = stages.run("teacher", {"model": dump(recipe.model), "train": dump(st.train) if train_on else None,
                                     "seed": recipe.seed, "inputs": [dump(i) for i in recipe.inputs]},
                         [], make_teacher, extra=src + dataset.fingerprint)
    lineage = [teacher]

    def load(art: Artifact) -> nn.Module:
        return load_structured(recipe.model, recipe.base_dir, art.folder)

    # 2. prune --------------------------------------------------------------------------------------------
    student = teacher
    if st.prune.enabled and (st.prune.ratio > 0 or st.prune.head_ratio > 0):
        def make_pruned(folder: Path) -> dict:
            model = load(teacher)
            rep = prune(model, st.prune, example, train=dataset.train, names=names)
            try:
                check_accepts(model, recipe.inputs, len(recipe.outputs))
            except RecipeError as e:
                raise StageError(f"the pruned model no longer runs: {e}") from e
            save_structured(model, folder)
            metrics = {"params_before": rep.params_before, "params_after": rep.params_after,
                       "macs_before": rep.macs_before, "macs_after": rep.macs_after,
                       "macs_ratio": rep.macs_ratio, "ignored": rep.ignored, "layers": rep.layers,
                       "heads": rep.heads, "round_to": rep.round_to}
            if dataset.test.labels is not None:
                metrics["test_accuracy_before_finetune"] = accuracy(predict(model, dataset.test, names),
                                                                    dataset.test.labels)
            return metrics

        student = stages.run("prune", {"prune": dump(st.prune)}, [teacher], make_pruned,
                             extra=dataset.fingerprint if st.prune.importance == "taylor" else "")
        lineage.append(student)

    # 3. distill ------------------------------------------------------------------------------------------
    if st.distill.enabled:
        pruned = student

        def make_distilled(folder: Path) -> dict:
            t_model, s_model = load(teacher), load(pruned)
            fit = distill(s_model, t_model, dataset.train, dataset.val, names, st.distill,
                          seed=recipe.seed, device=device)
            s_model = s_model.cpu().eval()
            save_structured(s_model, folder)
            macs, params = count(s_model, example)
            metrics = {"best_val_accuracy": fit.best_val_accuracy, "best_epoch": fit.best_epoch,
                       "val_history": fit.history, "macs": macs, "params": params, "device": str(device)}
            if dataset.test.labels is not None:
                metrics["teacher_test_accuracy"] = teacher.metrics.get("test_accuracy")
                metrics["test_accuracy"] = accuracy(predict(s_model, dataset.test, names), dataset.test.labels)
            return metrics

        student = stages.run("distill", {"distill": dump(st.distill), "seed": recipe.seed},
                             [pruned, teacher], make_distilled, extra=dataset.fingerprint)
        lineage.append(student)

    # 3b. weight clustering (optional) ---------------------------------------------------------------------
    if st.cluster.enabled:
        unclustered = student

        def make_clustered(folder: Path) -> dict:
            from edgebundle.pipeline import cluster as cl

            model = load(unclustered)
            before = (accuracy(predict(model, dataset.test, names), dataset.test.labels)
                      if dataset.test.labels is not None else None)
            clustered = cl.cluster(model, st.cluster, seed=recipe.seed)
            metrics: dict[str, Any] = {"clusters": st.cluster.clusters, "sharing": st.cluster.sharing,
                                       "layers": sorted(clustered), "test_accuracy_before": before,
                                       "clustered_params": sum(c.assignment.numel() for c in clustered.values()),
                                       "total_params": sum(p.numel() for p in model.parameters())}
            if dataset.test.labels is not None:
                metrics["test_accuracy_after_kmeans"] = accuracy(predict(model, dataset.test, names),
                                                                 dataset.test.labels)
            if st.cluster.finetune_epochs:
                c = st.cluster
                cfg = DistillStage(epochs=c.finetune_epochs, lr=c.lr, temperature=c.temperature, alpha=c.alpha,
                                   batch_size=c.batch_size, weight_decay=0.0)
                cl.share(model, clustered)
                fit = distill(model, load(teacher), dataset.train, dataset.val, names, cfg, seed=recipe.seed,
                              device=device)
                model = model.cpu()
                cl.bake(model)
                metrics["finetune_best_val_accuracy"] = fit.best_val_accuracy
            model.eval()
            metrics["distinct_values"] = cl.distinct_values(model, st.cluster)
            if dataset.test.labels is not None:
                metrics["test_accuracy"] = accuracy(predict(model, dataset.test, names), dataset.test.labels)
            save_structured(model, folder)
            return metrics

        student = stages.run("cluster", {"cluster": dump(st.cluster), "seed": recipe.seed}, [unclustered, teacher],
                             make_clustered, extra=dataset.fingerprint)
        lineage.append(student)

    # 4. export -------------------------------------------------------------------------------------------
    def make_onnx(folder: Path) -> dict:
        model = load(student)
        path = folder / "model.fp32.onnx"
        export(model, recipe.inputs, recipe.outputs, st.export, path)
        parity = check_parity(model, path, dataset.test, recipe.inputs, recipe.outputs, st.export)
        metrics: dict[str, Any] = {"exporter": EXPORTER, "opset": st.export.opset,
                                   "parity": [p.__dict__ for p in parity]}
        if dataset.test.labels is not None:
            metrics["student_test_accuracy"] = accuracy(predict(model, dataset.test, names), dataset.test.labels)
        return metrics

    onnx_art = stages.run("export", {"export": dump(st.export), "inputs": [dump(i) for i in recipe.inputs],
                                     "outputs": recipe.outputs}, [student], make_onnx, extra=dataset.fingerprint)
    lineage.append(onnx_art)

    # 5. the data a target build needs (calibration pool, val, test), so `build` runs without the source
    pool = max([recipe.data.calibration_samples] + [t.calibration.samples or 0 for t in recipe.targets])

    def make_data(folder: Path) -> dict:
        cal = dataset.split(recipe.data.calibration_split).head(pool)
        for name, split in (("calibration", cal), ("val", dataset.val), ("test", dataset.test)):
            _save_split(split, folder / f"{name}.npz")
        return {"fingerprint": dataset.fingerprint, "num_classes": dataset.num_classes,
                "samples": {"calibration": len(cal), "val": len(dataset.val), "test": len(dataset.test)}}

    data_art = stages.run("data", {"data": json.loads(data_config_json(recipe.data)), "pool": pool}, [], make_data, extra=dataset.fingerprint)
    prepared = Prepared(recipe, dataset, teacher, student, onnx_art, lineage)
    if distributed.is_main():
        _write_prepared(work, prepared, data_art)
    return prepared


PREPARED_FILE = "prepared.json"


def _save_split(split: Split, path: Path) -> None:
    arrays = {f"input:{k}": v for k, v in split.inputs.items()}
    if split.labels is not None:
        arrays["labels"] = split.labels
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _load_split(path: Path) -> Split:
    with np.load(path, allow_pickle=False) as z:
        inputs = {k.removeprefix("input:"): z[k] for k in z.files if k.startswith("input:")}
        labels = z["labels"] if "labels" in z.files else None
    return Split(inputs, labels)


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
    from edgebundle.pipeline.cache import ARTIFACT_FILE, sha256_file

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
    from edgebundle.pipeline.recipe import recipe_from_dict

    work = Path(work)
    doc_path = work / PREPARED_FILE
    if not doc_path.is_file():
        raise BundleError(f"{work} is not a prepared work folder (no {PREPARED_FILE}); run `edgebundle prepare` first")
    try:
        doc = json.loads(doc_path.read_text())
        if doc.get("format") != 1:
            raise BundleError(f"{doc_path} has format {doc.get('format')}; this edgebundle reads format 1")
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {doc_path}: {e}") from e
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
    cal, val, test = (_load_split(d.path(f"{n}.npz")) for n in ("calibration", "val", "test"))
    train = cal if recipe.data.calibration_split == "train" else val.head(0)
    dataset = Dataset(train=train, val=val, test=test, fingerprint=d.metrics["fingerprint"],
                      num_classes=d.metrics["num_classes"])
    return Prepared(recipe, dataset, arts["teacher"], arts["student"], arts["onnx"], lineage)


# ---- build ---------------------------------------------------------------------------------------------

def _measure_feeds(split: Split, recipe: Recipe, batch: int) -> dict[str, np.ndarray]:
    from edgebundle.calibration.readers import iter_feeds

    return next(iter_feeds(split.head(max(batch, 1)), recipe.inputs, batch))


def _torch_latency(model: nn.Module, feeds: dict[str, np.ndarray], names: list[str], spec: MeasureSpec,
                   threads: int) -> measure_mod.LatencyStats:
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    xs = [torch.from_numpy(feeds[n]) for n in names]
    model = model.cpu().eval()
    try:
        with torch.inference_mode():
            return measure_mod.measure(lambda: model(*xs), spec, threads=threads)
    finally:
        torch.set_num_threads(prev)


def _brief(s: measure_mod.LatencyStats) -> dict[str, Any]:
    d = s.to_dict()
    d.pop("samples_ms")
    return d


def reference_latency(prepared: Prepared, spec: MeasureSpec, threads: int) -> dict[str, Any]:
    """PyTorch fp32 eager, teacher and student: same protocol, same inputs, same threads as the targets."""
    recipe = prepared.recipe
    feeds = _measure_feeds(prepared.dataset.test, recipe, spec.batch)
    names = prepared.input_names
    return {
        "pytorch_fp32_teacher": _brief(_torch_latency(prepared.load_teacher(), feeds, names, spec, threads)),
        "pytorch_fp32_student": _brief(_torch_latency(prepared.load_student(), feeds, names, spec, threads)),
    }


def _latency(sess, feeds, spec: MeasureSpec, threads: int) -> measure_mod.LatencyStats:
    """The shared wall-clock protocol, or the device's own clock where the session has one (CUDA events)."""
    if hasattr(sess, "gpu_samples_ms"):
        samples = sess.gpu_samples_ms(feeds, warmup=spec.warmup_min * 10, iterations=spec.iterations)
        return measure_mod.summarize(np.array(samples), batch=spec.batch, threads=threads,
                                     warmup=spec.warmup_min * 10)
    return measure_mod.measure(lambda: sess.run(feeds), spec, threads=threads)


def _preflight(spec: TargetSpec):
    entry = registry.lookup(spec.name)
    target = entry.factory()
    options = entry.options_model.model_validate(spec.options)
    why = target.unavailable_reason(options)
    if why:
        raise TargetUnavailable(f"target '{spec.name}' is unavailable here: {why}")
    return entry, target, options


def fp32_reference(prepared: Prepared, threads: int | None = None) -> list[np.ndarray]:
    """Every output of the fp32 ONNX model on the test split: what each bundle is judged against."""
    from edgebundle.targets.ort_cpu import OrtSession

    sess = OrtSession(prepared.onnx.path("model.fp32.onnx"), threads=threads or usable_cores())
    try:
        return run_outputs(sess, prepared.dataset.test, prepared.recipe.inputs)
    finally:
        sess.close()


def contract_for(recipe: Recipe, spec: TargetSpec, labels: np.ndarray | None, judged: np.ndarray) -> Contract:
    """The recipe's metric bound to this target's budget; `judged` is the fp32 judged output (for `auto`)."""
    idx, name = recipe.judged_output
    metric = resolve_name(recipe.metric, has_labels=labels is not None, output_name=name,
                          output_shape=tuple(judged.shape))
    if metric == "top1" and labels is None:
        raise RecipeError("metric top1 needs labels and the data has none; use metric agreement (classifiers) "
                          "or cosine")
    fn = (import_object(recipe.metric.name, base_dir=recipe.base_dir, what="metric")
          if recipe.metric.is_function else None)
    return Contract(metric, recipe.metric, spec.max_accuracy_drop, idx, name, fn)


def judge(contract: Contract, reference: np.ndarray, outputs: np.ndarray, labels: np.ndarray | None) -> Verdict:
    try:
        return contract.judge(reference, outputs, labels)
    except MetricFunctionError as e:
        raise RecipeError(str(e)) from e


def check_resolvable(contract: Contract, reference: np.ndarray, labels: np.ndarray | None, target: str) -> None:
    """A points budget needs enough judged inputs that one changed input does not decide it alone."""
    v = judge(contract, reference, reference, labels)
    need = contract.needed_samples()
    if v.samples < need:
        what = (f"inputs where the fp32 model is confident (top-1 probability >= {contract.spec.min_confidence:g})"
                if contract.metric == "agreement" else "inputs")
        raise DataError(f"target '{target}': the test split has {v.samples} {what}; a {contract.max_drop:g}-point "
                        f"{contract.metric} budget needs at least {need} (one changed input would be "
                        f"{100.0 / max(v.samples, 1):.1f} points): give more data or raise max_accuracy_drop")


@dataclass
class _Eval:
    built: Built
    outputs: np.ndarray | None  # the judged output on the test split
    verdict: Verdict
    latency: measure_mod.LatencyStats | None
    same_runtime: dict[str, Any] | None  # the same runtime's fp32 latency, where it can run it
    runtime_seen: dict[str, Any]


def _target_build(target, ctx: BuildContext, stage: str, prepared: Prepared) -> Built:
    try:
        return target.build(ctx)
    except (DataError, RecipeError):
        raise
    except EdgeBundleError as e:
        raise StageError(f"{stage} failed (after {', '.join(a.stage for a in prepared.lineage)}): {e}") from e


def _evaluate(target, entry, built: Built, tmp: Path, prepared: Prepared, spec: TargetSpec, contract: Contract,
              reference_out: np.ndarray, threads: int, *, same_runtime: bool = True) -> _Eval:
    """The artifact's judged output on the test split, its verdict and its latency (and the same runtime's
    fp32 latency, for "vs fp32 on the same runtime")."""
    from edgebundle.targets.ort_cpu import OrtSession

    recipe, ds = prepared.recipe, prepared.dataset
    feeds = _measure_feeds(ds.test, recipe, spec.measure.batch)
    same_rt, lat, runtime_seen = None, None, {}
    if built.status == "pending":  # the runtime's artifact is not built here: accuracy through ORT CPU, no latency
        sess = OrtSession(tmp / (built.eval_file or built.model_file), threads=threads)
        try:
            outs = run_outputs(sess, ds.test, recipe.inputs)
        finally:
            sess.close()
    else:
        if same_runtime and built.precision != "fp32" and (built.fp32_file or entry.capabilities.opens_onnx):
            fp32 = tmp / built.fp32_file if built.fp32_file else prepared.onnx.path("model.fp32.onnx")
            s32 = target.open(fp32, threads=threads, runtime=built.runtime)
            try:
                same_rt = _brief(measure_mod.measure(lambda: s32.run(feeds), spec.measure, threads=threads))
            finally:
                s32.close()
        sess = target.open(tmp / built.model_file, threads=threads, runtime=built.runtime)
        try:
            outs = run_outputs(sess, ds.test, recipe.inputs)
            lat = _latency(sess, feeds, spec.measure, threads)
            runtime_seen = ({"inference_precision": sess.inference_precision}
                            if hasattr(sess, "inference_precision") else {})
        finally:
            sess.close()
    if len(outs) <= contract.output_index:
        raise StageError(f"build:{spec.name}: the artifact has {len(outs)} output(s); the metric judges output "
                         f"'{contract.output_name}' (number {contract.output_index + 1})")
    out = outs[contract.output_index]
    verdict = judge(contract, reference_out, out, ds.test.labels)
    return _Eval(built, out, verdict, lat, same_rt, runtime_seen)


def _tried(quant: dict[str, Any]) -> str:
    """What the build tried before the verdict, from the target's accuracy-budget record."""
    b = quant.get("accuracy_budget") or {}
    parts = []
    if b.get("drop_full_int8") is not None:
        parts.append(f"full int8 (val loss {b['drop_full_int8']:.3g})")
    for a in b.get("attempts") or []:
        if "excluded" in a:
            parts.append(f"{a['excluded']} layer(s) kept float (val loss {a['drop']:.3g})")
        elif "step" in a:
            parts.append(f"{a['step']} (val loss {a.get('val_drop')})")
    if quant.get("dynamic_over_budget"):
        parts.insert(0, "dynamic int8")
    return "; ".join(parts) if parts else "int8 with the target's settings"


def build_target(prepared: Prepared, spec: TargetSpec, output: Path, *, on_event: Event = _noop,
                 reference: dict[str, Any] | None = None, fp32_test: list[np.ndarray] | None = None,
                 keep_rejected: bool = False) -> BundleResult:
    """Build one target's bundle from prepared artifacts: calibrate, judge, measure, write atomically.

    A bundle that misses the recipe's accuracy budget on the test split is not written where a good one
    is expected: it is discarded (status 'rejected' in the result), or with `keep_rejected` written to
    OUT/<target>.rejected with `status: rejected` in its manifest.
    """
    import onnx

    recipe = prepared.recipe
    entry, target, options = _preflight(spec)
    threads = spec.threads or usable_cores()
    ds = prepared.dataset
    stage = f"build:{spec.name}"
    on_event("start", stage, cached=False)
    cal = ds.calibration(recipe.data, spec.calibration.samples)
    if reference is None:
        reference = reference_latency(prepared, spec.measure, threads)
    if fp32_test is None:
        fp32_test = fp32_reference(prepared, threads)
    fp32_path = prepared.onnx.path("model.fp32.onnx")
    ref_out = fp32_test[recipe.judged_output[0]]
    contract = contract_for(recipe, spec, ds.test.labels, ref_out)
    check_resolvable(contract, ref_out, ds.test.labels, spec.name)
    asked = getattr(options, "precision", None)
    if asked == "auto":
        options = options.model_copy(update={"precision": "int8"})
    rejection: list[str] = []

    def context(opts, workdir: Path) -> BuildContext:
        return BuildContext(recipe, spec, opts, fp32_path, cal, ds.val, workdir, threads,
                            load_model=prepared.load_student, contract=contract)

    def fill(tmp: Path) -> dict[str, Any]:
        built = _target_build(target, context(options, tmp), stage, prepared)
        ev = _evaluate(target, entry, built, tmp, prepared, spec, contract, ref_out, threads)
        notes = list(built.notes)
        choice = None
        if asked == "auto" and built.precision == "int8" and ev.latency is not None and ev.same_runtime:
            int8_ms, fp32_ms = ev.latency.p50_ms, ev.same_runtime["p50_ms"]
            choice = {"asked": "auto", "int8_p50_ms": int8_ms, "fp32_p50_ms": fp32_ms, "shipped": "int8",
                      "int8_within_budget": ev.verdict.within}
            if ev.verdict.within and int8_ms >= fp32_ms:
                alt = tmp / ".fp32"
                alt.mkdir()
                b32 = _target_build(target, context(options.model_copy(update={"precision": "fp32"}), alt), stage,
                                    prepared)
                ev32 = _evaluate(target, entry, b32, alt, prepared, spec, contract, ref_out, threads,
                                 same_runtime=False)
                if ev32.verdict.within:
                    for f in tmp.iterdir():
                        if f != alt:
                            shutil.rmtree(f) if f.is_dir() else f.unlink()
                    for f in alt.iterdir():
                        os.replace(f, tmp / f.name)
                    ev, choice["shipped"] = ev32, "fp32"
                    notes.append(f"precision auto: int8 within budget ran p50 {int8_ms:.3f} ms, fp32 on the same "
                                 f"runtime {fp32_ms:.3f} ms; shipped fp32, the faster")
                shutil.rmtree(alt, ignore_errors=True)
        built, v, lat, same_rt = ev.built, ev.verdict, ev.latency, ev.same_runtime
        pending = built.status == "pending"
        status = built.status if v.within else "rejected"
        if not v.within:
            rejection.append(f"{spec.name}: {v.line()} missed the budget; tried: {_tried(built.quantization)}")
            notes.append(f"rejected: {v.line()}; tried: {_tried(built.quantization)}")
        if (lat is not None and same_rt and built.precision == "int8" and lat.p50_ms > same_rt["p50_ms"]
                and not (choice and choice["shipped"] == "fp32")):
            notes.append(f"int8 p50 {lat.p50_ms:.4f} ms is slower than fp32 on the same runtime "
                         f"({same_rt['p50_ms']:.4f} ms) on this host; options.precision: fp32 (or auto) ships fp32")
        teacher_acc = prepared.teacher.metrics.get("test_accuracy")
        student_acc = prepared.onnx.metrics.get("student_test_accuracy")
        m = onnx.load(str(fp32_path), load_external_data=False)  # every target keeps the exported interface
        io = {kind: [{"name": t.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type).name,
                      "shape": [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]} for t in vals]
              for kind, vals in (("inputs", m.graph.input), ("outputs", m.graph.output))}
        teacher_p50 = reference["pytorch_fp32_teacher"]["p50_ms"]
        same_rt_p50 = same_rt["p50_ms"] if same_rt else None
        quantization = dict(built.quantization)
        if choice:
            quantization["precision_choice"] = choice
        return {
            "schema_version": SCHEMA_VERSION,
            "edgebundle_version": edgebundle.__version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "recipe": {"name": recipe.name, "sha256": recipe_digest(recipe),
                       "json": recipe.model_dump(mode="json", exclude={"base_dir"})},
            "target": {"name": spec.name, "precision": built.precision, "status": status,
                       "exercised": not pending, "rejection": rejection[0] if rejection else None,
                       "runtime": {**built.runtime, **ev.runtime_seen, "threads": threads},
                       "capabilities": {"precisions": list(entry.capabilities.precisions),
                                        "needs_gpu": entry.capabilities.needs_gpu,
                                        "extra": entry.capabilities.extra,
                                        "runtime": entry.capabilities.runtime}},
            "model_file": built.model_file,
            **io,
            "lineage": [a.record() for a in prepared.lineage]
            + [{"stage": stage, "config": spec.model_dump(mode="json"), "options": options.model_dump(mode="json")}],
            "quantization": quantization,
            "accuracy": {"metric": v.metric, "output": contract.output_name, "split": "test", "samples": len(ds.test),
                         "judged_samples": v.samples, "budget": v.budget,
                         "teacher_pytorch": teacher_acc, "student_pytorch": student_acc, "fp32_onnx": v.reference,
                         "target": v.value, "drop_vs_fp32": v.drop,
                         "max_drop": spec.max_accuracy_drop if v.metric not in ("cosine", "snr", "mse") else None,
                         "within_budget": v.within, "details": v.details,
                         "output_cosine_vs_fp32": cosine(ev.outputs, ref_out)},
            "latency": None if lat is None else lat.to_dict(),
            "reference_latency": {**reference, **({f"{entry.capabilities.runtime}_fp32_student": same_rt}
                                                  if same_rt else {})},
            "speedup": {"vs_pytorch_fp32_teacher": None if lat is None else teacher_p50 / lat.p50_ms,
                        "vs_same_runtime_fp32": (same_rt_p50 / lat.p50_ms) if same_rt_p50 and lat else None},
            "host": fingerprint(),
            "notes": notes,
        }

    path = write_bundle(output, spec.name, fill, rejected_name=f"{spec.name}.rejected" if keep_rejected else None)
    if rejection:
        on_event("done", stage, cached=False, status="rejected")
        manifest = json.loads((path / "manifest.json").read_text()) if path is not None else None
        return BundleResult(spec.name, path, manifest, status="rejected", reason=rejection[0])
    manifest = json.loads((path / "manifest.json").read_text())
    on_event("done", stage, cached=False)
    return BundleResult(spec.name, path, manifest, status=manifest["target"]["status"])


def _build_all(prepared: Prepared, specs: list[TargetSpec], output: Path, on_event: Event,
               pack: bool = False, keep_rejected: bool = False) -> list[BundleResult]:
    """Every target in turn. A target that fails or misses its budget is that target's result (status
    'failed' or 'rejected' with one line); the others go on. Bad input (RecipeError, DataError) stops all."""
    results = []
    refs: dict[tuple, dict] = {}
    fp32_test = fp32_reference(prepared)
    labels = prepared.dataset.test.labels
    judged = fp32_test[prepared.recipe.judged_output[0]]
    for spec in specs:  # bad input before any target builds: the metric, its function, enough judged inputs
        check_resolvable(contract_for(prepared.recipe, spec, labels, judged), judged, labels, spec.name)
    for spec in specs:
        threads = spec.threads or usable_cores()
        k = (threads, spec.measure.model_dump_json())
        try:
            if k not in refs:
                on_event("start", "reference", cached=False)
                refs[k] = reference_latency(prepared, spec.measure, threads)
                on_event("done", "reference", cached=False)
            res = build_target(prepared, spec, output, on_event=on_event, reference=refs[k], fp32_test=fp32_test,
                               keep_rejected=keep_rejected)
        except (RecipeError, DataError, BundleError):
            raise
        except EdgeBundleError as e:
            res = BundleResult(spec.name, None, None, status="failed", reason=f"{spec.name}: {e}", error=e)
        except Exception as e:  # a runtime's own error: this target's failure, the other targets go on
            res = BundleResult(spec.name, None, None, status="failed",
                               reason=f"{spec.name}: build:{spec.name} failed: {type(e).__name__}: {e}", error=e)
        if res.status == "failed":
            on_event("done", f"build:{spec.name}", cached=False, status="failed")
        if pack and res.path is not None and res.status in ("complete", "pending"):
            res = dataclasses.replace(res, archive=pack_bundle(res.path))
        results.append(res)
    from edgebundle.pipeline.report import write_report

    write_report(output)
    return results


def _select(recipe: Recipe, targets: list[str] | None, output: Path) -> list[TargetSpec]:
    check_output_folder(output)
    selected = [recipe.target(t) for t in targets] if targets else list(recipe.targets)
    for spec in selected:
        _preflight(spec)
    return selected


def build(work: Path, *, targets: list[str] | None = None, output: Path | None = None,
          recipe: Recipe | None = None, on_event: Event = _noop, pack: bool = False,
          keep_rejected: bool = False) -> list[BundleResult]:
    """Build bundles from a prepared work folder: the per-target job, run on that target's machine.

    Several `build`s (different targets) may run at once against one work folder and one output
    folder: each holds only its own targets' locks and writes each bundle atomically.
    """
    prepared = load_prepared(work, recipe)
    output = Path(output) if output is not None else prepared.recipe.output
    selected = _select(prepared.recipe, targets, output)
    with contextlib.ExitStack() as locks:
        for spec in selected:
            locks.enter_context(target_lock(output, spec.name))
        return _build_all(prepared, selected, output, on_event, pack, keep_rejected)


def run(recipe: Recipe, *, output: Path | None = None, targets: list[str] | None = None,
        work: Path | None = None, on_event: Event = _noop, pack: bool = False,
        keep_rejected: bool = False) -> RunResult:
    """prepare + build for every (selected) target. The library's main entry point."""
    output = Path(output) if output is not None else recipe.output
    selected = _select(recipe, targets, output)
    with contextlib.ExitStack() as locks:
        # every target's lock first: a second run into the same folder fails now, not after training
        for spec in selected:
            locks.enter_context(target_lock(output, spec.name))
        prepared = prepare(recipe, work or output / ".work", on_event=on_event)
        return RunResult(prepared, _build_all(prepared, selected, output, on_event, pack, keep_rejected))
