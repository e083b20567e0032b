"""Judging and timing a built artifact: the fp32 reference outputs, the recipe's accuracy contract bound to
a target's budget, the artifact's outputs and verdict on the test split, and its latency (with the same
runtime's fp32 latency and the PyTorch references) through the one measurement protocol."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgebundle.core import measure as measure_mod
from edgebundle.core.data import Split, iter_feeds, run_outputs
from edgebundle.core.errors import DataError, EdgeBundleError, RecipeError, StageError
from edgebundle.core.host import usable_cores
from edgebundle.core.metrics import Contract, Verdict, other_outputs_lost, resolve_name
from edgebundle.core.modelio import import_object
from edgebundle.core.recipe import MeasureSpec, Recipe, TargetSpec
from edgebundle.core.session import OrtSession
from edgebundle.pipeline.records import Prepared
from edgebundle.stages.distill import HELD_OUT_FILE
from edgebundle.targets.base import BuildContext, Built


def measure_feeds(split: Split, recipe: Recipe, batch: int) -> dict[str, np.ndarray]:
    return next(iter_feeds(split.head(max(batch, 1)), recipe.inputs, batch))


def torch_latency(model: nn.Module, feeds: dict[str, np.ndarray], names: list[str], spec: MeasureSpec,
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


def brief(s: measure_mod.LatencyStats) -> dict[str, Any]:
    d = s.to_dict()
    d.pop("samples_ms")
    return d


def reference_latency(prepared: Prepared, spec: MeasureSpec, threads: int) -> dict[str, Any]:
    """PyTorch fp32 eager, teacher and student: same protocol, same inputs, same threads as the targets."""
    recipe = prepared.recipe
    feeds = measure_feeds(prepared.dataset.test, recipe, spec.batch)
    names = prepared.input_names
    return {
        "pytorch_fp32_teacher": brief(torch_latency(prepared.load_teacher(), feeds, names, spec, threads)),
        "pytorch_fp32_student": brief(torch_latency(prepared.load_student(), feeds, names, spec, threads)),
    }


def latency(sess, feeds, spec: MeasureSpec, threads: int) -> measure_mod.LatencyStats:
    """The shared wall-clock protocol, or the device's own clock where the session has one (CUDA events)."""
    if "gpu_timing" in sess.features:
        samples = sess.gpu_samples_ms(feeds, warmup=spec.warmup_min * 10, iterations=spec.iterations)
        return measure_mod.summarize(np.array(samples), batch=spec.batch, threads=threads,
                                     warmup=spec.warmup_min * 10)
    return measure_mod.measure(lambda: sess.run(feeds), spec, threads=threads)


def fp32_reference(prepared: Prepared, threads: int | None = None) -> list[np.ndarray]:
    """Every output of the fp32 ONNX model on the test split: what each bundle is judged against."""
    with OrtSession(prepared.onnx.path("model.fp32.onnx"), threads=threads or usable_cores()) as sess:
        return run_outputs(sess, prepared.dataset.test, prepared.recipe.inputs)


def _changes_model(stage: str) -> bool:
    """Whether a stage makes a new model from the one the user brought (every model stage but the original's)."""
    from edgebundle.stages import registry as stage_registry

    s = stage_registry.get(stage)
    return s is not None and s.makes_model and s.role != "original"


def step_name(stage: str) -> str:
    """What the stage did, as its declaration says ('pruning'), else its name."""
    from edgebundle.stages import registry as stage_registry

    return getattr(stage_registry.get(stage), "compresses", None) or stage


def compressed_by(prepared: Prepared) -> list[str]:
    """The stages that changed the model the user brought (prune, distill, cluster, ...), in the order they ran."""
    return [a.stage for a in prepared.lineage if _changes_model(a.stage)]


def original_reference(prepared: Prepared) -> np.ndarray | None:
    """The original model's (the teacher's) judged output on the test split, in PyTorch fp32: what every
    bundle is judged against end to end. None when no compression stage ran: the student is the original
    and its fp32 export the reference."""
    if not compressed_by(prepared):
        return None
    return judged_output(prepared.load_teacher(), prepared.dataset.test, prepared.recipe)


