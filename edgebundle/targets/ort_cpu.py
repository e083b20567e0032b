"""ONNX Runtime CPU target: static int8 with `onnxruntime.quantization`.

Default format, measured on an AVX-512 VNNI CPU (bench/ort_formats.py, README): QDQ with uint8
activations and int8 per-channel weights reaches ORT's fast u8s8 kernels (2.7x faster than s8s8 on
ResNet-18). QOperator with int8 activations runs 10-40x slower and is refused. On x86 CPUs without
VNNI, u8s8 can saturate, so `reduce_range: auto` turns on 7-bit weights there, as ORT's docs advise.

Transformer encoders: `onnxruntime.transformers.optimizer` fuses attention, SkipLayerNormalization and
BiasGelu first (`transformer_fusions: auto` keeps the fused graph when it fused anything), and `mode: auto`
then quantizes them dynamically (QAttention, MatMulInteger: what ONNX Runtime advises for transformers on
CPU, and faster here, bench/compare.py); CNNs stay static QDQ. A dynamic model over the accuracy budget
falls back to static QDQ with accuracy control.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgebundle.calibration.accuracy import layers_kept_float, pareto
from edgebundle.calibration.qat import QatOptions
from edgebundle.calibration.readers import SplitReader
from edgebundle.core.errors import StageError
from edgebundle.core.session import OrtSession
from edgebundle.core.host import cpu_flags
from edgebundle.core.isa import ISA, VNNI_FLAGS, deployment, has_vnni, host_isa
from edgebundle.exporters.graph import attention_matmuls, attention_shape, weighted_matmuls
from edgebundle.targets.base import BuildContext, Built, TargetBase, Work
from edgebundle.targets.common import calibrate_method, calibration_extra_options, p50_ms, qat_program, val_outputs
from edgebundle.targets.registry import Capabilities, register_target

class OrtCpuOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN/inf (recipe rule)

    precision: Literal["auto", "int8", "fp32"] = "auto"  # auto: int8 unless fp32 is faster here (the runner measures both)
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    activations: Literal["uint8", "int8"] = "uint8"
    weights: Literal["auto", "int8", "uint8"] = Field("auto", description=(
        "auto: int8; where the deployment ISA lacks VNNI (7-bit int8 weights there) and 7-bit int8 needs layers "
        "kept float or misses the budget on validation inputs, 8-bit uint8 weights (u8 x u8 kernels: exact on "
        "every ISA) when they give up less"))
    per_channel: bool = True
    reduce_range: bool | Literal["auto"] = "auto"  # auto: 7-bit weights where the deployment ISA lacks VNNI
    isa: ISA = Field("host", description=(
        "the x86 instruction set the bundle will run on (host | avx2 | avx512 | avx512-vnni): int8 numerics "
        "depend on it (no VNNI: 16-bit saturation); the bundle is judged on it, natively or under "
        "qemu-x86_64 where the host has more, and reduce_range auto follows it"))
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    accuracy_control: bool = True  # over max_accuracy_drop: keep the most sensitive layers in float
    transformer_fusions: Literal["auto", "on", "off"] = "auto"  # onnxruntime.transformers.optimizer (BERT)
    mode: Literal["auto", "static", "dynamic"] = "auto"  # auto: dynamic where attention was fused
    layer_errors: bool = True  # record the per-layer error table (8 val samples; `edgebundle explain`)
    smooth_quant: Literal["auto", "off"] | float = Field("auto", description=(
        "dynamic int8: SmoothQuant (calibration/smooth.py) moves activation outliers into the weights. auto "
        "tries alpha 0.5, 0.65, 0.8 and 0.9 and none on 64 validation inputs and keeps the least damaging; "
        "a number fixes alpha (0 < alpha < 1); off skips it"))
    qat: QatOptions = Field(QatOptions(), description=(
        "static int8 by quantization-aware distillation (PT2E, XNNPACK's int8 scheme, exported as Q/DQ ONNX; "
        "needs the PyTorch student, training inputs and the mobile extra): auto when full static int8 misses "
        "the budget on validation inputs, shipped when it holds it (all layers int8), else accuracy control's "
        "model ships"))

    @field_validator("smooth_quant")
    @classmethod
    def _alpha(cls, v):
        if not isinstance(v, str) and not 0.0 < v < 1.0:
            raise ValueError("smooth_quant alpha must be between 0 and 1 (or auto, off)")
        return v

    @model_validator(mode="after")
    def _refuse_slow(self) -> OrtCpuOptions:
        if self.quant_format == "qoperator" and self.activations == "int8":
            raise ValueError("quant_format 'qoperator' with int8 activations falls off ORT's fast int8 kernels "
                             "(10-40x slower on x86); use 'qdq' or uint8 activations")
        return self


# ORT's 7-bit weights lie in [-64, 64]: AVX2's u8 x s8 multiply-add (vpmaddubsw) sums two products into 16 bits,
# at most 2 x 255 x 64 = 32640 < 32767, so it never saturates and the integer results are VNNI's; float ops
# (normalization, activations) differ by rounding only (all-MiniLM-L6-v2 under qemu -cpu Haswell: 4.5e-8 at most)
SATURATION_FREE = ("7-bit weights (reduce_range): each u8 x s8 pair sum stays within 16 bits (2 x 255 x 64 = "
                   "32640), so CPUs with and without VNNI compute the same integers")
# u8 x u8 kernels widen both to 16 bits and sum pairs into 32 (vpmaddwd): exact on every x86 ISA
WIDENED = ("uint8 weights (u8 x u8): products are widened to 16 bits and summed in 32, exact on every x86 ISA, so "
           "CPUs with and without VNNI compute the same integers")


def _dynamic_quantize(src: Path, path: Path, opt: OrtCpuOptions, reduce_range: bool, **nodes) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # DefaultTensorType: the types of fused com.microsoft ops' outputs, which ONNX shape inference does not
    # know (without it, a smoothed fused graph fails to quantize)
    quantize_dynamic(str(src), str(path), per_channel=opt.per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QUInt8 if opt.weights == "uint8" else QuantType.QInt8,
                     extra_options={"DefaultTensorType": 1}, **nodes)


def _spent(control: dict[str, Any]) -> tuple[bool, int, float]:
    """How much a post-training int8 form gave up on validation inputs, least first: over budget, layers kept
    float, the loss reached."""
    b = control.get("accuracy_budget") or {}
    return (not b.get("within_budget", True), len(layers_kept_float(control)),
            float(b.get("drop_reached", b.get("drop_full_int8", 0.0)) or 0.0))


def _unsteered(control: dict[str, Any]) -> bool:
    """Whether the validation inputs judged nothing (agreement: no confident input), so nothing steered on them."""
    return "not_steered" in (control.get("accuracy_budget") or {})


def _budget_summary(control: dict[str, Any]) -> dict[str, Any]:
    over, floats, loss = _spent(control)
    return {"within_budget": not over, "layers_kept_float": floats, "val_loss": round(loss, 6)}


def _form_name(opt: OrtCpuOptions, mode: str) -> str:
    return f"{mode} int8, {opt.weights} weights" + (" (7-bit)" if _needs_reduce_range(opt) else "")


def _form_points(name: str, control: dict[str, Any], model: Path, ctx: BuildContext) -> list[dict[str, Any]]:
    """What a post-training form tried, each a point of the int8 Pareto: nothing float, then each accuracy-control
    attempt, with its metric and loss on validation inputs and its p50 on this host (the last one timed now
    where the control did not)."""
    b = control.get("accuracy_budget") or {}
    if "value_full_int8" not in b:
        return []
    first = {"form": name, "layers_kept_float": 0, "val_value": b["value_full_int8"], "val_loss": b["drop_full_int8"],
             "within_budget": not b["attempts"] and b["within_budget"], "p50_ms": b.get("p50_full_int8_ms")}
    pts = [first] + [{"form": name, "layers_kept_float": a["excluded"], "val_value": a["value"], "val_loss": a["drop"],
                      "within_budget": a.get("within_budget"), "p50_ms": a.get("p50_ms")} for a in b["attempts"]]
    if pts[-1]["p50_ms"] is None:
        pts[-1]["p50_ms"] = round(p50_ms(model, ctx), 6)
    return pts


def _choose_form(results: list[tuple], points: list[dict[str, Any]], opt: OrtCpuOptions) -> tuple:
    """The post-training form that stands: the fastest within budget where this host's timing is the
    deployment ISA's, else the one that gave up least (within budget, fewest layers float, smallest loss)."""
    within = [r for r in results if not _spent(r[4])[0]]
    if deployment(opt.isa) == host_isa() and len(within) > 1:
        return min(within, key=lambda r: [p for p in points if p["form"] == _form_name(r[0], r[3])][-1]["p50_ms"])
    return min(results, key=lambda r: _spent(r[4]))


