"""OpenVINO CPU target: `openvino.convert_model` + NNCF post-training int8, saved as IR (.xml/.bin).

Accuracy budget: the int8 model is judged by the recipe's metric (core.metrics) on the validation split
against the fp32 model run in f32 (the test split stays unseen).

Transformers first try int8 weights with dynamic int8 activations (`activations: auto`): NNCF's
`compress_weights` stores every MatMul's weights int8 per output channel, and the CPU plugin quantizes
each MatMul's input per inference, per group of `dynamic_group_size` input channels. No calibration, a
build in seconds; on all-MiniLM-L6-v2 it kept cosine min 0.997 (group 128) at about 2x OpenVINO's fp32,
where static int8 with accuracy control stopped at 0.987. Groups 128, 64, 32 are judged on the validation
split and the first within budget is kept (larger groups run faster). Static int8 is tried next: over
budget, it escalates as below; within budget too, both are timed interleaved and the faster ships (on a
small encoder static int8 was 1.45x faster than dynamic; on MiniLM static missed the budget).

Static int8 (CNNs, or transformers where dynamic missed): over the budget, the build escalates,
one step at a time: `nncf.quantize` with the target's settings -> full bias correction (when fast was asked for;
fast bias correction cost 1.7 points on the embedded default, full kept 0, so full is the default here)
-> `nncf.quantize_with_accuracy_control`, which keeps the most harmful layers in
floating point. `accuracy_control: true` goes straight to the last step. Every attempt, the drop
reached and the layers left in higher precision are recorded in the manifest.

Transformers (`model_type: auto` finds attention: ScaledDotProductAttention or a MatMul of two
activations) are quantized with NNCF's transformer model type; SmoothQuant (NNCF's MatMul alpha, 0.95 by default) is applied where it helps:
`smooth_quant: auto` quantizes with alpha 0.95 and 0.8 and without, and keeps the one closest to fp32 on the
validation split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgebundle.core.data import iter_feeds
from edgebundle.core.isa import ISA, deployment, has_vnni
from edgebundle.core.session import SessionBase
from edgebundle.core.errors import StageError, TargetUnavailable
from edgebundle.targets.base import BuildContext, Built, TargetBase, Work
from edgebundle.targets.registry import Capabilities, register_target

QUANTIZABLE = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


class IgnoredScopeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN/inf (recipe rule)

    names: list[str] = Field(default_factory=list)
    types: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)


class OpenVinoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN/inf (recipe rule)

    precision: Literal["auto", "int8", "fp32"] = "auto"  # auto: int8 unless fp32 is faster here (the runner measures both)
    device: str = "CPU"
    preset: Literal["performance", "mixed"] = "performance"
    subset_size: int = Field(300, ge=1)
    # NNCF's default is True (faster build). Measured on the embedded default: fast bias correction lost
    # 1.67 top-1 points on the test split, full bias correction lost 0 (bench/, README). Accuracy first.
    fast_bias_correction: bool = False
    model_type: Literal["auto", "transformer"] | None = "auto"  # auto: transformer where attention is found
    smooth_quant: Literal["auto", "on", "off"] | float = Field(
        "auto", description="transformers only: auto tries NNCF's SmoothQuant and none, keeps the closer; "
                            "a number is the MatMul alpha")
    ignored_scope: IgnoredScopeSpec = IgnoredScopeSpec()
    activations: Literal["auto", "static", "dynamic"] = Field("auto", description=(
        "static: calibrated int8 activations (nncf.quantize); dynamic: int8 weights (nncf.compress_weights) "
        "and the CPU plugin's per-inference int8 activations in MatMuls (fully-connected layers only); auto: "
        "transformers try dynamic, then static; other models static"))
    dynamic_group_size: Literal["auto"] | int = Field("auto", description=(
        "dynamic activations: input channels per quantization group (the CPU plugin's "
        "DYNAMIC_QUANTIZATION_GROUP_SIZE); auto tries 128, 64, 32 on the validation split, keeps the first "
        "within budget"))
    isa: ISA = Field("host", description=(
        "the x86 instruction set the bundle will run on (host | avx2 | avx512 | avx512-vnni): without VNNI, "
        "NNCF's overflow_fix is enabled for every layer (7-bit weights against 16-bit saturation) and the "
        "bundle is judged on that ISA: natively, or where the host has more with oneDNN's kernels capped at it "
        "(ONEDNN_MAX_CPU_ISA: the same outputs as qemu-x86_64 -cpu Haswell for AVX2, at native speed), and "
        "precision auto times int8 against fp32 under the same cap"))
    overflow_fix: Literal["auto", "enable", "first_layer", "disable"] = Field("auto", description=(
        "NNCF's overflow fix (7-bit weights): auto enables it for every layer where the deployment ISA has no "
        "VNNI and leaves NNCF's default (first_layer) elsewhere"))
    accuracy_control: bool = False
    accuracy_control_iterations: int = Field(12, ge=1, le=1000, description=(
        "NNCF accuracy control reverts layers to float one ranking at a time; its own default never stops "
        "(on all-MiniLM-L6-v2 it was still going after 40 minutes). Each iteration re-validates the model"))
    fallback: bool = Field(True, description="escalate when the validation drop exceeds the budget")
    performance_hint: Literal["latency", "throughput"] = "latency"
    inference_precision: Literal["f32", "bf16"] = Field("f32", description=(
        "what the CPU plugin runs layers left in float in: f32 (default; the CPU plugin's own default is bf16 "
        "on CPUs with avx512_bf16/AMX, which alone flipped 6 % of real photo crops on EfficientNet-Lite), or "
        "bf16, held to the same budget"))


def _ov():
    try:
        import openvino as ov
    except ImportError as e:
        raise TargetUnavailable("openvino is not installed: pip install openvino nncf") from e
    return ov


def _device_problem(core, device: str) -> str | None:
    """None when `device` (e.g. CPU, GPU.0) is among the core's devices, else a message listing them."""
    available = core.available_devices
    if device.split(".")[0] in {d.split(".")[0] for d in available}:
        return None
    return f"OpenVINO device '{device}' is not available; available devices: {', '.join(available)}"