def judged_output(model: nn.Module, split: Split, recipe: Recipe) -> np.ndarray:
    """A PyTorch model's output the recipe's metric judges, on every input of `split`, in fp32."""
    idx = recipe.judged_output[0]
    model = model.cpu().eval()
    outs = []
    with torch.inference_mode():
        for feeds in iter_feeds(split, recipe.inputs, 64):
            y = model(*[torch.from_numpy(np.ascontiguousarray(feeds[s.name])) for s in recipe.inputs])
            y = y[idx] if isinstance(y, (tuple, list)) else y
            outs.append(y.float().numpy())
    return np.concatenate(outs)


def verdict_summary(v: Verdict) -> str:
    """A verdict's value in a few words: 'cosine mean 0.8500 / min 0.6310', 'top1 97.20 %'."""
    if v.metric == "cosine":
        return f"cosine mean {v.details.get('cosine_mean', float('nan')):.4f} / min {v.value:.4f}"
    if v.metric in ("top1", "agreement"):
        return f"{v.metric} {v.value:.2f} %" + (f" (original {v.reference:.2f} %)" if v.metric == "top1" else "")
    if v.metric == "snr":
        return f"SNR {v.value:.1f} dB"
    return f"{v.metric} {v.value:.6g}"


def _more(student: Verdict, bundle: Verdict) -> str:
    """What the last step (int8, fp16...) spent on top of the student, in the metric's units."""
    if student.metric == "cosine":
        dm = student.details.get("cosine_mean", 0.0) - bundle.details.get("cosine_mean", 0.0)
        return f"cosine mean {dm:.4f} / min {student.value - bundle.value:.4f} more"
    if student.drop is not None and bundle.drop is not None:
        unit = "points" if student.metric in ("top1", "agreement") else "more in the function's units"
        return f"{bundle.drop - student.drop:.2f} {unit}" + (" more" if unit == "points" else "")
    if student.metric == "snr":
        return f"{student.value - bundle.value:.1f} dB more"
    return f"{bundle.value - student.value:.3g} more"


@dataclass(frozen=True)
class Chain:
    """original -> student fp32 -> bundle, each step judged by the recipe's contract."""

    reference: str  # "original" or "student": which the decisive verdict is against
    steps: list[str]  # the compression stages that ran ([] : the student is the original)
    student_vs_original: Verdict | None
    bundle_vs_original: Verdict | None
    bundle_vs_student: Verdict
    held_out: Verdict | None = None  # the distilled student against the original on data.unlabelled's held-out groups

    @property
    def decisive(self) -> Verdict:
        """The bundle's verdict; one that held on the test split is still over budget when the distilled student
        missed the budget on the held-out groups no stage saw (it does not generalize)."""
        v = self.bundle_vs_original if self.reference == "original" and self.bundle_vs_original else \
            self.bundle_vs_student
        if self.held_out is not None and not self.held_out.within and v.within:
            return replace(v, within=False)
        return v

    @property
    def generalizes(self) -> bool:
        return self.held_out is None or self.held_out.within

    def spent(self, precision: str) -> str:
        """Which step spent the budget: 'pruning + distillation: cosine mean 0.8500 / min 0.6310 vs original
        (over budget alone); int8: cosine mean 0.0040 / min 0.0100 more'."""
        s, b = self.student_vs_original, self.bundle_vs_original
        if s is None or b is None:
            return ""
        over = " (over budget alone)" if not s.within else ""
        return (f"{' + '.join(step_name(x) for x in self.steps)}: {verdict_summary(s)} vs original{over}; "
                f"{precision}: {_more(s, b)}")

    def record(self) -> list[dict[str, Any]]:
        """The manifest's chain: each step with its metric against the original (and the bundle's against the
        fp32 student)."""
        def row(v: Verdict | None) -> dict[str, Any] | None:
            if v is None:
                return None
            return {"value": v.value, "reference_value": v.reference, "drop": v.drop, "within_budget": v.within,
                    "samples": v.samples, **{k: v.details[k] for k in ("cosine_mean", "agreement_all")
                                             if k in v.details}}
        out: list[dict[str, Any]] = [{"step": "original", "model": "teacher, PyTorch fp32"}]
        if self.steps:
            out.append({"step": "student fp32", "by": self.steps, "model": "student, fp32 ONNX",
                        "vs_original": row(self.student_vs_original)})
        if self.held_out is not None:
            out[-1]["held_out_vs_original"] = {**row(self.held_out), "groups": self.held_out.groups}
        out.append({"step": "bundle", "vs_original": row(self.bundle_vs_original) if self.steps
                    else row(self.bundle_vs_student), "vs_student_fp32": row(self.bundle_vs_student)})
        return out