def _forms_record(points: list[dict[str, Any]], best: tuple, forms: int, opt: OrtCpuOptions) -> dict[str, Any]:
    """The manifest's `quantization.forms_tried`: every point tried (Pareto marked) and why the chosen stands."""
    host, dep = host_isa(), deployment(opt.isa)
    why = "the only form" if forms == 1 else (
        f"the fastest within budget on validation inputs (timed on this host, the deployment ISA {host})"
        if dep == host else f"the fewest layers kept float within budget (this host's {host} timing is not the "
                            f"deployment ISA {dep}'s)")
    return {"points": pareto(points), "chosen": _form_name(best[0], best[3]), "chosen_by": why,
            "timed_on": host, "deployment_isa": dep}


def _needs_reduce_range(opt: OrtCpuOptions) -> bool:
    if opt.reduce_range != "auto":
        return bool(opt.reduce_range)
    if opt.isa != "host":  # the deployment CPU's arithmetic, not the build host's
        return not has_vnni(opt.isa) and opt.activations == "uint8" and opt.weights == "int8"
    flags = cpu_flags()
    x86 = bool(flags & {"avx2", "sse4_1"})
    vnni = bool(flags & VNNI_FLAGS)
    return x86 and not vnni and opt.activations == "uint8" and opt.weights == "int8"


