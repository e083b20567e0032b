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

from edgebundle.calibration.readers import SplitReader
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
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
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
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        try:
            quant_pre_process(str(ctx.fp32_onnx), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre), str(out), reader,
                quant_format=QuantFormat.QDQ if opt.quant_format == "qdq" else QuantFormat.QOperator,
                per_channel=opt.per_channel,
                reduce_range=reduce_range,
                activation_type=qtype[opt.activations],
                weight_type=qtype[opt.weights],
                calibrate_method=calibrate_method(cal.method),
                extra_options={"CalibPercentile": cal.percentile} if cal.method == "percentile" else {},
            )
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
        }
        return Built("model.onnx", ("model.onnx",), "int8", quant, runtime)

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
