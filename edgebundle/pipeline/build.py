"""build: per target, from a prepared work folder: calibrate, judge (end to end, on the deployment ISA),
measure, choose the precision, assemble the manifest and write the bundle atomically, or reject it."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgebundle
from edgebundle.core import progress
from edgebundle.core.errors import (BundleError, DataError, DeviceError, EdgeBundleError, RecipeError,
                                    TargetUnavailable)
from edgebundle.core.host import contention_text, fingerprint, usable_cores
from edgebundle.core.metrics import Contract, cosine, with_other_outputs
from edgebundle.core.recipe import DeviceSpec, Recipe, TargetSpec
from edgebundle.targets import registry
from edgebundle.pipeline.bundle import (SCHEMA_VERSION, Accuracy, ManifestDraft, TargetInfo, check_bundle_places,
                                        check_output_folder,
                                        pack as pack_bundle, write_bundle)
from edgebundle.pipeline.evaluate import (Evaluation, step_name, chain_for, check_held_out_resolvable,
                                          check_resolvable, contract_for, evaluate, held_out_outputs, others_lost,
                                          fp32_reference, original_reference, reference_latency, target_build, tried,
                                          verdict_summary)
from edgebundle.pipeline.lock import target_lock
from edgebundle.pipeline.records import BundleResult, Prepared, recipe_digest
from edgebundle.stages import registry as stage_registry
from edgebundle.targets import BuildContext
from edgebundle.pipeline.prepare import Event, _noop, load_prepared
from edgebundle.targets.base import Built


def _preflight(spec: TargetSpec, recipe: Recipe | None = None):
    try:
        entry = registry.lookup(spec.name)
    except ValueError as e:
        listed = f" (the recipe lists: {', '.join(t.name for t in recipe.targets)})" if recipe is not None else ""
        raise RecipeError(f"{e}{listed}") from e
    target = entry.factory()
    options = entry.options_model.model_validate(spec.options)
    why = target.unavailable_reason(options)
    if why:
        raise TargetUnavailable(f"target '{spec.name}' is unavailable here: {why}")
    return entry, target, options


def build_target(prepared: Prepared, spec: TargetSpec, output: Path, *, on_event: Event = _noop,
                 reference: dict[str, Any] | None = None, fp32_test: list[np.ndarray] | None = None,
                 contract: Contract | None = None, keep_rejected: bool = False,
                 original: np.ndarray | None | bool = True, device: DeviceSpec | None = None) -> BundleResult:
    """Build one target's bundle from prepared artifacts: calibrate, judge, measure, write atomically.

    A bundle that misses the recipe's accuracy budget on the test split is not written where a good one
    is expected: it is discarded (status 'rejected' in the result), or with `keep_rejected` written to
    OUT/<target>.rejected with `status: rejected` in its manifest.
    """
    checked = _preflight(spec)
    stage = f"build:{spec.name}"
    on_event("start", stage, cached=False)
    if reference is None:
        reference = reference_latency(prepared, spec.measure, spec.threads or usable_cores())
    job = job_for(prepared, spec, checked=checked, fp32_test=fp32_test, original=original, contract=contract)
    verdicts: list[Evaluation] = []
    device = device or spec.device
    on_device: list[str] = []  # the rejection line of a bundle over budget on its device

    def fill(tmp: Path) -> ManifestDraft:
        ev, choice = job.build_and_evaluate(tmp)
        verdicts.append(ev)
        draft = _manifest(job, ev, choice, reference)
        if device is not None and ev.verdict.within and ev.built.status == "complete":
            on_event("note", stage, text=f"{spec.name}: measuring on device {device.label} ({device.kind})")
            rec = job.on_device(tmp, ev.built, device)
            draft.devices = [rec]
            if rec["accuracy"] is not None and not rec["accuracy"]["within_budget"]:
                from edgebundle.pipeline.ondevice import rejection

                line = rejection(spec.name, rec, verdict_summary(ev.verdict))
                on_device.append(line)
                draft.target.status, draft.target.rejection = "rejected", line
        return draft

    with progress.listening(lambda kind, **info: on_event(kind, stage, **info)):  # QAT's epochs
        path = write_bundle(output, spec.name, fill, rejected_name=f"{spec.name}.rejected" if keep_rejected else None)
    manifest = json.loads((path / "manifest.json").read_text()) if path is not None else None
    ev = verdicts[-1]
    if ev.isa and ev.isa["judged_on"] == "host" and ev.isa["deployment"] != ev.isa["build_host"]:
        on_event("note", stage, text=f"{spec.name}: int8 {ev.isa['how']}")
    if not ev.verdict.within or on_device:
        on_event("done", stage, cached=False, status="rejected")
        return BundleResult(spec.name, path, manifest, status="rejected",
                            reason=on_device[0] if on_device else _rejection(spec, ev))
    on_event("done", stage, cached=False)
    return BundleResult(spec.name, path, manifest, status=manifest["target"]["status"])


def job_for(prepared: Prepared, spec: TargetSpec, *, checked: tuple | None = None,
            fp32_test: list[np.ndarray] | None = None, original: np.ndarray | None | bool = True,
            contract: Contract | None = None) -> _Job:
    """A target's job (its contract, the fp32 and original references), as `build_target` makes it and as an
    artifact built before is judged by; what the caller already has (the preflight's entry, target and
    options, the fp32 outputs on the test split, the original's, the contract) is not computed again."""
    entry, target, options = checked or _preflight(spec)
    threads = spec.threads or usable_cores()
    if fp32_test is None:
        fp32_test = fp32_reference(prepared, threads)
    ref_out = fp32_test[prepared.recipe.judged_output[0]]
    if original is True:
        original = original_reference(prepared)
    if contract is None:
        contract = _contract(prepared, spec, verdict_reference(prepared, ref_out, original))
    judged = prepared.recipe.judged_output[0]
    others = {name: (i, fp32_test[i]) for i, name in enumerate(prepared.recipe.outputs)
              if i != judged and i < len(fp32_test)}
    return _Job(prepared, spec, entry, target, options, contract, ref_out, threads, f"build:{spec.name}",
                original=original, others=others)


@dataclass
class _Job:
    """One target's build: its settings, the contract it is held to, and the fp32 reference outputs."""

    prepared: Prepared
    spec: TargetSpec
    entry: Any
    target: Any
    options: Any  # the target's validated options, precision 'auto' already resolved to int8
    contract: Contract
    ref_out: np.ndarray
    threads: int
    stage: str
    original: np.ndarray | None = None  # the original model's judged output on the test split (compressed)
    others: dict[str, tuple[int, np.ndarray]] | None = None  # outputs the metric does not judge: fp32 on test
    asked: str | None = None

    student_vs_original: Any = None  # the fp32 student's verdict against the original: one per job

    def __post_init__(self) -> None:
        self.asked = getattr(self.options, "precision", None)
        if self.asked == "auto":
            self.options = self.options.model_copy(update={"precision": "int8"})
        if self.original is not None:
            test = self.prepared.dataset.test
            self.student_vs_original = self.contract.judge(self.original, self.ref_out, test.labels, interval=True,
                                                           groups=test.groups)

    def context(self, options, workdir: Path) -> BuildContext:
        p, recipe = self.prepared, self.prepared.recipe
        return BuildContext(recipe, self.spec, options, p.onnx.path("model.fp32.onnx"),
                            p.dataset.calibration(recipe.data, self.spec.calibration.samples), p.dataset.val,
                            workdir, self.threads, load_model=p.load_student, contract=self.contract,
                            train=p.dataset.train)

    def build_and_evaluate(self, tmp: Path, options=None, same_runtime: bool = True) -> tuple[Evaluation, dict | None]:
        built = target_build(self.target, self.context(options or self.options, tmp), self.stage, self.prepared)
        ev = evaluate(self.target, self.entry, built, tmp, self.prepared, self.spec, self.contract, self.ref_out,
                      self.threads, same_runtime=same_runtime, others=self.others)
        chain = chain_for(self.contract, self.prepared, self.original, self.student_vs_original, ev.outputs,
                          ev.verdict)
        ev = self._on_deployment_isa(tmp, dataclasses.replace(ev, verdict=chain.decisive, chain=chain))
        ev = dataclasses.replace(ev, verdict=with_other_outputs(ev.verdict, ev.others_lost))
        if options is not None or self.asked != "auto":
            return ev, None
        return self._precision_auto(tmp, ev)

    def _on_deployment_isa(self, tmp: Path, ev: Evaluation) -> Evaluation:
        """x86 CPU targets (options.isa): int8 judged on the deployment ISA's arithmetic, natively, with the
        runtime's kernels capped at it (oneDNN: OpenVINO) or under qemu-x86_64 where the host has more, or on
        the host's ISA where it cannot be reproduced (said so)."""
        from edgebundle.core.isa import cap_env, deployment, host_isa, how_to_judge

        isa = getattr(self.options, "isa", None)
        if isa is None or ev.built.status == "pending":
            return ev
        host, dep = host_isa(), deployment(isa)
        mode, how_arg, how = how_to_judge(isa, self.entry.capabilities.isa_cap)
        record: dict[str, Any] = {"deployment": dep, "asked": isa, "build_host": host, "judged_on": mode, "how": how}
        if ev.built.precision != "int8" and mode != "native":
            record.update(judged_on="native", how=f"{ev.built.precision}: no int8 arithmetic to reproduce; judged "
                                                  f"on this host's {host}")
        elif ev.built.isa_neutral and mode != "native":  # nothing to reproduce: emulating MiniLM took ~1700x
            record.update(judged_on="native", how=f"{ev.built.isa_neutral}: judged natively on this host's {host}")
        elif mode in ("emulated", "capped"):
            from edgebundle.pipeline.emulated import emulated_outputs

            recipe = self.prepared.recipe
            env = cap_env(isa) if mode == "capped" else None
            outs = emulated_outputs(self.spec.name, tmp / ev.built.model_file, ev.built.runtime, self.threads,
                                    self.prepared.dataset.test, recipe.inputs,
                                    how_arg if mode == "emulated" else None, env=env)
            out = outs[self.contract.output_index]
            chain = self.chain_of(out)
            record["emulator" if mode == "emulated" else "kernel_cap"] = (
                f"qemu-x86_64 -cpu {how_arg}" if mode == "emulated" else ", ".join(f"{k}={v}" for k, v in env.items()))
            record["on_build_host"] = {"value": ev.verdict.value, "within_budget": ev.verdict.within,
                                       **({"cosine_mean": ev.verdict.details["cosine_mean"]}
                                          if "cosine_mean" in ev.verdict.details else {})}
            # outputs the metric does not judge: lost on the build host or on the deployment ISA, lost
            lost = {**(ev.others_lost or {}), **others_lost(self.others, outs)}
            ev = dataclasses.replace(ev, outputs=out, verdict=chain.decisive, chain=chain, others_lost=lost)
        return dataclasses.replace(ev, isa=record)

    def chain_of(self, out: np.ndarray):
        """The end-to-end chain (and so the decisive verdict) of a bundle whose test-split output is `out`."""
        test = self.prepared.dataset.test
        return chain_for(self.contract, self.prepared, self.original, self.student_vs_original, out,
                         self.contract.judge(self.ref_out, out, test.labels, interval=True, groups=test.groups))

    def on_device(self, folder: Path, built: Built, device: DeviceSpec, build_host: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
        """The built artifact measured on `device` and its outputs there judged by this job's contract: a record
        (its figure is the build host's where the device is the same kind of machine as `build_host`, this one)."""
        from edgebundle.pipeline.evaluate import measure_feeds
        from edgebundle.pipeline.ondevice import Artifact, judge_outputs, record, run_on_device

        recipe, test = self.prepared.recipe, self.prepared.dataset.test
        art = Artifact(folder, tuple(built.files), built.model_file, self.entry.capabilities.runtime,
                       dict(built.runtime), self.spec.threads)
        run = run_on_device(device, art, self.spec.measure, measure_feeds(test, recipe, self.spec.measure.batch),
                            test=test, recipe=recipe)
        verdict = judge_outputs(run, self.contract.output_index, lambda out: self.chain_of(out).decisive)
        note = None if verdict is not None else (f"accuracy not judged on the device: {device.runner} runs its own "
                                                 "inputs, not the test split")
        return record(run, verdict, build_host or fingerprint(), note)

    def _precision_auto(self, tmp: Path, ev: Evaluation) -> tuple[Evaluation, dict | None]:
        """precision auto: int8 within budget that is not faster than fp32 on the same runtime ships fp32."""
        if ev.built.precision != "int8" or ev.latency is None or not ev.same_runtime:
            return ev, None
        int8_ms, fp32_ms = ev.latency.p50_ms, ev.same_runtime["p50_ms"]
        choice = {"asked": "auto", "int8_p50_ms": int8_ms, "fp32_p50_ms": fp32_ms, "shipped": "int8",
                  "int8_within_budget": ev.verdict.within}
        if not ev.verdict.within:
            return ev, choice
        # the two p50s were taken one after the other: on a busy host that decides nothing. The choice rests on
        # int8 and fp32 timed interleaved (alternating rounds), measured until the ratio's interval excludes
        # 1 +- 5 % or a time budget ends: load widens the interval and so lengthens the test, it does not flip it
        d = self._interleaved_decision(tmp, ev.built, ev.isa)
        if ev.isa and ev.isa["judged_on"] == "capped":
            choice["timed_on"] = (f"{ev.isa['deployment']} kernels ({ev.isa['kernel_cap']}) on this "
                                  f"{ev.isa['build_host']} host: the deployment ISA's code, not its CPU")
        choice.update(int8_vs_fp32_interleaved=round(d.ratio, 4), ci95=[round(d.ci95[0], 4), round(d.ci95[1], 4)],
                      rounds=d.rounds, seconds=round(d.seconds, 1), decided=d.outcome, host_state=d.host_state)
        if d.outcome == "undecided":  # ship the smaller artifact, and say why
            choice["undecided_under_load"] = True
        if d.outcome != "slower":
            return ev, choice
        alt = tmp / ".fp32"
        alt.mkdir()
        try:
            ev32, _ = self.build_and_evaluate(alt, self.options.model_copy(update={"precision": "fp32"}),
                                              same_runtime=False)
            if ev32.verdict.within:
                for f in tmp.iterdir():
                    if f != alt:
                        shutil.rmtree(f) if f.is_dir() else f.unlink()
                for f in alt.iterdir():
                    os.replace(f, tmp / f.name)
                ev, choice["shipped"] = ev32, "fp32"
        finally:
            shutil.rmtree(alt, ignore_errors=True)
        return ev, choice


    def _interleaved_decision(self, tmp: Path, built: Built, isa: dict[str, Any] | None = None):
        """int8 against fp32 on the same runtime, timed in alternating rounds until decided: in this process,
        or in a child with the kernels capped at the deployment ISA where the verdict was judged so."""
        from edgebundle.core.measure import Decision, sequential_ratio
        from edgebundle.pipeline.evaluate import measure_feeds

        feeds = measure_feeds(self.prepared.dataset.test, self.prepared.recipe, self.spec.measure.batch)
        fp32 = tmp / built.fp32_file if built.fp32_file else self.prepared.onnx.path("model.fp32.onnx")
        if isa and isa["judged_on"] == "capped":
            from edgebundle.core.isa import cap_env
            from edgebundle.pipeline.emulated import capped_ratio

            d = capped_ratio(self.spec.name, tmp / built.model_file, fp32, built.runtime, self.threads, feeds,
                             cap_env(isa["deployment"]))
            return Decision(**{**d, "ci95": tuple(d["ci95"])})
        open_ = self.target.open
        with open_(tmp / built.model_file, threads=self.threads, runtime=built.runtime) as q, \
                open_(fp32, threads=self.threads, runtime=built.runtime) as f:
            return sequential_ratio(lambda: q.run(feeds), lambda: f.run(feeds))


def _on_isa(ev: Evaluation) -> str:
    """' on avx2 (qemu-x86_64 -cpu Haswell; on this host's avx512-vnni: within budget)' for a verdict drawn
    under an emulator or a kernel cap."""
    i = ev.isa
    if not i or i["judged_on"] not in ("emulated", "capped"):
        return ""
    host = "within budget" if i["on_build_host"]["within_budget"] else "also over budget"
    return f" on {i['deployment']} ({i.get('emulator') or i['kernel_cap']}; on this host's {i['build_host']}: {host})"


def _rejection(spec: TargetSpec, ev: Evaluation) -> str:
    c = ev.chain
    isa = _on_isa(ev)
    v = ev.verdict
    if v.point_within and not v.within:  # the interval decided (metric.confidence)
        isa += (f" (its {v.confidence:.0%} interval's worst end" + (
            f"; {v.resolve_text()})" if v.resolve_with else ")"))
    how = tried(ev.built.quantization) if ev.built.precision == "int8" else f"{ev.built.precision}, nothing quantized"
    if c is not None and not c.generalizes:
        h = c.held_out
        return (f"{spec.name}: {' + '.join(step_name(x) for x in c.steps)}: the student is at {h.line()} against the "
                f"original on data.unlabelled's held-out groups, which no stage saw, and missed the budget there; "
                f"on the test split the bundle is at {verdict_summary(c.decisive)}: the distilled student does not "
                f"generalize beyond the inputs it learned from")
    if c is not None and c.reference == "original" and c.steps:
        return (f"{spec.name}: {ev.verdict.line()}{isa} against the original model missed the budget; "
                f"{c.spent(ev.built.precision)}; tried: {how}")
    vs = " against the fp32 student (metric.reference: student)" if c is not None and c.steps else ""
    return f"{spec.name}: {ev.verdict.line()}{isa}{vs} missed the budget; tried: {how}"


def _io(fp32_path: Path, judged: str, classes: tuple[str, ...] = ()) -> dict[str, list[dict[str, Any]]]:
    """The exported interface every target keeps: names, dtypes and shapes of inputs and outputs; the judged
    output's class names, in score order, where the data named them."""
    import onnx

    m = onnx.load(str(fp32_path), load_external_data=False)
    out = {kind: [{"name": t.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type).name,
                   "shape": [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]} for t in vals]
           for kind, vals in (("inputs", m.graph.input), ("outputs", m.graph.output))}
    for o in out["outputs"]:
        if o["name"] == judged and classes:
            o["classes"] = list(classes)
    return out


def _notes(job: _Job, ev: Evaluation, choice: dict | None) -> list[str]:
    notes = list(ev.built.notes)
    lat, same_rt, v = ev.latency, ev.same_runtime, ev.verdict
    if choice and choice["shipped"] == "fp32":
        where = f" on {choice['timed_on'].split(':')[0]}" if choice.get("timed_on") else ""
        notes.append(f"precision auto: int8 within budget took {choice['int8_vs_fp32_interleaved']:.2f}x the time of "
                     f"fp32 on the same runtime{where} (95 % CI {choice['ci95'][0]:.2f}-{choice['ci95'][1]:.2f}, "
                     f"{choice['rounds']} interleaved rounds); shipped fp32, the faster")
    elif choice and choice.get("undecided_under_load"):
        notes.append(f"precision auto: undecided under load: int8/fp32 {choice['int8_vs_fp32_interleaved']:.2f}x "
                     f"(95 % CI {choice['ci95'][0]:.2f}-{choice['ci95'][1]:.2f}) after {choice['seconds']:.0f} s "
                     f"({contention_text(choice['host_state']) or 'a noisy host'}); shipped int8, the smaller")
    elif lat is not None and same_rt and ev.built.precision == "int8" and lat.p50_ms > same_rt["p50_ms"]:
        notes.append(f"int8 p50 {lat.p50_ms:.4f} ms is slower than fp32 on the same runtime "
                     f"({same_rt['p50_ms']:.4f} ms) on this host; options.precision: fp32 (or auto) ships fp32")
    if not v.within:
        notes.append(f"rejected: {_rejection(job.spec, ev).split(': ', 1)[1]}")
    recipe = job.prepared.recipe
    search = job.prepared.made_by("search")
    if search:
        notes.append(search.metrics["outcome"])
    c = ev.chain
    if c is not None and c.steps and c.reference == "student" and c.student_vs_original is not None:
        s = c.student_vs_original
        notes.append(f"metric.reference: student: the budget judges this bundle against the fp32 student, which is "
                     f"at {verdict_summary(s)} against the original model on the test split"
                     f"{'' if s.within else ', outside the budget against the original'}")
    if lat is not None and lat.host_state and lat.host_state.get("contended"):
        notes.append(f"latency measured under contention ({contention_text(lat.host_state)}): the figure includes "
                     "the other processes' share of the CPU, not the model's alone")
    if v.interval is not None and v.worst_within is False and v.within:
        more = f": {v.resolve_text()}" if v.resolve_with else ""
        notes.append(f"the {v.confidence:.0%} interval of the verdict ({v.interval[0]:.4g} to {v.interval[1]:.4g}) "
                     f"reaches past the budget, so the point estimate alone decided{more} "
                     "(metric.confidence makes the interval decide)")
    if ev.isa and ev.isa["judged_on"] == "host" and ev.isa["deployment"] != ev.isa["build_host"]:
        notes.append(f"int8 {ev.isa['how']}: the verdict holds for {ev.isa['build_host']} CPUs, not shown for "
                     f"{ev.isa['deployment']}")
    notes += _group_notes(job, v)
    unsteered = _find_key(ev.built.quantization, "not_steered") if ev.built.precision == "int8" else None
    if unsteered:
        notes.append(f"int8 not steered on validation inputs: {unsteered} (a validation split with inputs the "
                     "metric judges lets accuracy control and the form choices work)")
    asked = job.spec.calibration.samples or recipe.data.calibration_samples
    got = len(job.prepared.dataset.calibration(recipe.data, asked))
    if ev.built.precision == "int8" and got < asked:
        notes.append(f"calibration used {got} samples, fewer than the {asked} asked for: the "
                     f"{recipe.data.calibration_split} split has only {got}")
    return notes


def _find_key(record: Any, key: str) -> Any:
    """The first value under `key` anywhere in a nested manifest record, or None."""
    if isinstance(record, dict):
        if key in record:
            return record[key]
        record = list(record.values())
    if isinstance(record, list):
        return next((f for f in (_find_key(x, key) for x in record) if f is not None), None)
    return None


def _group_notes(job: _Job, v) -> list[str]:
    """What the verdict's inputs are worth: no groups (inputs that may share a source), or too few groups."""
    ds, kind = job.prepared.dataset, job.prepared.recipe.data.kind
    if ds.grouped is None and kind != "digits":
        return [f"the verdict rests on {v.samples} test inputs treated as independent: where several come from one "
                "source (crops of one photo, frames of one video, sentences of one document) they may not be, the "
                "test split may share sources with training, and the interval is too narrow; give groups "
                "(data.group_by, or 'group' from a data function: docs/recipe.md)"]
    need = job.contract.needed_samples()
    if v.groups is not None and v.groups < need:
        return [f"the verdict rests on {v.groups} independent groups ({ds.grouped}) of {v.samples} inputs; a "
                f"{job.contract.max_drop:g}-point budget needs about {need} to be resolved (a whole group is about "
                f"{100.0 / v.groups:.1f} points): the interval, drawn by group, says how sure it is; more groups "
                "(photos, videos, documents) narrow it"]
    return []


def _manifest(job: _Job, ev: Evaluation, choice: dict | None, reference: dict[str, Any]) -> ManifestDraft:
    """The typed manifest record of one evaluated build (the writer adds the files' hashes and sizes)."""
    prepared, spec, entry, recipe = job.prepared, job.spec, job.entry, job.prepared.recipe
    built, v, lat, same_rt = ev.built, ev.verdict, ev.latency, ev.same_runtime
    caps = entry.capabilities
    quantization = {**built.quantization, **({"precision_choice": choice} if choice else {})}
    same_rt_p50 = same_rt["p50_ms"] if same_rt else None
    return ManifestDraft(
        schema_version=SCHEMA_VERSION,
        edgebundle_version=edgebundle.__version__,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        recipe={"name": recipe.name, "sha256": recipe_digest(recipe),
                "json": recipe.model_dump(mode="json", exclude={"base_dir"})},
        target=TargetInfo(name=spec.name, precision=built.precision,
                          status=built.status if v.within else "rejected", exercised=built.status != "pending",
                          rejection=None if v.within else _rejection(spec, ev),
                          runtime={**built.runtime, **ev.runtime_seen, "threads": job.threads},
                          capabilities={"precisions": list(caps.precisions), "needs_gpu": caps.needs_gpu,
                                        "extra": caps.extra, "runtime": caps.runtime}),
        model_file=built.model_file,
        **_io(prepared.onnx.path("model.fp32.onnx"), job.contract.output_name, prepared.dataset.classes),
        lineage=[a.record() for a in prepared.lineage]
        + [{"stage": job.stage, "config": spec.model_dump(mode="json"), "options": job.options.model_dump(mode="json")}],
        quantization=quantization,
        accuracy=Accuracy(metric=v.metric, output=job.contract.output_name, split="test",
                          samples=len(prepared.dataset.test), judged_samples=v.samples, budget=v.budget,
                          teacher_pytorch=prepared.teacher.metrics.get("test_accuracy"),
                          student_pytorch=prepared.onnx.metrics.get("student_test_accuracy"),
                          fp32_onnx=v.reference, target=v.value, drop_vs_fp32=v.drop, max_drop=v.max_drop,
                          within_budget=v.within, details=v.details,
                          output_cosine_vs_fp32=cosine(ev.outputs, job.ref_out),
                          reference=ev.chain.reference if ev.chain else "student",
                          chain=ev.chain.record() if ev.chain else None, isa=ev.isa,
                          interval=list(v.interval) if v.interval and np.isfinite(v.interval).all() else None,
                          confidence=v.confidence,
                          interval_within_budget=v.worst_within, resolve_with=v.resolve_with,
                          decided_by="interval" if recipe.metric.confidence else "point estimate",
                          groups=v.groups, splits=prepared.dataset.splits,
                          student_vs_teacher=(_metrics(prepared, "distill") or {}).get("student_vs_teacher")),
        latency=None if lat is None else lat.to_dict(),
        reference_latency={**reference, **({f"{caps.runtime}_fp32_student": same_rt} if same_rt else {})},
        speedup=_speedup(lat, reference, same_rt_p50, choice),
        host=fingerprint(),
        notes=_notes(job, ev, choice),
        search=_metrics(prepared, "search"),
    )


def _metrics(prepared: Prepared, stage: str) -> dict[str, Any] | None:
    art = prepared.made_by(stage)
    return None if art is None else art.metrics


def _speedup(lat, reference: dict[str, Any], same_rt_p50: float | None, choice: dict | None) -> dict[str, float | None]:
    """The manifest's speed-ups. `vs_same_runtime_fp32`, the figure to decide on, is int8 against fp32 on the
    same runtime timed in interleaved rounds where precision auto measured it so, else the ratio of the two p50s
    measured one after the other (`vs_same_runtime_fp32_sequential`, always recorded); a 1 where the bundle is
    that fp32 (auto shipped fp32)."""
    sequential = (same_rt_p50 / lat.p50_ms) if same_rt_p50 and lat else None
    interleaved = None
    if choice and choice.get("int8_vs_fp32_interleaved"):
        interleaved = 1.0 if choice["shipped"] == "fp32" else 1 / choice["int8_vs_fp32_interleaved"]
    return {"vs_pytorch_fp32_teacher": None if lat is None else reference["pytorch_fp32_teacher"]["p50_ms"] / lat.p50_ms,
            "vs_same_runtime_fp32": interleaved if interleaved is not None else sequential,
            "vs_same_runtime_fp32_sequential": sequential,
            "vs_same_runtime_fp32_interleaved": interleaved}


def verdict_reference(prepared: Prepared, student: np.ndarray, original: np.ndarray | None) -> np.ndarray:
    """The outputs a bundle's verdict is judged against (and so whose confident inputs it counts): the original
    model's where compression ran and metric.reference is original, else the fp32 student's."""
    if original is not None and prepared.recipe.metric.reference == "original":
        return original
    return student


def _contract(prepared: Prepared, spec: TargetSpec, judged: np.ndarray) -> Contract:
    """The target's contract, checked resolvable on the test split (bad input otherwise)."""
    labels = prepared.dataset.test.labels
    contract = contract_for(prepared.recipe, spec, labels, judged)
    check_resolvable(contract, judged, labels, spec.name)
    held = held_out_outputs(prepared)
    if held is not None:
        check_held_out_resolvable(contract, held["original"], spec.name)
    return contract


def _build_all(prepared: Prepared, specs: list[TargetSpec], output: Path, on_event: Event,
               pack: bool = False, keep_rejected: bool = False, device: DeviceSpec | None = None) -> list[BundleResult]:
    """Every target in turn. A target that fails or misses its budget is that target's result (status
    'failed' or 'rejected' with one line); the others go on. Bad input (RecipeError, DataError) stops all."""
    results = []
    refs: dict[tuple, dict] = {}
    fp32_test = fp32_reference(prepared)
    original = original_reference(prepared)
    judged = verdict_reference(prepared, fp32_test[prepared.recipe.judged_output[0]], original)
    # bad input before any target builds: the metric, its function, enough judged inputs
    contracts = {spec.name: _contract(prepared, spec, judged) for spec in specs}
    for spec in specs:
        threads = spec.threads or usable_cores()
        k = (threads, spec.measure.model_dump_json())
        try:
            if k not in refs:
                on_event("start", "reference", cached=False)
                refs[k] = reference_latency(prepared, spec.measure, threads)
                on_event("done", "reference", cached=False)
            res = build_target(prepared, spec, output, on_event=on_event, reference=refs[k], fp32_test=fp32_test,
                               contract=contracts[spec.name], keep_rejected=keep_rejected, original=original,
                               device=device)
        except (RecipeError, DataError, BundleError, DeviceError):
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
    registry.check_targets(recipe)
    stage_registry.check_stages(recipe)
    check_output_folder(output)
    selected = [recipe.target(t) for t in targets] if targets else list(recipe.targets)
    for spec in selected:
        _preflight(spec, recipe)
    check_bundle_places(output, [s.name for s in selected])
    return selected


def build(work: Path, *, targets: list[str] | None = None, output: Path | None = None,
          recipe: Recipe | None = None, on_event: Event = _noop, pack: bool = False,
          keep_rejected: bool = False, device: DeviceSpec | None = None) -> list[BundleResult]:
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
        return _build_all(prepared, selected, output, on_event, pack, keep_rejected, device)