def chain_for(contract: Contract, prepared: Prepared, original: np.ndarray | None, student_vs_original: Verdict | None,
              bundle: np.ndarray, bundle_vs_student: Verdict) -> Chain:
    """The bundle judged end to end: against the original model where a compression stage ran.
    `student_vs_original` is the fp32 student's verdict against the original (the same for every build of a
    job: computed once by the caller)."""
    if original is None:
        return Chain("original", [], None, None, bundle_vs_student)
    test = prepared.dataset.test
    return Chain(prepared.recipe.metric.reference, compressed_by(prepared), student_vs_original,
                 contract.judge(original, bundle, test.labels, interval=True, groups=test.groups), bundle_vs_student,
                 held_out=held_out_verdict(prepared, contract))


def held_out_verdict(prepared: Prepared, contract: Contract) -> Verdict | None:
    """The distilled student against the original on data.unlabelled's held-out groups (saved by `distill`),
    by the target's contract (top1 there is top-1 agreement: those inputs have no labels); None without them."""
    d = held_out_outputs(prepared)
    if d is None:
        return None
    return held_out_contract(contract).judge(d["original"], d["student"], None, interval=True, groups=d["groups"])


def held_out_outputs(prepared: Prepared) -> dict[str, np.ndarray] | None:
    """`distill`'s saved outputs on data.unlabelled's held-out groups (student, original, groups), or None."""
    art = prepared.made_by("distill")
    if art is None or not art.path(HELD_OUT_FILE).is_file():
        return None
    path = art.path(HELD_OUT_FILE)
    return _read_held_out(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_held_out(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
    """The archive read whole, once per build (each target's contract check and chain ask for it)."""
    with np.load(path) as z:  # read whole: the archive is not left open
        return {k: z[k] for k in z.files}


def held_out_contract(contract: Contract) -> Contract:
    """The contract on data.unlabelled's held-out groups: top1 there is top-1 agreement (no labels)."""
    if contract.metric == "top1":
        return replace(contract, metric="agreement", spec=contract.spec.model_copy(update={"name": "agreement"}))
    return contract


def contract_for(recipe: Recipe, spec: TargetSpec, labels: np.ndarray | None, judged: np.ndarray) -> Contract:
    """The recipe's metric bound to this target's budget; `judged` is the fp32 judged output (for `auto`)."""
    idx, name = recipe.judged_output
    metric = resolve_name(recipe.metric, has_labels=labels is not None, output_name=name,
                          output_shape=tuple(judged.shape))
    if metric == "top1" and labels is None:
        raise RecipeError("metric top1 needs labels and the data has none; use metric agreement (classifiers) "
                          "or cosine")
    fn = (import_object(recipe.metric.name, base_dir=recipe.base_dir, what="metric",
                        timeout_s=recipe.limits.user_code_s) if recipe.metric.is_function else None)
    return Contract(metric, recipe.metric, spec.max_accuracy_drop, idx, name, fn, recipe.limits.user_code_s)


def check_resolvable(contract: Contract, reference: np.ndarray, labels: np.ndarray | None, target: str,
                     where: str = "the test split", more: str = "give more data") -> None:
    """A points budget needs enough judged inputs that one changed input does not decide it alone."""
    v = contract.judge(reference, reference, labels)
    need = contract.needed_samples()
    if v.samples < need:
        what = (f"inputs where the fp32 model is confident (top-1 probability >= {contract.spec.min_confidence:g})"
                if contract.metric == "agreement" else "inputs")
        raise DataError(f"target '{target}': {where} has {v.samples} {what}; a {contract.max_drop:g}-point "
                        f"{contract.metric} budget needs at least {need} (one changed input would be "
                        f"{100.0 / max(v.samples, 1):.1f} points): {more} or raise max_accuracy_drop")


def check_held_out_resolvable(contract: Contract, original: np.ndarray, target: str) -> None:
    """data.unlabelled's held-out groups gate the student by the target's budget: they too need enough judged
    inputs (else one flip there would reject any student)."""
    check_resolvable(held_out_contract(contract), original, None, target, where="data.unlabelled's held-out share",
                     more="give more unlabelled inputs, hold out a larger share (data.unlabelled.held_out)")


@dataclass
class Evaluation:
    built: Built
    outputs: np.ndarray | None  # the judged output on the test split
    verdict: Verdict
    latency: measure_mod.LatencyStats | None
    same_runtime: dict[str, Any] | None  # the same runtime's fp32 latency, where it can run it
    runtime_seen: dict[str, Any]
    chain: Chain | None = None  # original -> student fp32 -> bundle (the verdict is its decisive step)
    isa: dict[str, Any] | None = None  # x86 CPU targets: the deployment ISA and how the verdict was reached on it
    others_lost: dict[str, Any] | None = None  # outputs the metric does not judge that lost features against fp32


def target_build(target, ctx: BuildContext, stage: str, prepared: Prepared) -> Built:
    try:
        return target.build(ctx)
    except (DataError, RecipeError):
        raise
    except EdgeBundleError as e:
        raise StageError(f"{stage} failed (after {', '.join(a.stage for a in prepared.lineage)}): {e}") from e


def evaluate(target, entry, built: Built, tmp: Path, prepared: Prepared, spec: TargetSpec, contract: Contract,
              reference_out: np.ndarray, threads: int, *, same_runtime: bool = True,
              others: dict[str, tuple[int, np.ndarray]] | None = None) -> Evaluation:
    """The artifact's judged output on the test split, its verdict and its latency (and the same runtime's
    fp32 latency, for "vs fp32 on the same runtime"). `others`: the outputs the metric does not judge (name:
    (index, fp32 outputs on the test split)), checked for lost features (`Evaluation.others_lost`)."""
    recipe, ds = prepared.recipe, prepared.dataset
    feeds = measure_feeds(ds.test, recipe, spec.measure.batch)
    same_rt, lat, runtime_seen = None, None, {}
    if built.status == "pending":  # the runtime's artifact is not built here: accuracy through ORT CPU, no latency
        with target.open(tmp / (built.eval_file or built.model_file), threads=threads, runtime=built.runtime) as sess:
            outs = run_outputs(sess, ds.test, recipe.inputs)
    else:
        if same_runtime and built.precision != "fp32" and (built.fp32_file or entry.capabilities.opens_onnx):
            fp32 = tmp / built.fp32_file if built.fp32_file else prepared.onnx.path("model.fp32.onnx")
            with target.open(fp32, threads=threads, runtime=built.runtime) as s32:
                same_rt = brief(measure_mod.measure(lambda: s32.run(feeds), spec.measure, threads=threads))
        with target.open(tmp / built.model_file, threads=threads, runtime=built.runtime) as sess:
            outs = run_outputs(sess, ds.test, recipe.inputs)
            lat = latency(sess, feeds, spec.measure, threads)
            runtime_seen = ({"inference_precision": sess.inference_precision}
                            if "inference_precision" in sess.features else {})
    if len(outs) <= contract.output_index:
        raise StageError(f"build:{spec.name}: the artifact has {len(outs)} output(s); the metric judges output "
                         f"'{contract.output_name}' (number {contract.output_index + 1})")
    out = outs[contract.output_index]
    verdict = contract.judge(reference_out, out, ds.test.labels, interval=True, groups=ds.test.groups)
    return Evaluation(built, out, verdict, lat, same_rt, runtime_seen, others_lost=others_lost(others, outs))


def others_lost(others: dict[str, tuple[int, np.ndarray]] | None, outs: list[np.ndarray]) -> dict[str, Any]:
    """The outputs the metric does not judge (name: (index, fp32 outputs)) that lost features in `outs`."""
    return other_outputs_lost({k: (ref, outs[i]) for k, (i, ref) in (others or {}).items() if i < len(outs)})


def tried(quant: dict[str, Any]) -> str:
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
    for a in quant.get("activations_tried_on_val") or []:  # executorch: post-training int8, then QAT
        what = f"QAT static int8, {quant['qat']['epochs']} epochs" if a.get("qat") else f"{a['activations']} int8"
        parts.append(f"{what} (val {a['val_value']:.4g})")
    return "; ".join(parts) if parts else "int8 with the target's settings"


