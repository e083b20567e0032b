"""ONNX Runtime Mobile target: the ORT int8 model converted to the `.ort` format for phones.

The model is quantized exactly as the `ort-cpu` target does it, then converted with onnxruntime's own
converter (`onnxruntime.tools.convert_onnx_models_to_ort`, fixed optimisation style, for the
`target_platform` the phone has: arm by default), which also writes the required-operators (and types)
configuration a reduced ORT Mobile build is compiled with. The `.ort` file is re-loaded and its outputs
compared with the `.onnx` model's on the validation split; the bundle itself is judged like every other
by the recipe's metric on the test split. The two agree bit for bit when the model is all int8 (both run
ORT's fused QLinear kernels); where layers stay float, x86 runs the `.onnx`'s float convolutions in its
NCHWc layout and the ARM-optimized `.ort` does not, and a last-bit float difference can move a
requantized value by a step: two legitimate kernels, not a defect (0.25 max-abs on EfficientNet-Lite
logits with 50 float convolutions). `max_abs_diff` makes the comparison a hard limit where wanted.
Latency measured here is an x86 figure of the ARM-optimized model, not a phone figure.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator


from edgebundle.core.errors import StageError
from edgebundle.targets.base import BuildContext, Built
from edgebundle.core.metrics import compare
from edgebundle.core.session import OrtSession
from edgebundle.targets.ort_cpu import OrtCpuOptions, OrtCpuTarget
from edgebundle.targets.registry import Capabilities, register_target

CONFIG = "required_operators.config"
HOST_NOTE = ("latency measured with onnxruntime on this x86 host, not on a phone; measure the same .ort on the "
             "device: `edgebundle measure BUNDLE --device adb://SERIAL --runner onnxruntime_perf_test` (or an ARM "
             "board with Python: --device ssh://user@host --work WORK, which also judges it on the ARM kernels)")


class OrtMobileOptions(OrtCpuOptions):
    target_platform: Literal["arm", "amd64"] = "arm"
    max_abs_diff: float | None = None  # a hard limit on .ort vs .onnx outputs (validation split); None: recorded

    @field_validator("isa")
    @classmethod
    def _x86_only(cls, v: str) -> str:
        if v != "host":
            raise ValueError("options.isa applies to the x86 CPU targets (ort-cpu, openvino); ort-mobile deploys "
                             "to phones")
        return v


@register_target("ort-mobile", capabilities=Capabilities(precisions=("int8", "fp32"), runtime="onnxruntime",
                                                          opens_onnx=True),
                 options=OrtMobileOptions)
class OrtMobileTarget:
    def unavailable_reason(self, options: OrtMobileOptions | None = None) -> str | None:
        return OrtCpuTarget().unavailable_reason()

    def pending_reason(self, options: OrtMobileOptions | None = None) -> str | None:
        return None  # builds and times its own artifact on this machine

    def build(self, ctx: BuildContext) -> Built:
        from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

        opt: OrtMobileOptions = ctx.options
        base = OrtCpuTarget().build(ctx)  # writes ctx.workdir/model.onnx (int8 or fp32)
        onnx_path = ctx.workdir / base.model_file
        conv = ctx.workdir / "convert"
        try:
            convert_onnx_models_to_ort(onnx_path, output_dir=conv,
                                       optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform=opt.target_platform, enable_type_reduction=True)
        except Exception as e:  # the converter raises whatever onnxruntime raises
            raise StageError(f"onnxruntime's .ort converter failed: {type(e).__name__}: {e}") from e
        ort_files = list(conv.glob("*.ort"))
        configs = list(conv.glob("*.config"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise StageError(f"the .ort converter wrote {[p.name for p in conv.iterdir()]}, expected one .ort "
                             "and one .config")
        shutil.move(ort_files[0], ctx.workdir / "model.ort")
        shutil.move(configs[0], ctx.workdir / CONFIG)
        shutil.rmtree(conv)
        diff, agree = _round_trip(onnx_path, ctx.workdir / "model.ort", ctx)
        if opt.max_abs_diff is not None and diff > opt.max_abs_diff:
            raise StageError(f"the .ort model's outputs differ from the .onnx model's by {diff:.3g} "
                             f"(allowed {opt.max_abs_diff:g})")
        onnx_path.unlink()
        runtime = {**base.runtime, "format": "ORT (flatbuffer)", "target_platform": opt.target_platform,
                   "optimization_style": "Fixed", "ort_vs_onnx_max_abs_diff": diff, "ort_vs_onnx_verdict": agree}
        return dataclasses.replace(base, model_file="model.ort", files=("model.ort", CONFIG), runtime=runtime,
                                   notes=(*base.notes, HOST_NOTE))

    def open(self, model_path: Path, *, threads: int, runtime: dict[str, Any]) -> OrtSession:
        return OrtSession(model_path, threads=threads)


def _round_trip(onnx_path: Path, ort_path: Path, ctx: BuildContext) -> tuple[float, str]:
    """Largest output difference between the .onnx and the re-loaded .ort on the validation split (both at
    ORT's full optimisation level), and the .ort judged against the .onnx by the recipe's metric."""
    from edgebundle.core.data import run_split

    part = ctx.validation.head(256)
    contract = ctx.val_contract()
    with OrtSession(onnx_path, threads=ctx.threads) as a, OrtSession(ort_path, threads=ctx.threads) as b:
        x, y = (run_split(s, part, ctx.recipe.inputs, output=contract.output_index) for s in (a, b))
    diff = compare(x, y).max_abs
    v = contract.judge(x, y, part.labels)
    return diff, v.line()