@register_target("ort-cpu", capabilities=Capabilities(precisions=("int8", "fp32"), runtime="onnxruntime",
                                                       opens_onnx=True),
                 options=OrtCpuOptions)
class OrtCpuTarget(TargetBase):
    def unavailable_reason(self, options: OrtCpuOptions | None = None) -> str | None:
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CPUExecutionProvider"
        return None

    def pending_reason(self, options: OrtCpuOptions | None = None) -> str | None:
        return None  # builds and times its own artifact on this machine

    temporary = ("fused.onnx", "preprocessed.onnx", "qat.onnx", "pristine.onnx", "preprocessed.u8.onnx",
                 "model.u8.onnx")

    def start(self, ctx: BuildContext, opt: OrtCpuOptions) -> Work:
        """Transformer fusions first (kept when they fused anything): the fp32 and int8 builds start from it."""
        work = Work(opt, {"graph_optimization": opt.graph_optimization, "threads": ctx.threads})
        fused = ctx.workdir / "fused.onnx"
        work.state["fusion"] = fusion = fuse_transformer(ctx.fp32_onnx, fused, opt.transformer_fusions)
        if fusion:
            work.runtime["transformer_fusions"] = fusion
        work.state["src"] = fused if fusion else ctx.fp32_onnx
        return work

    def fp32(self, ctx: BuildContext, work: Work) -> Built:
        (ctx.workdir / "model.onnx").write_bytes(work.state["src"].read_bytes())
        return Built("model.onnx", ("model.onnx",), "fp32", {}, work.runtime)

    def int8(self, ctx: BuildContext, work: Work) -> Built:
        """Dynamic (attention fused or found) or static QDQ int8, each with accuracy control on val; a dynamic
        model over budget falls back to static; full static int8 over budget may give way to QAT."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        opt, src = work.opt, work.state["src"]
        pre, out = ctx.workdir / "preprocessed.onnx", ctx.workdir / "model.onnx"
        reader = SplitReader(ctx.calibration, ctx.recipe.inputs)
        mode = opt.mode if opt.mode != "auto" else (
            "dynamic" if work.state["fusion"].get("Attention") or attention_matmuls(src) else "static")
        if opt.qat.enabled == "on" and mode != "static":
            raise StageError("qat enabled 'on' fine-tunes a static int8 program; this build quantizes "
                             "dynamically (options.mode: static, or qat: auto)")
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            mode, control, qat = self._int8_forms(pre, out, reader, mode, work, ctx)
            opt, reduce_range = work.opt, work.state["reduce_range"]
            shipped = self._qat_step(pre, out, qat, control, work, ctx)
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise StageError(f"onnxruntime.quantization failed: {type(e).__name__}: {e}") from e
        if shipped is not None:
            return Built("model.onnx", ("model.onnx",), "int8", shipped, work.runtime,
                         isa_neutral=SATURATION_FREE if shipped["reduce_range"] else None)
        common = {"per_channel": opt.per_channel, "reduce_range": reduce_range}
        u8 = mode == "dynamic" or opt.activations == "uint8"
        neutral = (WIDENED if u8 and opt.weights == "uint8" else
                   SATURATION_FREE if u8 and reduce_range and opt.weights == "int8" else None)
        if mode == "dynamic":
            quant = {"tool": "onnxruntime.quantization.quantize_dynamic", "mode": "dynamic", "format": "QOperator",
                     "activations": "uint8 (per inference)", "weights": opt.weights, **common, **control}
            return Built("model.onnx", ("model.onnx",), "int8", quant, work.runtime, isa_neutral=neutral)
        cal = ctx.spec.calibration
        quant = {"tool": "onnxruntime.quantization.quantize_static", "mode": "static",
                 "format": opt.quant_format.upper(), "activations": opt.activations, "weights": opt.weights,
                 **common, "calibration": {"method": cal.method, "samples": reader.count,
                                           **({"percentile": cal.percentile} if cal.method == "percentile" else {})},
                 **control}
        return Built("model.onnx", ("model.onnx",), "int8", quant, work.runtime, isa_neutral=neutral)

    def _post_training(self, pre: Path, out: Path, reader: SplitReader, mode: str, work: Work,
                       ctx: BuildContext, asked: OrtCpuOptions) -> tuple[str, dict[str, Any], tuple[str, str | None]]:
        """Post-training int8 into `out`: dynamic first where asked, static QDQ (with accuracy control) when
        static or when dynamic missed the budget, unless QAT is 'on' (it replaces static post-training int8).
        Returns (the mode that stands, its accuracy record, the QAT switch, read from the options as `asked`:
        on | auto | off, why not)."""
        opt, reduce_range, cal = work.opt, work.state["reduce_range"], ctx.spec.calibration
        control: dict[str, Any] = {}
        if mode == "dynamic":
            control = self._dynamic(pre, out, opt, reduce_range, ctx)
            if not control["accuracy_budget"]["within_budget"] and opt.accuracy_control and not _unsteered(control):
                mode, fell_back = "static", {**control["accuracy_budget"],
                                             **({"smooth_quant": control["smooth_quant"]}
                                                if "smooth_quant" in control else {})}
        qat = _qat_switch(asked, ctx, bool(work.state["fusion"])) if mode == "static" else ("off", None)
        if mode == "static" and qat[0] != "on":
            self._quantize(pre, out, reader, opt, cal, reduce_range, [])
            control = {**self._accuracy_control(pre, out, reader, opt, cal, reduce_range, ctx),
                       **({"dynamic_over_budget": fell_back} if control else {})}
        return mode, control, qat

    def _int8_forms(self, pre: Path, out: Path, reader: SplitReader, mode: str, work: Work, ctx: BuildContext
                    ) -> tuple[str, dict[str, Any], tuple[str, str | None]]:
        """Post-training int8 (`_post_training`) with weights auto resolved: int8, except where the deployment
        ISA lacks VNNI (int8 weights get 7 bits there) and 7-bit int8 needed layers kept float or missed the
        budget on validation inputs: then 8-bit uint8 weights (u8 x u8 kernels widen to 16 bits, exact on every
        ISA) go through the same path, and the form with fewer float layers within budget stands (on
        all-MiniLM-L6-v2 for AVX2: cosine min 0.985 with 2 MatMuls float -> 0.993 all int8). `work.opt` ends
        resolved."""
        opt = work.opt
        s8 = opt.model_copy(update={"weights": "int8"}) if opt.weights == "auto" else opt
        forms = [s8, opt.model_copy(update={"weights": "uint8"})] if opt.weights == "auto" and \
            _needs_reduce_range(s8) else [s8]
        if len(forms) > 1:
            shutil.copyfile(pre, ctx.workdir / "pristine.onnx")  # smoothing may rewrite `pre`
        results, points = [], []
        for i, o in enumerate(forms):
            p, q = (pre, out) if i == 0 else (ctx.workdir / "preprocessed.u8.onnx", ctx.workdir / "model.u8.onnx")
            if i:
                shutil.copyfile(ctx.workdir / "pristine.onnx", p)
            work.opt, work.state["reduce_range"] = o, _needs_reduce_range(o)
            results.append((o, p, q, *self._post_training(p, q, reader, mode, work, ctx, opt)))
            points += _form_points(_form_name(o, results[-1][3]), results[-1][4], q, ctx)
            over, floats, _ = _spent(results[-1][4])
            if (not over and not floats) or _unsteered(results[-1][4]):  # nothing to win, or nothing to see
                break
        best = _choose_form(results, points, opt)
        o, p, q, mode, control, qat = best
        if points:
            control["forms_tried"] = _forms_record(points, best, len(results), opt)
        work.opt, work.state["reduce_range"] = o, _needs_reduce_range(o)
        if q != out:
            os.replace(q, out)
            os.replace(p, pre)
        if len(results) > 1:
            control["weights_auto"] = {
                "why": "the deployment ISA has no VNNI: int8 weights get 7 bits (reduce_range); 7-bit int8 needed "
                       "layers kept float or missed the budget on validation inputs, so 8-bit uint8 weights were tried",
                "tried": [{"weights": r[0].weights + (" (7-bit)" if _needs_reduce_range(r[0]) else ""),
                           **_budget_summary(r[4])} for r in results],
                "chose": o.weights}
        return mode, control, qat

    @staticmethod
    def _qat_step(pre: Path, out: Path, qat: tuple[str, str | None], control: dict[str, Any], work: Work,
                  ctx: BuildContext) -> dict[str, Any] | None:
        """QAT when asked (`on`) or when full static int8 missed the budget on val (`auto`): the manifest's
        quantization record when its model replaced `out`, else None (`control` then records what was tried)."""
        opt = work.opt
        b = control.get("accuracy_budget") or {}
        # full int8 over budget on val (not where val judged nothing: no loss seen there to fine-tune away)
        missed = (bool(b.get("attempts")) or not b.get("within_budget", True)) and "not_steered" not in b
        if qat[0] == "on" or (qat[0] == "auto" and missed):
            try:
                shipped, tried = _qat_candidate(ctx, opt.qat, pre, out, ptq=b if qat[0] == "auto" else None,
                                                seven_bit=_needs_reduce_range(opt.model_copy(
                                                    update={"weights": "int8", "activations": "uint8"})))
            except StageError:
                raise
            except Exception as e:  # torch.export / PT2E / the exporter raise many types
                why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                if qat[0] == "on":
                    raise StageError(f"quantization-aware distillation failed: {why}") from e
                shipped, tried = None, {"qat_failed": why}  # auto: post-training int8 stands
            if shipped is not None:
                if control:
                    shipped["post_training"] = control
                return shipped
            control.update(tried)
        elif qat[1] and missed:
            control["qat_skipped"] = qat[1]
        return None

    @staticmethod
    def _quantize(pre: Path, out: Path, reader: SplitReader, opt: OrtCpuOptions, cal, reduce_range: bool,
                  exclude: list[str]) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        reader.rewind()
        quantize_static(
            str(pre), str(out), reader,
            quant_format=QuantFormat.QDQ if opt.quant_format == "qdq" else QuantFormat.QOperator,
            per_channel=opt.per_channel,
            reduce_range=reduce_range,
            activation_type=qtype[opt.activations],
            weight_type=qtype[opt.weights],
            calibrate_method=calibrate_method(cal.method),
            nodes_to_exclude=exclude,
            extra_options=calibration_extra_options(cal, len(reader)),
        )

    @staticmethod
    def _dynamic(pre: Path, out: Path, opt: OrtCpuOptions, reduce_range: bool, ctx: BuildContext) -> dict[str, Any]:
        """Dynamic int8 (weights int8 ahead of time, activations quantized per inference), judged on val.

        Over budget (with accuracy_control), the weighted MatMuls are ranked by the damage each does alone
        (quantized alone, on up to 32 validation samples), and the 1, 2, 3, ... (beyond 8: doubling) most
        damaging stay float until the budget holds: on all-MiniLM-L6-v2 int8 everywhere reached cosine min
        0.982 and four MatMuls kept float reached 0.991."""
        from edgebundle.calibration.accuracy import budget_record, keep_float_until_within

        def quantize(path: Path, src: Path = pre, **nodes) -> None:
            _dynamic_quantize(src, path, opt, reduce_range, **nodes)

        contract, val = ctx.val_contract(), ctx.validation
        smoothing = OrtCpuTarget._smooth(pre, opt, ctx, quantize)
        quantize(out)
        ref = val_outputs(pre, ctx)
        v = contract.judge(ref, val_outputs(out, ctx), val.labels)
        info = budget_record(v)
        if v.within or not opt.accuracy_control or v.judged_nothing:
            return {"accuracy_budget": info, **smoothing}
        part = ctx.val_head(32)
        part_ref = val_outputs(pre, part)
        one = ctx.workdir / "one.onnx"
        damage = []
        try:
            for node in weighted_matmuls(pre):
                quantize(one, nodes_to_quantize=[node])
                damage.append((part.judge(part_ref, val_outputs(one, part)).loss, node))
        finally:
            one.unlink(missing_ok=True)
        damage.sort(reverse=True)
        info["ranking"] = [{"node": n, "loss_alone": round(float(d), 6)} for d, n in damage]
        info["p50_full_int8_ms"] = round(p50_ms(out, ctx), 6)
        keep_float_until_within([n for _, n in damage], lambda exclude: quantize(out, nodes_to_exclude=exclude),
                                lambda: contract.judge(ref, val_outputs(out, ctx), val.labels), v, info,
                                price=lambda: p50_ms(out, ctx))
        return {"accuracy_budget": info, **smoothing}

    @staticmethod
    def _smooth(pre: Path, opt: OrtCpuOptions, ctx: BuildContext, quantize) -> dict[str, Any]:
        """SmoothQuant before dynamic int8, `pre` rewritten in place when it pays: each alpha (and none) is
        quantized and judged on 64 validation inputs; the least damaging wins (exact in fp32 either way)."""
        from edgebundle.calibration.smooth import smooth

        if opt.smooth_quant == "off":
            return {}
        part = ctx.val_head(64)
        ref = val_outputs(pre, part)
        trial, cand = ctx.workdir / "smooth_trial.onnx", ctx.workdir / "smoothed.onnx"
        alphas = (0.5, 0.65, 0.8, 0.9) if opt.smooth_quant == "auto" else (float(opt.smooth_quant),)
        tried, best, amax, matmuls = [], (float("inf"), None), None, 0
        try:
            for alpha in (None, *alphas):
                src = pre
                if alpha is not None:
                    info = smooth(pre, cand, ctx.calibration, ctx.recipe.inputs, alpha, amax)
                    amax, matmuls, src = info["amax"], info["matmuls"], cand
                    if not matmuls:
                        break
                quantize(trial, src=src)
                loss = part.judge(ref, val_outputs(trial, part)).loss
                tried.append({"alpha": alpha, "val_loss": round(float(loss), 6)})
                if loss < best[0]:
                    best = (loss, alpha)
                    if alpha is not None:
                        os.replace(cand, ctx.workdir / "smoothed_best.onnx")
            if best[1] is not None:
                os.replace(ctx.workdir / "smoothed_best.onnx", pre)
        finally:
            for f in (trial, cand, ctx.workdir / "smoothed_best.onnx"):
                f.unlink(missing_ok=True)
        return {"smooth_quant": {"alpha": best[1], "matmuls": matmuls if best[1] is not None else 0,
                                 "tried_on_val_inputs": len(part.validation), "tried": tried,
                                 "calibration_samples": len(ctx.calibration)}}

    def _accuracy_control(self, pre: Path, out: Path, reader: SplitReader, opt: OrtCpuOptions, cal,
                          reduce_range: bool, ctx: BuildContext) -> dict[str, Any]:
        """Per-layer error table always; over budget, keep the fewest most-sensitive layers in float."""
        from edgebundle.calibration.accuracy import control_accuracy

        if opt.quant_format != "qdq":
            return {}
        return control_accuracy(
            pre, out, lambda exclude: self._quantize(pre, out, reader, opt, cal, reduce_range, exclude),
            split=ctx.validation, specs=ctx.recipe.inputs, contract=ctx.val_contract(),
            outputs=lambda model: val_outputs(model, ctx), p50_ms=lambda model: p50_ms(model, ctx),
            layer_errors=opt.layer_errors, control=opt.accuracy_control)

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]) -> "OrtSession":
        return OrtSession(model_path, threads=threads, level=runtime.get("graph_optimization", "all"))


def _qat_switch(opt: OrtCpuOptions, ctx: BuildContext, fused: bool) -> tuple[str, str | None]:
    """(on | auto | off, why QAT cannot run here or None). `on` that cannot run is a StageError."""
    import importlib.util

    if opt.qat.enabled == "off":
        return "off", None
    why = None
    if ctx.load_model is None:
        why = "QAT starts from the PyTorch student and this build has none"
    elif ctx.train is None or len(ctx.train) < 2:
        why = ("QAT needs training inputs and this build has none (a build from a work folder trains on its "
               "calibration inputs: set data.calibration_split train)")
    elif any(importlib.util.find_spec(m) is None for m in ("torchao", "executorch")):
        why = "QAT needs PT2E's XNNPACK quantizer: pip install edgebundle[mobile] (executorch, torchao)"
    elif fused:
        why = "QAT's program exports without ONNX Runtime's transformer fusions (the fused graph is this build's)"
    elif opt.quant_format != "qdq" or not opt.per_channel or opt.weights == "uint8":
        why = "QAT's program is Q/DQ with per-channel int8 weights; the options ask for another scheme"
    if why and opt.qat.enabled == "on":
        raise StageError(f"qat enabled 'on': {why}")
    return ("off", why) if why else (opt.qat.enabled, None)


def _qat_candidate(ctx: BuildContext, q: QatOptions, pre: Path, out: Path, *, ptq: dict[str, Any] | None,
                   seven_bit: bool = False) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """QAT static int8, exported as Q/DQ ONNX (exporters.qdq), judged on the validation split against `pre`.
    With `ptq` (the post-training budget record: qat auto) it replaces `out` only within the budget; without
    (qat on) always. `seven_bit` (a deployment ISA without VNNI): weights trained and stored on -63..63, so
    each u8 x s8 pair sum fits 16 bits there (8-bit weights saturate AVX2's pairwise multiply-add). Returns
    (the manifest's quantization record if it replaced `out`, else None; what was tried, for the
    post-training record)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    from edgebundle.calibration.pt2e import xnnpack_quantizer
    from edgebundle.calibration.qat import fake_quant_config
    from edgebundle.exporters.qdq import export_qdq

    quantizer = xnnpack_quantizer(pads_share_input=True).set_global(
        fake_quant_config(get_symmetric_quantization_config(
            is_per_channel=True, **({"weight_qmin": -63, "weight_qmax": 63} if seven_bit else {}))))
    ref = val_outputs(pre, ctx)
    r, record = qat_program(ctx, ctx.load_model().cpu().eval(), q, quantizer,
                            "PT2E QAT (torchao prepare_qat_pt2e/convert_pt2e), XNNPACK quantizer's PTQ observers "
                            "as frozen fake quantizers, zero pads on their input's scale", val_reference=ref)
    cand = ctx.workdir / "qat.onnx"
    rewrites = export_qdq(r.model, ctx.recipe.inputs, ctx.recipe.outputs, cand, opset=ctx.recipe.stages.export.opset)
    v = ctx.judge(ref, val_outputs(cand, ctx))
    qat = {"activations": "static", "qat": True, "val_value": round(float(v.value), 6), "within_budget": v.within}
    if ptq is not None and not v.within:
        return None, {"activations_tried_on_val": [qat], "qat": record}
    os.replace(cand, out)
    tried = [{"activations": "static", "val_value": ptq["value_full_int8"], "within_budget": False}] if ptq else []
    tried.append(qat)
    return {"tool": "torchao PT2E QAT -> torch.onnx.export(dynamo=True) Q/DQ (edgebundle.exporters.qdq)",
            "mode": "static", "format": "QDQ", "activations": "uint8 (XNNPACK's int8 grid, zero point + 128)",
            "weights": "int8 symmetric" + (" (7-bit: -63..63)" if seven_bit else ""), "per_channel": True,
            "reduce_range": seven_bit,
            "calibration": {"method": "histogram (observers)", "samples": len(ctx.calibration)},
            "onnx_rewrites": rewrites, "activations_tried_on_val": tried, "qat": record}, {}


FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization",
             "BiasGelu", "FastGelu", "Gelu", "LayerNormalization")


def fuse_transformer(src: Path, dst: Path, when: str) -> dict[str, int]:
    """BERT-style fusions with onnxruntime.transformers.optimizer (python fusions only, opt_level 0, so the
    file stays portable across execution providers). Writes `dst` and returns the fused-op counts, or {}
    (nothing written) when fusions are off or fused nothing."""
    if when == "off":
        return {}
    import logging

    from onnxruntime.transformers.optimizer import optimize_model

    # its modules log under their bare names (fusion_attention, ...) and warn about shapes pruning changed
    # (q/k/v narrower than the hidden size) although the fused graph is right (the bundle is checked
    # against fp32 on the test split)
    logging.disable(logging.WARNING)
    try:
        heads, width = attention_shape(src)
        model = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=width, opt_level=0)
    except Exception as e:  # the optimizer's pattern matchers raise assorted errors on unfamiliar graphs
        if when == "on":
            raise StageError(f"onnxruntime.transformers.optimizer failed: {type(e).__name__}: {e}") from e
        return {}
    finally:
        logging.disable(logging.NOTSET)
    stats = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v and k in FUSED_OPS}
    if not stats and when == "auto":
        return {}
    model.save_model_to_file(str(dst))
    return stats