F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # references run in fp32, whatever the CPU's bf16 support


DYNAMIC_GROUP = "DYNAMIC_QUANTIZATION_GROUP_SIZE"


def _val_outputs(ov, model, split, specs, index: int = 0, precision: str = "f32",
                 config: dict[str, Any] | None = None) -> np.ndarray:
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision, **(config or {})})
    return np.concatenate([compiled(f)[index] for f in iter_feeds(split, specs, 64)])


def _budget_record(ctx: BuildContext, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's accuracy-budget record: the contract, and every attempt on the validation split."""
    contract = ctx.val_contract()
    return {"metric": contract.metric, "split": "val", "budget": contract.budget,
            "max_drop": ctx.spec.max_accuracy_drop, "within_budget": attempts[-1]["within_budget"],
            "attempts": attempts}


def _race(ov, candidates: list, ctx: BuildContext, opt: OpenVinoOptions) -> tuple[float, float]:
    """Batch-1 p50 (ms) of two (model, extra config) candidates, timed interleaved (core.measure)."""
    from edgebundle.core.measure import interleaved_ratio

    feeds = next(iter_feeds(ctx.validation.head(1), ctx.recipe.inputs, 1))
    base = {"INFERENCE_PRECISION_HINT": opt.inference_precision, "INFERENCE_NUM_THREADS": ctx.threads,
            "PERFORMANCE_HINT": "LATENCY"}
    core = ov.Core()
    # the compiled models stay referenced while their requests run, and the requests go first (as OvSession
    # closes): a request outliving its compiled model is a use-after-free in the native runtime
    compiled = [core.compile_model(m, "CPU", {**base, **cfg}) for m, cfg in candidates]
    requests = [c.create_infer_request() for c in compiled]
    try:
        _, _, a, b = interleaved_ratio(lambda: requests[0].infer(feeds), lambda: requests[1].infer(feeds),
                                       rounds=7, per_round=10)
    finally:
        requests.clear()
        compiled.clear()
    return a, b


def attention_ops(model) -> int:
    """Attention in an OpenVINO model: ScaledDotProductAttention ops (the ONNX frontend fuses the pattern)
    and MatMuls whose two inputs are both activations (Q.K^T, softmax.V). CNNs and MLPs have none."""
    def constant(v) -> bool:
        node = v.get_node()
        while node.get_type_name() in ("Convert", "Reshape", "Transpose"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return sum(1 for op in model.get_ordered_ops()
               if op.get_type_name() == "ScaledDotProductAttention"
               or (op.get_type_name() == "MatMul" and not any(constant(op.input_value(i)) for i in range(2))))


def range_estimator(cal):
    """The recipe's calibration method in NNCF terms: (AdvancedQuantizationParameters or None, description).
    minmax keeps NNCF's own defaults; percentile is NNCF's QUANTILE statistic; NNCF has no KL-entropy
    calibration, so entropy maps to its HISTOGRAM aggregator (a histogram search for the range that
    minimises quantization error, as torch's HistogramObserver)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import (AggregatorType, RangeEstimatorParameters,
                                                   RangeEstimatorParametersSet, StatisticsCollectorParameters,
                                                   StatisticsType)

    if cal.method == "minmax":
        return None, "NNCF defaults (min/max ranges) + bias correction"
    if cal.method == "percentile":
        q = StatisticsCollectorParameters(statistics_type=StatisticsType.QUANTILE, aggregator_type=AggregatorType.MEAN,
                                          quantile_outlier_prob=(100.0 - cal.percentile) / 100.0)
        est = RangeEstimatorParameters(min=q, max=q)
        desc = f"QUANTILE statistic at {cal.percentile} % (mean over samples) + bias correction"
    else:
        est = RangeEstimatorParametersSet.HISTOGRAM
        desc = "HISTOGRAM aggregator (quantization-error-minimising range; NNCF has no KL entropy) + bias correction"
    return AdvancedQuantizationParameters(activations_range_estimator_params=est), desc


def _nncf_controllable(contract) -> bool:
    """Metrics NNCF's accuracy control can steer: one number, higher is better, a budget as an absolute drop."""
    return contract.metric in ("top1", "agreement", "cosine") or contract.spec.is_function


def fp_layers(model) -> list[str]:
    """Quantizable operations (conv/matmul) whose activation input has no FakeQuantize: left in fp."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in QUANTIZABLE:
            continue
        src = op.input_value(0).get_node()
        while src.get_type_name() in ("Convert", "Reshape"):
            src = src.input_value(0).get_node()
        if src.get_type_name() != "FakeQuantize":
            out.append(op.get_friendly_name())
    return out


@register_target("openvino", capabilities=Capabilities(precisions=("int8", "fp32"), runtime="openvino",
                                                        opens_onnx=True, isa_cap="onednn"), options=OpenVinoOptions)
class OpenVinoTarget(TargetBase):
    def unavailable_reason(self, options: OpenVinoOptions | None = None) -> str | None:
        try:
            import nncf  # noqa: F401
            import openvino as ov
        except ImportError as e:
            return f"{e.name} is not installed (pip install openvino nncf)"
        return _device_problem(ov.Core(), (options or OpenVinoOptions()).device)

    def pending_reason(self, options: OpenVinoOptions | None = None) -> str | None:
        return None  # builds and times its own artifact on this machine

    def start(self, ctx: BuildContext, opt: OpenVinoOptions) -> Work:
        work = Work(opt, {"device": opt.device, "performance_hint": opt.performance_hint, "threads": ctx.threads,
                          "inference_precision_hint": opt.inference_precision})
        try:
            work.state["model"] = _ov().convert_model(str(ctx.fp32_onnx))
        except Exception as e:  # OpenVINO's frontends raise their own error types
            raise StageError(f"openvino.convert_model failed: {' '.join(str(e).split())[:300]}") from e
        return work

    def fp32(self, ctx: BuildContext, work: Work) -> Built:
        return self._save(_ov(), work.state["model"], ctx, work.opt, {}, work.runtime, [])

    def int8(self, ctx: BuildContext, work: Work) -> Built:
        """Dynamic activations first where asked (transformers), then static int8 escalating on val; when both
        hold the budget the faster ships."""
        import nncf

        ov, opt, model = _ov(), work.opt, work.state["model"]
        quant: dict[str, Any] = {}
        notes: list[str] = []
        kwargs, calibration, samples, cal_desc, transformer = self._settings(nncf, model, ctx, opt, quant)
        contract = ctx.val_contract()
        # the fp32 outputs on val (in f32), once: the dynamic and SmoothQuant choices and every verdict use them
        fp32_out = _val_outputs(ov, model, ctx.validation, ctx.recipe.inputs, contract.output_index)
        dynamic = None  # (model, group, record): dynamic int8 within budget, which static may still beat
        if opt.activations == "dynamic" or (opt.activations == "auto" and transformer):
            dyn_model, group, dyn = self._dynamic(nncf, model, ctx, opt, fp32_out)
            if opt.activations == "dynamic":
                return self._save(ov, dyn_model, ctx, opt, {**quant, **dyn},
                                  {**work.runtime, DYNAMIC_GROUP.lower(): group}, notes)
            if dyn["accuracy_budget"]["within_budget"]:
                dynamic = (dyn_model, group, dyn)
            else:
                quant["dynamic_over_budget"] = dyn
                notes.append(f"int8 weights with dynamic activations missed the budget on the validation "
                             f"split (group {group}: {contract.metric} "
                             f"{dyn['accuracy_budget']['attempts'][-1]['value']}); static int8 tried next")
        try:
            quantized, attempts = self._static(nncf, model, calibration, kwargs, transformer, dynamic is None,
                                               ctx, opt, fp32_out, quant, notes)
        except (nncf.ValidationError, nncf.InternalError, RuntimeError, ValueError) as e:
            raise StageError(f"NNCF quantization failed: {type(e).__name__}: {e}") from e
        if dynamic is not None and self._dynamic_faster(ov, dynamic, quantized, attempts, ctx, opt, quant, notes):
            return self._save(ov, dynamic[0], ctx, opt, {**quant, **dynamic[2]},
                              {**work.runtime, DYNAMIC_GROUP.lower(): dynamic[1]}, notes)
        final = attempts[-1]["step"]
        kwargs["fast_bias_correction"] = kwargs["fast_bias_correction"] and final == "defaults"
        quant["accuracy_budget"] = _budget_record(ctx, attempts)
        if len(attempts) > 1:
            notes.append(f"int8 with the first settings dropped {attempts[0]['val_drop']} points on the validation "
                         f"split (budget {ctx.spec.max_accuracy_drop}); kept the '{final}' build")
        quant.update({
            "tool": "nncf.quantize_with_accuracy_control" if final == "accuracy_control" else "nncf.quantize",
            "preset": opt.preset, "subset_size": kwargs["subset_size"],
            "fast_bias_correction": kwargs["fast_bias_correction"],
            "model_type": "transformer" if transformer else None,
            "ignored_scope": opt.ignored_scope.model_dump(),
            "layers_in_higher_precision": fp_layers(quantized),
            "calibration": {"method": ctx.spec.calibration.method, "nncf": cal_desc, "samples": samples},
        })
        return self._save(ov, quantized, ctx, opt, quant, work.runtime, notes)

    @staticmethod
    def _settings(nncf, model, ctx: BuildContext, opt: OpenVinoOptions, quant: dict[str, Any]):
        """nncf.quantize's keyword arguments from the options, the calibration dataset, and whether the model is
        a transformer: (kwargs, dataset, samples, calibration description, transformer)."""
        cal_items = list(iter_feeds(ctx.calibration, ctx.recipe.inputs, 1))
        transformer = opt.model_type == "transformer" or (opt.model_type == "auto" and attention_ops(model) > 0)
        estimator, cal_desc = range_estimator(ctx.spec.calibration)
        fix = opt.overflow_fix
        if fix == "auto" and not has_vnni(deployment(opt.isa)):
            # without VNNI, u8 x s8 pairs saturate in 16 bits: NNCF's overflow fix (7-bit weights) on every
            # layer, not only the first (its default)
            fix = "enable"
            quant["overflow_fix"] = f"enable (deployment ISA {deployment(opt.isa)} has no VNNI)"
        if fix != "auto":
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

            estimator = estimator or AdvancedQuantizationParameters()
            estimator.overflow_fix = OverflowFix({"first_layer": "first_layer_only"}.get(fix, fix))
            quant.setdefault("overflow_fix", fix)
        scope = opt.ignored_scope
        kwargs = dict(
            advanced_parameters=estimator,
            preset=nncf.QuantizationPreset(opt.preset), subset_size=min(opt.subset_size, len(cal_items)),
            fast_bias_correction=opt.fast_bias_correction,
            model_type=nncf.ModelType.TRANSFORMER if transformer else None,
            ignored_scope=nncf.IgnoredScope(names=scope.names, types=scope.types, patterns=scope.patterns)
            if any(scope.model_dump().values()) else None,
        )
        return kwargs, nncf.Dataset(cal_items), len(cal_items), cal_desc, transformer

    def _static(self, nncf, model, calibration, kwargs: dict, transformer: bool, escalate: bool,
                ctx: BuildContext, opt: OpenVinoOptions, fp32_out: np.ndarray, quant: dict, notes: list):
        """Static int8, one step at a time until the budget holds on val: the target's settings -> full bias
        correction -> NNCF accuracy control (`accuracy_control: true` goes straight there). `escalate`: False
        when dynamic int8 already holds the budget (one plain try then). Returns (last model, attempts)."""
        contract, val = ctx.val_contract(), ctx.validation
        first = None  # a quantized model already made with the final kwargs (SmoothQuant choice)
        if transformer:
            first, quant["smooth_quant"] = self._smooth_quant(nncf, model, calibration, kwargs, opt, ctx, fp32_out)
        steps = ["accuracy_control"] if opt.accuracy_control and escalate else ["defaults"]
        if opt.fallback and not opt.accuracy_control and escalate:
            steps += (["full_bias_correction"] if opt.fast_bias_correction else []) + ["accuracy_control"]
        if "accuracy_control" in steps and not _nncf_controllable(contract):
            notes.append(f"NNCF accuracy control cannot steer metric '{contract.metric}'; not tried")
            steps = [s for s in steps if s != "accuracy_control"] or ["defaults"]
        attempts: list[dict[str, Any]] = []
        for step in steps:
            if step == "accuracy_control":
                quantized = self._quantize_ac(nncf, model.clone(), calibration, val, ctx, kwargs, contract, fp32_out)
            elif step == "defaults" and first is not None:
                quantized = first
            else:
                fbc = kwargs["fast_bias_correction"] and step == "defaults"
                quantized = nncf.quantize(model.clone(), calibration, **{**kwargs, "fast_bias_correction": fbc})
            v = contract.judge(fp32_out, _val_outputs(_ov(), quantized, val, ctx.recipe.inputs, contract.output_index,
                                                      opt.inference_precision), val.labels)
            attempts.append({"step": step, "val_drop": round(v.loss, 6), "value": round(v.value, 6),
                             "within_budget": v.within})
            if v.judged_nothing:  # no confident val input: nothing to escalate for; the test split decides
                from edgebundle.calibration.accuracy import not_steered

                attempts[-1]["not_steered"] = not_steered(v)
            if v.within or v.judged_nothing:
                break
        return quantized, attempts

    @staticmethod
    def _dynamic_faster(ov, dynamic, quantized, attempts: list, ctx: BuildContext, opt: OpenVinoOptions,
                        quant: dict, notes: list) -> bool:
        """Dynamic int8 holds the budget on val: it ships (True) unless static int8 holds it too and runs faster
        (timed interleaved; static often wins on small encoders, dynamic alone held it on all-MiniLM-L6-v2)."""
        static_tried = {"attempts": attempts, **({"smooth_quant": quant.pop("smooth_quant")}
                                                 if "smooth_quant" in quant else {})}
        if attempts[-1]["within_budget"]:
            t_dyn, t_static = _race(ov, [(dynamic[0], {DYNAMIC_GROUP: dynamic[1]}), (quantized, {})], ctx, opt)
            static_tried["p50_ms"], dynamic[2]["p50_ms"] = round(t_static, 4), round(t_dyn, 4)
        if not attempts[-1]["within_budget"] or t_dyn <= t_static:
            dynamic[2]["static_tried"] = static_tried
            return True
        quant["dynamic_tried"] = dynamic[2]
        notes.append(f"static int8 ({t_static:.3g} ms) ran faster than int8 weights with dynamic activations "
                     f"({t_dyn:.3g} ms), both within budget on val: static kept")
        return False

    @staticmethod
    def _save(ov, model, ctx: BuildContext, opt: OpenVinoOptions, quant: dict, runtime: dict, notes: list) -> Built:
        ov.save_model(model, str(ctx.workdir / "model.xml"), compress_to_fp16=False)
        hint = runtime.get("inference_precision_hint", opt.inference_precision)
        notes = [*notes, f"judged with INFERENCE_PRECISION_HINT {hint}: compile it so (core.compile_model('model.xml', "
                         f"'CPU', {{'INFERENCE_PRECISION_HINT': '{hint}'}})); without it OpenVINO's CPU plugin runs "
                         "bf16 where the CPU has avx512_bf16 or AMX, and the model file cannot carry the setting"]
        return Built("model.xml", ("model.xml", "model.bin"), opt.precision, quant, runtime, tuple(notes))

    @staticmethod
    def _dynamic(nncf, model, ctx: BuildContext, opt: OpenVinoOptions, ref: np.ndarray):
        """int8 weights (per output channel, NNCF's INT8_ASYM) + the CPU plugin's dynamic int8 activations,
        judged on the validation split per group size. Returns (model, group size kept, manifest record)."""
        ov, contract = _ov(), ctx.val_contract()
        try:
            compressed = nncf.compress_weights(model.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
        except (nncf.ValidationError, nncf.InternalError, RuntimeError, ValueError) as e:
            raise StageError(f"NNCF weight compression failed: {type(e).__name__}: {e}") from e
        groups = (128, 64, 32) if opt.dynamic_group_size == "auto" else (int(opt.dynamic_group_size),)
        attempts = []
        for group in groups:
            out = _val_outputs(ov, compressed, ctx.validation, ctx.recipe.inputs, contract.output_index,
                               opt.inference_precision, {DYNAMIC_GROUP: group})
            v = ctx.judge(ref, out)
            attempts.append({"step": f"dynamic activations, group {group}", "group_size": group,
                             "val_drop": round(v.loss, 6), "value": round(v.value, 6), "within_budget": v.within})
            if v.within or v.judged_nothing:
                break
        return compressed, group, {
            "tool": "nncf.compress_weights (INT8_ASYM) + OpenVINO CPU dynamic quantization",
            "scheme": f"int8 weights per output channel; int8 activations per inference, groups of {group} "
                      "input channels (MatMul / fully-connected layers; the rest runs in "
                      f"{opt.inference_precision})",
            "activations": "dynamic", "dynamic_group_size": group,
            "accuracy_budget": _budget_record(ctx, attempts)}

    @staticmethod
    def _smooth_quant(nncf, model, calibration, kwargs: dict, opt: OpenVinoOptions, ctx: BuildContext,
                      ref: np.ndarray | None):
        """Pick SmoothQuant's MatMul alpha (or none) for a transformer; sets kwargs['advanced_parameters'].
        `ref`: the fp32 model's val outputs (needed when `smooth_quant` is auto). Returns (the model quantized
        with the choice, the manifest record)."""
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                           AdvancedSmoothQuantParameters)

        import dataclasses

        from edgebundle.core.metrics import cosine

        base = kwargs.get("advanced_parameters") or AdvancedQuantizationParameters()
        default_alpha = AdvancedSmoothQuantParameters().matmul
        sq = opt.smooth_quant
        # auto: NNCF's default and 0.8 (where dynamic int8 of all-MiniLM-L6-v2 held its budget; 0.95 cost
        # it 0.08 of cosine) and none
        alphas = ([default_alpha, 0.8, -1.0] if sq == "auto" else [default_alpha] if sq == "on" else [-1.0] if sq == "off"
                  else [float(sq)])
        ov, val, specs = _ov(), ctx.validation, ctx.recipe.inputs
        contract = ctx.val_contract()
        ref = ref if len(alphas) > 1 else None
        tried = []
        for alpha in alphas:
            kw = {**kwargs, "advanced_parameters": dataclasses.replace(
                base, smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha))}
            q = nncf.quantize(model.clone(), calibration, **kw)
            rec: dict[str, Any] = {"alpha": alpha if alpha >= 0 else None}
            if ref is not None:
                out = _val_outputs(ov, q, val, specs, contract.output_index, opt.inference_precision)
                rec.update(metric_drop=round(contract.judge(ref, out, val.labels).loss, 6),
                           cosine=round(cosine(out, ref), 6))
            tried.append((rec, q, kw["advanced_parameters"]))
        best = min(tried, key=lambda t: (t[0].get("metric_drop", 0), -t[0].get("cosine", 1)))
        kwargs["advanced_parameters"] = best[2]
        return best[1], {"mode": str(sq), "chosen_alpha": best[0]["alpha"], "tried": [t[0] for t in tried]}

    @staticmethod
    def _quantize_ac(nncf, model, calibration, val, ctx: BuildContext, kwargs, contract, ref: np.ndarray):
        """NNCF accuracy control on the recipe's metric over the validation split: its validation function
        returns the metric as a number NNCF maximises (top1 or agreement as a fraction, min cosine, or a
        metric function's value), and `max_drop` is the budget in those units."""
        # each item carries its sample indices: NNCF also validates on subsets of the validation data
        items, offset = [], 0
        for feeds in iter_feeds(val, ctx.recipe.inputs, 1):
            n = len(next(iter(feeds.values())))
            items.append((feeds, np.arange(offset, offset + n)))
            offset += n
        idx = contract.output_index

        def validate(compiled, data) -> float:
            pairs = list(data)
            out = np.concatenate([compiled(f)[idx] for f, _ in pairs])
            rows = np.concatenate([i for _, i in pairs])
            v = contract.judge(ref[rows], out, None if val.labels is None else val.labels[rows])
            if contract.metric in ("top1", "agreement"):
                return v.value / 100.0
            if contract.metric == "cosine" or contract.spec.higher_is_better:
                return v.value
            return -v.value

        max_drop = (ctx.spec.max_accuracy_drop / 100.0 if contract.metric in ("top1", "agreement")
                    else 1.0 - contract.spec.min_cosine if contract.metric == "cosine" else ctx.spec.max_accuracy_drop)
        validation = nncf.Dataset(items, transform_func=lambda item: item[0])
        kwargs = dict(kwargs)
        if "advanced_parameters" in kwargs:  # the same settings under this function's name for them
            kwargs["advanced_quantization_parameters"] = kwargs.pop("advanced_parameters")
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        return nncf.quantize_with_accuracy_control(
            model, calibration, validation, validation_fn=validate,
            max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, **kwargs,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=ctx.options.accuracy_control_iterations))

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]) -> "OvSession":
        return OvSession(model_path, threads=threads, device=runtime.get("device", "CPU"),
                         hint=runtime.get("performance_hint", "latency"),
                         precision=runtime.get("inference_precision_hint", "f32"),
                         dynamic_group=runtime.get(DYNAMIC_GROUP.lower()))


class OvSession(SessionBase):
    features = frozenset({"inference_precision"})

    def __init__(self, model_path: Path, *, threads: int, device: str = "CPU", hint: str = "latency",
                 precision: str = "f32", dynamic_group: int | None = None) -> None:
        ov = _ov()
        import openvino.properties.hint as hints

        from edgebundle.core.device_runner import ov_config

        core = ov.Core()
        problem = _device_problem(core, device)
        if problem:
            raise TargetUnavailable(problem)
        config = ov_config(device, threads, hint, precision, dynamic_group)
        try:
            self.compiled = core.compile_model(str(model_path), device, config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise StageError(f"OpenVINO cannot compile {model_path.name} for {device}: {e}") from e
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        try:
            p = self.compiled.get_property(hints.inference_precision)
            self.inference_precision = p.to_string() if hasattr(p, "to_string") else str(p)
        except RuntimeError:
            self.inference_precision = "unknown"

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer(feeds)
        return [res[o] for o in self.compiled.outputs]

    def close(self) -> None:
        self.request = None
        self.compiled = None
