"""ONNX Runtime CPU target: static int8 with `onnxruntime.quantization`.

Default format, measured on an AVX-512 VNNI CPU (bench/ort_formats.py, README): QDQ with uint8
activations and int8 per-channel weights reaches ORT's fast u8s8 kernels (2.7x faster than s8s8 on
ResNet-18). QOperator with int8 activations runs 10-40x slower and is refused. On x86 CPUs without
VNNI, u8s8 can saturate, so `reduce_range: auto` turns on 7-bit weights there, as ORT's docs advise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, model_validator

from edgebundle.calibration.readers import SplitReader, iter_feeds, run_split
from edgebundle.errors import StageError
from edgebundle.pipeline.host import cpu_flags
from edgebundle.targets.base import BuildContext, Built
from edgebundle.targets.registry import Capabilities, register_target

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OrtCpuOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Literal["int8", "fp32"] = "int8"
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    activations: Literal["uint8", "int8"] = "uint8"
    weights: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    reduce_range: bool | Literal["auto"] = "auto"
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    accuracy_control: bool = True  # over max_accuracy_drop: keep the most sensitive layers in float
    layer_errors: bool = True  # record the per-layer error table (8 val samples; `edgebundle explain`)

    @model_validator(mode="after")
    def _refuse_slow(self) -> OrtCpuOptions:
        if self.quant_format == "qoperator" and self.activations == "int8":
            raise ValueError("quant_format 'qoperator' with int8 activations falls off ORT's fast int8 kernels "
                             "(10-40x slower on x86); use 'qdq' or uint8 activations")
        return self


def calibrate_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


CALIB_CHUNK = 16  # calibration folds its statistics every <= 16 feeds instead of holding every activation


def calib_stride(feeds: int) -> int:
    """The largest divisor of `feeds` up to CALIB_CHUNK (ORT requires the stride to divide the count)."""
    return max(d for d in range(1, min(CALIB_CHUNK, feeds) + 1) if feeds % d == 0)


def calibration_extra_options(cal, feeds: int) -> dict[str, Any]:
    """quantize_static extra_options: calibration in strides (`CalibStridedMinMax`: ORT merges min/max ranges
    or histograms after each stride, so memory stays bounded as samples grow; bench/calib_memory.py).
    Not `CalibMaxIntermediateOutputs`: in this onnxruntime it drops each full chunk without using it."""
    opts: dict[str, Any] = {"CalibStridedMinMax": calib_stride(feeds)} if feeds > 0 else {}
    if cal.method == "percentile":
        opts["CalibPercentile"] = cal.percentile
    return opts


def _needs_reduce_range(opt: OrtCpuOptions) -> bool:
    if opt.reduce_range != "auto":
        return bool(opt.reduce_range)
    flags = cpu_flags()
    x86 = bool(flags & {"avx2", "sse4_1"})
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return x86 and not vnni and opt.activations == "uint8" and opt.weights == "int8"


@register_target("ort-cpu", capabilities=Capabilities(precisions=("int8", "fp32"), runtime="onnxruntime",
                                                       opens_onnx=True),
                 options=OrtCpuOptions)
class OrtCpuTarget:
    def unavailable_reason(self, options: OrtCpuOptions | None = None) -> str | None:
        if "CPUExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CPUExecutionProvider"
        return None

    def build(self, ctx: BuildContext) -> Built:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        opt: OrtCpuOptions = ctx.options
        runtime = {"graph_optimization": opt.graph_optimization, "threads": ctx.threads}
        out = ctx.workdir / "model.onnx"
        if opt.precision == "fp32":
            out.write_bytes(ctx.fp32_onnx.read_bytes())
            return Built("model.onnx", ("model.onnx",), "fp32", {}, runtime)
        pre = ctx.workdir / "preprocessed.onnx"
        cal = ctx.spec.calibration
        reduce_range = _needs_reduce_range(opt)
        reader = SplitReader(ctx.calibration, ctx.recipe.inputs)
        try:
            quant_pre_process(str(ctx.fp32_onnx), str(pre), skip_symbolic_shape=True)
            self._quantize(pre, out, reader, opt, cal, reduce_range, [])
            control = self._accuracy_control(pre, out, reader, opt, cal, reduce_range, ctx)
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            raise StageError(f"onnxruntime.quantization failed: {type(e).__name__}: {e}") from e
        finally:
            pre.unlink(missing_ok=True)
        quant = {
            "tool": "onnxruntime.quantization.quantize_static",
            "format": opt.quant_format.upper(),
            "activations": opt.activations,
            "weights": opt.weights,
            "per_channel": opt.per_channel,
            "reduce_range": reduce_range,
            "calibration": {"method": cal.method, "samples": reader.count,
                            **({"percentile": cal.percentile} if cal.method == "percentile" else {})},
            **control,
        }
        return Built("model.onnx", ("model.onnx",), "int8", quant, runtime)

    @staticmethod
    def _quantize(pre: Path, out: Path, reader: SplitReader, opt: OrtCpuOptions, cal, reduce_range: bool,
                  exclude: list[str]) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        reader.rewind()
        reader.count = 0
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

    def _accuracy_control(self, pre: Path, out: Path, reader: SplitReader, opt: OrtCpuOptions, cal,
                          reduce_range: bool, ctx: BuildContext) -> dict[str, Any]:
        """Per-layer error table always; over budget, keep the fewest most-sensitive layers in float."""
        from edgebundle.calibration.accuracy import drop_vs_reference, layer_sensitivity
        from edgebundle.pipeline.measure import measure
        from edgebundle.pipeline.recipe import MeasureSpec

        if opt.quant_format != "qdq":
            return {}
        val, specs, budget = ctx.validation, ctx.recipe.inputs, ctx.spec.max_accuracy_drop
        result: dict[str, Any] = {}
        table: list[dict[str, Any]] = []
        if opt.layer_errors or opt.accuracy_control:
            try:
                table = layer_sensitivity(pre, out, val, specs)
            except (RuntimeError, ValueError, TypeError, KeyError) as e:  # onnxruntime's debugger, best effort
                result["layer_errors_failed"] = f"{type(e).__name__}: {e}"
        if opt.layer_errors:
            result["layer_errors"] = table
        f32 = OrtSession(pre, threads=ctx.threads)
        try:
            ref = run_split(f32, val, specs)  # the fp32 outputs, once for every attempt
        finally:
            f32.close()

        def int8_drop() -> tuple[str, float]:
            q = OrtSession(out, threads=ctx.threads)
            try:
                return drop_vs_reference(ref, run_split(q, val, specs), val.labels)
            finally:
                q.close()

        feeds = next(iter_feeds(val.head(1), specs, 1))

        def int8_p50_ms() -> float:
            q = OrtSession(out, threads=ctx.threads)
            try:
                return measure(lambda: q.run(feeds), MeasureSpec(iterations=50, warmup_max=200),
                               threads=ctx.threads).p50_ms
            finally:
                q.close()

        metric, drop = int8_drop()
        budget_info: dict[str, Any] = {"metric": metric, "split": "val", "max_drop": budget,
                                       "drop_full_int8": round(drop, 4), "attempts": [], "excluded_nodes": []}
        result["accuracy_budget"] = budget_info
        if drop <= budget or not opt.accuracy_control:
            budget_info["drop_reached"] = round(drop, 4)
            return result
        full_ms = int8_p50_ms()
        ranked = [r["node"] for r in table if r["sensitivity_db"] is not None]
        k = 1
        while True:
            exclude = ranked[:k]
            self._quantize(pre, out, reader, opt, cal, reduce_range, exclude)
            _, drop = int8_drop()
            budget_info["attempts"].append({"excluded": len(exclude), "drop": round(drop, 4)})
            if drop <= budget or k >= len(ranked):
                break
            k = min(k + 1 if k < 8 else 2 * k, len(ranked))
        kept_ms = int8_p50_ms()
        budget_info.update(excluded_nodes=exclude, drop_reached=round(drop, 4), within_budget=drop <= budget,
                           latency_cost={"p50_full_int8_ms": full_ms, "p50_with_float_layers_ms": kept_ms,
                                         "ratio": kept_ms / full_ms})
        return result

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]) -> "OrtSession":
        return OrtSession(model_path, threads=threads, level=runtime.get("graph_optimization", "all"))


class OrtSession:
    def __init__(self, model_path: Path, *, threads: int, level: str = "all") -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = _OPT_LEVELS[level]
        so.log_severity_level = 3
        try:
            self.sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise StageError(f"onnxruntime cannot load {model_path.name}: {e}") from e
        self.input_names = [i.name for i in self.sess.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None, feeds)

    def close(self) -> None:
        self.sess = None
