"""What a competent user does by hand, for the benchmarks to stand beside: each a few documented calls.

- ORT `quantize_static`, Q/DQ, per-channel weights, min/max (`quant_pre_process` first), u8 or s8 activations;
- ORT `quantize_dynamic` with the settings of Optimum's `AutoQuantizationConfig.avx512_vnni(is_static=False)`
  (QOperator integer ops, u8 asymmetric activations, s8 symmetric weights, no reduce_range; per-tensor by
  default). Optimum itself is not installed: it pins an older `transformers` than the one here;
- `nncf.quantize` with its defaults, compiled by OpenVINO with the CPU plugin's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def ort_static(src: Path, dst: Path, calib: list[dict[str, np.ndarray]], *, activations: str = "u8") -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activations == "u8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    pre.unlink(missing_ok=True)
    return dst


def ort_dynamic_optimum_vnni(src: Path, dst: Path, *, per_channel: bool = False) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=False, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Attention", "Gather", "Transpose", "EmbedLayerNormalization"],
                     extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return dst


class OvSession:
    """An OpenVINO model compiled with the given config (the plugin's defaults when empty), run like ORT."""

    def __init__(self, model: Any, threads: int, config: dict[str, Any] | None = None) -> None:
        import openvino as ov

        cfg = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, **(config or {})}
        self.compiled = ov.Core().compile_model(model, "CPU", cfg)
        self.request = self.compiled.create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer(feeds)
        return [np.asarray(res[o]) for o in self.compiled.outputs]

    def close(self) -> None:
        self.request = None

    def __enter__(self) -> "OvSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def nncf_defaults(src: Path, calib: list[dict[str, np.ndarray]]) -> Any:
    import nncf
    import openvino as ov

    return nncf.quantize(ov.convert_model(str(src)), nncf.Dataset(calib))


def openvino_fp32(src: Path) -> Any:
    import openvino as ov

    return ov.convert_model(str(src))
